"""Images and masks: read one way everywhere (EXIF orientation applied, masks as stored),
and every unreadable file an error naming it.

Finding 3 of issue 10: records held the raw size but training read the EXIF-rotated
image, so a non-square orientation-6 photo crashed with detectron2's "check your
annotation" error whenever it was sampled. Finding 5: the demo wrote a prediction of half a
truncated JPEG and exited 0.
"""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from robustness_helpers import REPO, TINY_CONFIG, digest, snapshot

from hiervl.data.datasets.common import make_records
from hiervl.data.image_io import ImageReadError, image_size, read_image
from hiervl.data.mappers import InferenceMapper, LabeledMapper, UnlabeledMapper
from hiervl.evaluation.evaluator import HierVLSemSegEvaluator

ORIENTATION = 0x0112


def _photo(path, height, width, orientation):
    """A JPEG stored as height x width whose EXIF says ``orientation``; left half red."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2, 0] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, quality=100, exif=exif)
    return str(path)


def _mask(path, height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2] = 1  # top half: class 1 (drawn on the displayed photo)
    Image.fromarray(mask).save(path)
    return str(path)


def _labeled_mapper():
    return LabeledMapper(scale_range=(1.0, 1.0), crop_size=None, flip_prob=0.0)


def test_finding3_rotated_photo_with_raw_size_mask_names_both_files(tmp_path):
    photo = _photo(tmp_path / "phone.jpg", 64, 96, orientation=6)  # displayed 64 wide, 96 high
    mask = _mask(tmp_path / "phone.png", 64, 96)  # drawn on the stored pixels
    (record,) = make_records([photo], [mask], ["phone"])
    assert (record["height"], record["width"]) == (96, 64)  # the oriented size
    with pytest.raises(ValueError) as err:
        _labeled_mapper()(record, np.random.default_rng(0))
    assert str(err.value) == (
        f"mask {mask} is 96x64 but image {photo} is 64x96 (width x height, EXIF orientation "
        "applied; masks are never rotated)"
    )


def test_rotated_photo_with_a_mask_of_the_displayed_image_trains(tmp_path):
    photo = _photo(tmp_path / "phone.jpg", 64, 96, orientation=6)
    mask = _mask(tmp_path / "phone.png", 96, 64)
    (record,) = make_records([photo], [mask], ["phone"])
    out = _labeled_mapper()(record, np.random.default_rng(0))
    assert out["image"].shape == (3, 96, 64) and out["sem_seg"].shape == (96, 64)
    # Orientation 6 = rotate 90 degrees clockwise to display: the stored left half (red)
    # is the displayed top half, where the mask says class 1.
    red = out["image"][0].float()
    assert red[:40].mean() > 200 and red[56:].mean() < 50
    assert torch.equal(out["sem_seg"][:48], torch.ones(48, 64, dtype=torch.long))
    unlabeled = UnlabeledMapper(
        scale_range=(1.0, 1.0), crop_size=None, flip_prob=0.0, color_jitter_prob=0.0,
        color_jitter=(0, 0, 0, 0), grayscale_prob=0.0, blur_prob=0.0, blur_sigma=(0.1, 2.0),
        cutmix_prob=0.0, cutmix_area=(0.02, 0.4), cutmix_ratio=(0.3, 3.3),
    )  # fmt: skip
    weak = unlabeled(record, np.random.default_rng(0))["image_weak"]
    assert torch.equal(weak, out["image"])
    assert image_size(photo) == read_image(photo).shape[:2] == (96, 64)


def test_evaluator_compares_prediction_and_mask_of_the_same_size(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    photo = _photo(tmp_path / "phone.jpg", 64, 96, orientation=6)
    mask = _mask(tmp_path / "phone.png", 64, 96)  # raw-size mask
    name = "robustness_eval_rotated"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: make_records([photo], [mask], ["phone"]))
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255)
    record = DatasetCatalog.get(name)[0]
    with pytest.raises(ValueError, match=f"^mask {mask} is 96x64 but image {photo} is 64x96"):
        InferenceMapper()(record)  # the evaluation loader's reader says it first
    # The evaluator's own check (predictions from elsewhere): at the record's size.
    evaluator = HierVLSemSegEvaluator(name, distributed=False)
    evaluator.reset()
    item = {"file_name": photo, "height": record["height"], "width": record["width"]}
    prediction = {"sem_seg": torch.zeros(2, item["height"], item["width"])}
    with pytest.raises(ValueError) as err:
        evaluator.process([item], [prediction])
    assert str(err.value) == (
        f"evaluation: mask {mask} is 96x64 but the prediction for image {photo} is 64x96 "
        "(width x height, EXIF orientation applied; masks are never rotated)"
    )


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _png_header(width, height):
    """A PNG that announces width x height but holds no pixels (a decompression bomb's
    header: PIL must refuse it from the header alone)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _bytes(data):
    def write(path):
        path.write_bytes(data)
        return str(path)

    return write


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_truncated_jpeg, "corrupt or truncated file (image file is truncated"),
        (_bytes(b""), "not an image (cannot identify image file"),
        (_bytes(_png_header(30000, 30000)), "not an image (Image size (900000000 pixels) exceeds"),
        (_bytes(b"not an image"), "not an image (cannot identify image file"),
    ],
    ids=["truncated-jpeg", "zero-bytes", "decompression-bomb", "text-file"],
)
def test_unreadable_images_are_errors_naming_them_in_training(tmp_path, make, reason):
    path = make(tmp_path / "bad.jpg")
    good_mask = _mask(tmp_path / "bad.png", 96, 128)
    before = snapshot(tmp_path)
    with pytest.raises(ImageReadError) as err:
        record = {"file_name": path, "sem_seg_file_name": good_mask, "height": 96, "width": 128}
        _labeled_mapper()(record, np.random.default_rng(0))
    assert str(err.value).startswith(f"cannot read image {path}: {reason}")
    assert snapshot(tmp_path) == before


