"""Mappers: padding values, flip/crop correspondence, rescale range, seeded randomness,
strong views, and that the unlabelled mapper never opens a label."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image

from hiervl.config import add_hiervl_config
from hiervl.data import image_io, mappers
from hiervl.data.augment import color_jitter, strong_view
from hiervl.data.mappers import InferenceMapper, LabeledMapper, UnlabeledMapper

NO_STRONG = {
    "color_jitter_prob": 0.0,
    "color_jitter": (0.5, 0.5, 0.5, 0.25),
    "grayscale_prob": 0.0,
    "blur_prob": 0.0,
    "blur_sigma": (0.1, 2.0),
    "cutmix_prob": 0.0,
    "cutmix_area": (0.02, 0.4),
    "cutmix_ratio": (0.3, 3.3),
}


def _write_sample(tmp_path, height, width, seed=0, name="a"):
    """A random RGB image whose red channel is 10 x label (labels 0..9, 255 nowhere)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, size=(height, width)).astype(np.uint8)
    image = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    image[..., 0] = label * 10
    image_path, label_path = tmp_path / f"{name}.png", tmp_path / f"{name}_label.png"
    Image.fromarray(image).save(image_path)
    Image.fromarray(label).save(label_path)
    record = {
        "file_name": str(image_path),
        "sem_seg_file_name": str(label_path),
        "height": height,
        "width": width,
    }
    return record, image, label


def _labeled(scale=(1.0, 1.0), crop=None, flip=0.0):
    return LabeledMapper(scale_range=scale, crop_size=crop, flip_prob=flip)


def test_labeled_output_format(tmp_path):
    record, _, _ = _write_sample(tmp_path, 20, 30)
    out = _labeled(scale=(0.5, 2.0), crop=(16, 24), flip=0.5)(record, np.random.default_rng(0))
    assert set(out) == {"image", "sem_seg", "padding_mask", "file_name", "height", "width"}
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 16, 24)
    assert out["sem_seg"].dtype == torch.long and out["sem_seg"].shape == (16, 24)
    assert (out["height"], out["width"]) == (20, 30), "height/width are the stored size"


def test_crop_pads_image_with_zero_and_label_with_ignore(tmp_path):
    record, image, label = _write_sample(tmp_path, 20, 30)
    out = _labeled(crop=(40, 50))(record, np.random.default_rng(0))
    img, sem = out["image"].permute(1, 2, 0).numpy(), out["sem_seg"].numpy()
    # Padding is bottom/right, so the only window of the padded 40x50 image is the origin.
    assert np.array_equal(img[:20, :30], image) and np.array_equal(sem[:20, :30], label)
    assert (img[20:] == 0).all() and (img[:, 30:] == 0).all()
    assert (sem[20:] == 255).all() and (sem[:, 30:] == 255).all()
    padding = np.ones((40, 50), dtype=bool)
    padding[:20, :30] = False
    assert np.array_equal(out["padding_mask"].numpy(), padding)


def test_crop_is_a_window_of_the_image(tmp_path):
    record, image, label = _write_sample(tmp_path, 32, 32)
    out = _labeled(crop=(12, 20))(record, np.random.default_rng(3))
    img, sem = out["image"].permute(1, 2, 0).numpy(), out["sem_seg"].numpy()
    matches = [
        (y, x)
        for y in range(32 - 12 + 1)
        for x in range(32 - 20 + 1)
        if np.array_equal(image[y : y + 12, x : x + 20], img)
    ]
    assert len(matches) == 1
    y, x = matches[0]
    assert np.array_equal(label[y : y + 12, x : x + 20], sem), "label cropped at the same place"


def test_flip_flips_image_and_label_together(tmp_path):
    record, image, label = _write_sample(tmp_path, 16, 24)
    out = _labeled(flip=1.0)(record, np.random.default_rng(0))
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image[:, ::-1])
    assert np.array_equal(out["sem_seg"].numpy(), label[:, ::-1])
    # Random crop + flip over many seeds: each pixel's red channel still encodes its label.
    mapper = _labeled(crop=(20, 20), flip=0.5)
    flipped = 0
    for seed in range(20):
        out = mapper(record, np.random.default_rng(seed))
        sem, red = out["sem_seg"], out["image"][0].long()
        valid = sem != 255
        assert torch.equal(red[valid], sem[valid] * 10)
        assert (red[~valid] == 0).all()
        flipped += not any(
            np.array_equal(out["image"].permute(1, 2, 0).numpy()[:16, :, :], image[:, x : x + 20])
            for x in range(24 - 20 + 1)
        )
    assert 0 < flipped < 20, "flip probability 0.5 must flip some crops and not others"


