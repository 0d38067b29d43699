"""CutMix: mixing by hand, the same box for images and pseudo-labels, box statistics."""

import math

import numpy as np
import pytest
import torch

from hiervl.data.augment import sample_cutmix_box
from hiervl.data.cutmix import mix_images, mix_pseudo_labels


def _random_box(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, generator=g) < 0.4


def test_mix_images_matches_hand_loop():
    g = torch.Generator().manual_seed(1)
    strong = torch.rand(2, 3, 5, 7, generator=g)
    partner = torch.rand(2, 3, 5, 7, generator=g)
    box = _random_box(2, 5, 7)
    mixed = mix_images(strong, partner, box)
    expected = strong.clone()
    for b in range(2):
        for y in range(5):
            for x in range(7):
                if box[b, y, x]:
                    expected[b, :, y, x] = partner[b, :, y, x]
    assert torch.equal(mixed, expected)
    assert not torch.equal(mixed, strong), "the box must paste something"
    # 0/1 float boxes mean the same as bool boxes.
    assert torch.equal(mix_images(strong, partner, box.float()), expected)


def test_mix_pseudo_labels_matches_hand_loop():
    g = torch.Generator().manual_seed(2)
    label = torch.randint(0, 5, (2, 4, 6), generator=g)
    p_label = torch.randint(0, 5, (2, 4, 6), generator=g)
    conf, p_conf = torch.rand(2, 4, 6, generator=g), torch.rand(2, 4, 6, generator=g)
    ignore = torch.rand(2, 4, 6, generator=g) < 0.2
    p_ignore = torch.rand(2, 4, 6, generator=g) < 0.2
    box = _random_box(2, 4, 6, seed=3)
    out_label, out_conf, out_ignore = mix_pseudo_labels(
        label, conf, ignore, p_label, p_conf, p_ignore, box
    )
    for b in range(2):
        for y in range(4):
            for x in range(6):
                src = (p_label, p_conf, p_ignore) if box[b, y, x] else (label, conf, ignore)
                assert out_label[b, y, x] == src[0][b, y, x]
                assert out_conf[b, y, x] == src[1][b, y, x]
                assert out_ignore[b, y, x] == src[2][b, y, x]
    assert out_label.dtype == torch.long and out_ignore.dtype == torch.bool


def test_same_box_keeps_images_and_pseudo_labels_aligned():
    """Encode each pixel's label in the image; after mixing both with one box, every mixed
    pixel's image still encodes its mixed label."""
    g = torch.Generator().manual_seed(4)
    label = torch.randint(0, 7, (3, 8, 8), generator=g)
    p_label = torch.randint(0, 7, (3, 8, 8), generator=g)
    image = label[:, None].expand(3, 3, 8, 8).float() * 10
    p_image = p_label[:, None].expand(3, 3, 8, 8).float() * 10
    box = _random_box(3, 8, 8, seed=5)
    zeros, falses = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool)
    mixed = mix_images(image, p_image, box)
    mixed_label, _, _ = mix_pseudo_labels(label, zeros, falses, p_label, zeros, falses, box)
    assert torch.equal(mixed[:, 0] / 10, mixed_label.float())


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        mix_images(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError):
        mix_images(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 5))
    z = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError):
        mix_pseudo_labels(z, z, z, z, torch.zeros(2, 4, 3), z, z)


def test_box_area_ratio_and_probability():
    height, width = 96, 128
    area_range, ratio_range = (0.02, 0.4), (0.3, 1 / 0.3)
    non_empty = 0
    draws = 400
    for seed in range(draws):
        box = sample_cutmix_box(
            height,
            width,
            np.random.default_rng(seed),
            prob=0.5,
            area_range=area_range,
            ratio_range=ratio_range,
        )
        assert box.shape == (height, width) and box.dtype == torch.bool
        if not box.any():
            continue
        non_empty += 1
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        box_h = int(rows[-1] - rows[0] + 1)
        box_w = int(cols[-1] - cols[0] + 1)
        assert int(box.sum()) == box_h * box_w, "a CutMix box is one filled rectangle"
        # Sides are rounded to whole pixels: allow half a pixel on each.
        area = box_h * box_w / (height * width)
        lo = (math.sqrt(area_range[0] * height * width) - 1) ** 2 / (height * width)
        hi = (math.sqrt(area_range[1] * height * width) + 1) ** 2 / (height * width)
        assert lo <= area <= hi
        ratio = box_h / box_w
        assert ratio_range[0] * 0.9 <= ratio <= ratio_range[1] * 1.1
    # Binomial(400, 0.5): std 10, so 150..250 is a > 4-sigma band.
    assert 150 <= non_empty <= 250


def test_box_probability_extremes_and_determinism():
    kwargs = {"prob": 0.0, "area_range": (0.02, 0.4), "ratio_range": (0.3, 3.3)}
    assert not sample_cutmix_box(32, 32, np.random.default_rng(0), **kwargs).any()
    kwargs["prob"] = 1.0
    a = sample_cutmix_box(32, 32, np.random.default_rng(7), **kwargs)
    b = sample_cutmix_box(32, 32, np.random.default_rng(7), **kwargs)
    assert a.any() and torch.equal(a, b)
