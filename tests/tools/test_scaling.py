"""The torch-free test scale (``hiervl/demo/scaling.py``) the ONNX runner uses: its numpy
upsampling equals one full-size ``F.interpolate(bilinear, align_corners=False)`` and the
demo's torch bands, whatever the band split."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("cv2", reason="hiervl.demo.scaling resizes images with OpenCV")

from hiervl.demo.scaling import bilinear_taps, upsampled_labels_numpy  # noqa: E402


def _random_probs(k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, h, w, generator=g, dtype=torch.float32).softmax(dim=0)


@pytest.mark.parametrize(
    ("k", "small", "size", "band_rows"),
    [
        (5, (12, 20), (37, 53), 4),  # non-integer factors 3.08 x 2.65, bands of 4 rows
        (3, (7, 9), (50, 23), 7),  # 7.14 x 2.56, the last band shorter
        (4, (16, 16), (48, 64), 1),  # integer factors, one row per band
        (6, (20, 30), (13, 17), 3),  # shrinking (no antialiasing, as F.interpolate)
        (2, (9, 11), (61, 95), 1000),  # one band for all rows
    ],
)
def test_numpy_bands_equal_full_size_interpolate(k, small, size, band_rows):
    probs = _random_probs(k, *small, seed=k)
    full = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    labels, confidence = upsampled_labels_numpy(
        probs.numpy(),
        size,
        threshold=0.0,
        unlabeled=-1,
        band_elements=2 * band_rows * size[1],  # two (rows, W) buffers
    )
    assert labels.shape == size and labels.dtype == np.int64
    assert confidence.shape == size and confidence.dtype == np.float32
    np.testing.assert_allclose(confidence, full.max(0).values.numpy(), rtol=0, atol=1e-6)
    # Random data has no ties: the argmax is the full-size one at every pixel.
    np.testing.assert_array_equal(labels, full.argmax(0).numpy())


def test_taps_are_the_interpolation_weights():
    # One axis: interpolating a (1, 1, n, 1) ramp of basis vectors gives the weights.
    for src, dst in [(5, 13), (12, 37), (20, 13), (1, 4)]:
        low, high, frac = bilinear_taps(dst, src)
        basis = torch.eye(src, dtype=torch.float64).reshape(src, 1, src, 1)
        weights = F.interpolate(basis, size=(dst, 1), mode="bilinear", align_corners=False)
        expected = weights[:, 0, :, 0].T.numpy()  # (dst, src)
        mine = np.zeros((dst, src))
        np.add.at(mine, (np.arange(dst), low), 1.0 - frac)
        np.add.at(mine, (np.arange(dst), high), frac)
        np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-6)


def test_threshold_and_same_size():
    probs = np.array([[[0.9, 0.4]], [[0.1, 0.6]]], dtype=np.float32)  # K=2, 1x2
    labels, confidence = upsampled_labels_numpy(probs, (1, 2), threshold=0.7, unlabeled=255)
    np.testing.assert_array_equal(labels, [[0, 255]])
    np.testing.assert_allclose(confidence, [[0.9, 0.6]])


def test_equals_the_demos_torch_bands():
    from hiervl.demo.resize import upsampled_labels

    probs = _random_probs(7, 19, 23, seed=3)
    # Some pixels unlabelled, some not (offset: no pixel sits on the threshold).
    threshold = float(probs.max(0).values.median()) + 1e-4
    torch_labels, torch_conf = upsampled_labels(probs, (70, 41), threshold=threshold, unlabeled=9)
    labels, confidence = upsampled_labels_numpy(
        probs.numpy(), (70, 41), threshold=threshold, unlabeled=9, band_elements=2 * 41 * 5
    )
    np.testing.assert_allclose(confidence, torch_conf, rtol=0, atol=1e-6)
    assert (labels == 9).any() and (labels != 9).any()
    np.testing.assert_array_equal(labels, torch_labels)