def test_rescale_range_and_nearest_labels(tmp_path):
    """Block labels (8x8 cells) survive rescaling: sizes follow the ratio range, labels
    keep their values, and the image still encodes the label away from block edges."""
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 10, size=(5, 6)).astype(np.uint8)
    label = np.kron(cells, np.ones((8, 8), np.uint8))
    image = np.stack([label * 10, label * 5, label * 20], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "b.png")
    Image.fromarray(label).save(tmp_path / "b_label.png")
    record = {
        "file_name": str(tmp_path / "b.png"),
        "sem_seg_file_name": str(tmp_path / "b_label.png"),
    }
    mapper = _labeled(scale=(0.5, 2.0))
    heights = []
    for seed in range(30):
        out = mapper(record, np.random.default_rng(seed))
        h, w = out["sem_seg"].shape
        heights.append(h)
        assert 20 <= h <= 80 and 24 <= w <= 96
        assert abs(h / 40 - w / 48) < 0.05, "both sides use one ratio"
        assert set(out["sem_seg"].unique().tolist()) <= set(cells.flatten().tolist())
        # Inside label regions (label constant over the 3x3 neighbourhood) the bilinear
        # image and the nearest-neighbour label must agree exactly.
        sem = out["sem_seg"][None, None].float()
        padded = torch.nn.functional.pad(sem, (1, 1, 1, 1), mode="replicate")
        high = torch.nn.functional.max_pool2d(padded, 3, 1)[0, 0]
        low = -torch.nn.functional.max_pool2d(-padded, 3, 1)[0, 0]
        interior = high == low
        assert interior.float().mean() > 0.3
        red = out["image"][0].long()
        assert torch.equal(red[interior], out["sem_seg"][interior] * 10)
    assert min(heights) < 30 and max(heights) > 60, "ratios must span the range"


def test_same_generator_seed_same_sample(tmp_path):
    record, _, _ = _write_sample(tmp_path, 40, 40)
    strong = dict(
        NO_STRONG, color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, cutmix_prob=0.5
    )
    mapper = UnlabeledMapper(scale_range=(0.5, 2.0), crop_size=(24, 24), flip_prob=0.5, **strong)
    a = mapper(record, np.random.default_rng(11))
    b = mapper(record, np.random.default_rng(11))
    c = mapper(record, np.random.default_rng(12))
    for key in ("image_weak", "image_strong1", "image_strong2", "cutmix_box1", "ignore_mask"):
        assert torch.equal(a[key], b[key])
    assert not all(torch.equal(a[k], c[k]) for k in ("image_weak", "image_strong1"))


def test_unlabeled_mapper_never_opens_a_label(tmp_path, monkeypatch):
    record, _, _ = _write_sample(tmp_path, 20, 20)
    record["sem_seg_file_name"] = str(tmp_path / "must_not_be_opened.png")  # does not exist
    opened = []
    real_read_image = image_io.read_image

    def spy(path, *args, **kwargs):
        opened.append(path)
        return real_read_image(path, *args, **kwargs)

    def forbidden(path):
        raise AssertionError(f"a label was read in the unlabelled stream: {path}")

    monkeypatch.setattr(image_io, "read_image", spy)
    monkeypatch.setattr(image_io, "read_mask", forbidden)
    monkeypatch.setattr(mappers, "read_label", forbidden)
    mapper = UnlabeledMapper(scale_range=(0.5, 2.0), crop_size=(16, 16), flip_prob=0.5, **NO_STRONG)
    out = mapper(record, np.random.default_rng(0))
    assert opened == [record["file_name"]]
    assert "sem_seg" not in out and "sem_seg_file_name" not in out
    assert set(out) == {
        "image_weak", "image_strong1", "image_strong2", "cutmix_box1", "cutmix_box2",
        "ignore_mask", "file_name", "height", "width",
    }  # fmt: skip


def test_unlabeled_views_share_geometry_and_ignore_mask_marks_padding(tmp_path):
    record, image, _ = _write_sample(tmp_path, 20, 30)
    mapper = UnlabeledMapper(scale_range=(1.0, 1.0), crop_size=(24, 36), flip_prob=1.0, **NO_STRONG)
    out = mapper(record, np.random.default_rng(0))
    weak = out["image_weak"].permute(1, 2, 0).numpy()
    # Padded bottom/right, then flipped: the image ends up in the top-right corner.
    assert np.array_equal(weak[:20, 6:], image[:, ::-1])
    expected_pad = np.ones((24, 36), bool)
    expected_pad[:20, 6:] = False
    assert out["ignore_mask"].dtype == torch.bool
    assert np.array_equal(out["ignore_mask"].numpy(), expected_pad)
    assert (weak[expected_pad] == 0).all()
    # No photometric change requested: the strong views are the weak view.
    assert torch.equal(out["image_strong1"], out["image_weak"])
    assert torch.equal(out["image_strong2"], out["image_weak"])
    assert not out["cutmix_box1"].any() and out["cutmix_box1"].dtype == torch.bool