def test_float_and_16_bit_images(tmp_path):
    nan = np.full((4, 5), np.nan, np.float32)
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError) as err:
        read_image(str(tmp_path / "nan.tif"))
    assert str(err.value) == (
        f"cannot read image {tmp_path / 'nan.tif'}: floating-point pixels (PIL mode F) have no "
        "0-255 scale (and may hold NaN); save it as an 8- or 16-bit image"
    )
    sixteen = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")  # PIL would clip these at 255
    rgb = read_image(str(tmp_path / "deep.png"))
    np.testing.assert_array_equal(rgb[:, :, 1], np.round(sixteen / 257.0).astype(np.uint8))


def test_image_that_is_a_folder_or_a_symlink_loop(tmp_path):
    with pytest.raises(ImageReadError, match=rf"^cannot read image {tmp_path}: it is a folder$"):
        read_image(str(tmp_path))
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    with pytest.raises(ImageReadError, match=rf"^cannot read image {loop}: .*symbolic links"):
        image_size(str(loop))


def test_finding5_demo_reports_a_truncated_jpeg_and_goes_on(tmp_path, caplog):
    """The demo's command line (in-process, untrained tiny model): the truncated JPEG is
    reported by name, the other image is still processed, the exit status is 1."""
    import importlib.util

    import cv2

    truncated = _truncated_jpeg(tmp_path / "half.jpg")
    assert cv2.imread(truncated) is not None  # OpenCV decodes half of it without a word
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.full((40, 48, 3), 90, np.uint8))
    before = digest(truncated)
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "demo" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.setup_logger = lambda **kwargs: None
    out = tmp_path / "out"
    argv = [
        "--config-file",
        str(TINY_CONFIG),
        "--input",
        truncated,
        str(good),
        "--output",
        str(out),
    ]
    with caplog.at_level("ERROR"):
        assert script.main(argv) == 1
    assert (
        f"FAILED {truncated}: cannot read image {truncated}: corrupt or truncated file "
        "(image file is truncated" in caplog.text
    )
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]
    assert cv2.imread(str(out / "good.png")).shape == (40, 48, 3)
    assert digest(truncated) == before
