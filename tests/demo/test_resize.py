"""The demo's test scale: sizes as detectron2's ResizeShortestEdge computes them, and the
band-wise upsampling of the probabilities equal to one full-size F.interpolate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiervl.demo import resize
from hiervl.demo.resize import inference_size, resize_image, upsampled_labels


@pytest.mark.parametrize(
    ("size", "limits", "expected"),
    [
        ((4000, 6000), (128, 512), (128, 192)),  # shorter side to 128
        ((6000, 4000), (128, 512), (192, 128)),
        ((100, 1000), (128, 512), (51, 512)),  # longer side capped: 1000 * 0.512
        ((48, 64), (128, 512), (128, 171)),  # small images are enlarged, like detectron2
        ((375, 500), (512, 2048), (512, 683)),  # a VOC image
        ((4000, 6000), (0, 512), (4000, 6000)),  # 0 = no resizing
    ],
)
def test_inference_size(size, limits, expected):
    assert inference_size(*size, min_size=limits[0], max_size=limits[1]) == expected


def test_resize_image_keeps_a_constant_image():
    image = np.full((40, 60, 3), (10, 200, 30), np.uint8)
    for size in ((20, 30), (80, 120), (40, 60)):
        out = resize_image(image, size)
        assert out.shape == (*size, 3) and (out == image[0, 0]).all()


@pytest.mark.parametrize("out_size", [(37, 53), (9, 7), (12, 20)])
def test_upsampled_labels_equal_full_size_interpolation(out_size, monkeypatch):
    # Small bands (a few rows each) so that band edges are exercised.
    monkeypatch.setattr(resize, "_BAND_ELEMENTS", 3 * 4 * out_size[1])
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 12, 20, generator=g).softmax(dim=0)
    labels, confidence = upsampled_labels(probs, out_size, threshold=0.0, unlabeled=-1)
    full = F.interpolate(probs[None], size=out_size, mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(confidence, full.max(0).values.numpy(), rtol=0, atol=1e-6)
    # Ties aside (none in random data), the labels are the full-size argmax.
    np.testing.assert_array_equal(labels, full.argmax(0).numpy())
    # The upsampled values are convex combinations: still distributions.
    assert confidence.min() >= 1 / 3 - 1e-6 and confidence.max() <= 1.0


def test_upsampled_labels_threshold():
    probs = torch.tensor([[[0.9, 0.4]], [[0.1, 0.6]]])  # K=2, 1x2, same size: no upsampling
    labels, confidence = upsampled_labels(probs, (1, 2), threshold=0.7, unlabeled=-1)
    np.testing.assert_array_equal(labels, [[0, -1]])
    np.testing.assert_allclose(confidence, [[0.9, 0.6]])