def test_strong_views_are_independent(tmp_path):
    record, _, _ = _write_sample(tmp_path, 24, 24)
    gray = dict(NO_STRONG, grayscale_prob=1.0)
    out = UnlabeledMapper(scale_range=(1, 1), crop_size=None, flip_prob=0, **gray)(
        record, np.random.default_rng(0)
    )
    s1 = out["image_strong1"]
    assert torch.equal(s1[0], s1[1]) and torch.equal(s1[1], s1[2]), "grayscale p=1"
    half = dict(NO_STRONG, color_jitter_prob=0.5, blur_prob=0.5, cutmix_prob=0.5)
    mapper = UnlabeledMapper(scale_range=(1, 1), crop_size=None, flip_prob=0, **half)
    differ = 0
    for seed in range(10):
        out = mapper(record, np.random.default_rng(seed))
        differ += not torch.equal(out["image_strong1"], out["image_strong2"])
    assert differ >= 5, "the two strong views draw their changes independently"


def test_brightness_jitter_scales_all_pixels_by_one_factor():
    image = np.random.default_rng(0).integers(20, 100, size=(16, 16, 3)).astype(np.uint8)
    out = np.asarray(
        color_jitter(Image.fromarray(image), (0.5, 0.0, 0.0, 0.0), np.random.default_rng(0))
    ).astype(np.float64)
    factor = out.sum() / image.astype(np.float64).sum()
    assert 0.5 <= factor <= 1.5 and abs(factor - 1) > 1e-3
    # One factor for every pixel (up to uint8 rounding).
    assert np.abs(out - image * factor).max() <= 1.0


def _blur(image, sigma):
    kwargs = dict(jitter_prob=0.0, jitter_strengths=(0, 0, 0, 0), grayscale_prob=0.0)
    return strong_view(
        image, np.random.default_rng(0), blur_prob=1.0, blur_sigma=(sigma, sigma), **kwargs
    ).astype(np.float64)


def test_blur_preserves_constant_images_and_spreads_symmetrically():
    flat = np.full((15, 15, 3), 77, dtype=np.uint8)
    assert (_blur(flat, 1.5) == 77).all()
    spot = np.zeros((31, 31, 3), dtype=np.uint8)
    spot[15, 15] = 255
    blurred = _blur(spot, 1.0)[..., 0]
    assert blurred[15, 15] < 255 and blurred[15, 16] > 0 and blurred[0, 0] == 0
    assert np.array_equal(blurred, blurred[:, ::-1]) and np.array_equal(blurred, blurred[::-1])
    assert abs(blurred.sum() - 255) < 255 * 0.1, "blurring keeps the total intensity"


def test_inference_mapper_keeps_size_and_optional_label(tmp_path):
    record, image, label = _write_sample(tmp_path, 21, 33)
    out = InferenceMapper()(record)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    assert np.array_equal(out["sem_seg"].numpy(), label)
    record.pop("sem_seg_file_name")
    out = InferenceMapper()(record)
    assert "sem_seg" not in out and (out["height"], out["width"]) == (21, 33)


def test_palette_labels_read_as_indices(tmp_path):
    record, _, label = _write_sample(tmp_path, 8, 8)
    palette_png = Image.fromarray(label, mode="P")
    palette_png.putpalette([v for i in range(256) for v in (i * 7 % 256, 50, 200)])
    palette_png.save(record["sem_seg_file_name"])
    assert np.array_equal(InferenceMapper()(record)["sem_seg"].numpy(), label)


def test_from_config_and_errors(tmp_path):
    cfg = add_hiervl_config(get_cfg())
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.SIZE = (16, 24)
    mapper = UnlabeledMapper(cfg, is_train=True)
    assert mapper.geometry.crop_size == (16, 24)
    assert mapper.cutmix_kwargs["area_range"] == tuple(cfg.INPUT.STRONG.CUTMIX_AREA)
    with pytest.raises(ValueError, match="InferenceMapper"):
        LabeledMapper(cfg, is_train=False)
    cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        LabeledMapper(cfg, is_train=True)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.TYPE = "relative"
    with pytest.raises(ValueError, match="INPUT.CROP.TYPE"):
        LabeledMapper(cfg, is_train=True)
    with pytest.raises(ValueError, match="SCALE_RANGE"):
        _labeled(scale=(2.0, 1.0))
    record, _, _ = _write_sample(tmp_path, 10, 10)
    record["width"] = 11
    with pytest.raises(ValueError, match=r"a.png is 10x10 .* its dataset record says 11x10"):
        _labeled()(record)
