"""The one image reader: EXIF orientation applied everywhere, masks never rotated, every
unreadable file an error naming it."""

import numpy as np
import pytest
from PIL import Image

from hiervl.data.image_io import ImageReadError, image_size, read_image, read_mask


def _photo(path, width=40, height=24, orientation=None, fmt="JPEG"):
    """A photo whose left half is red and right half blue, as stored (before EXIF)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, fmt, exif=exif, quality=95)
    return pixels


def test_exif_orientation_6_rotates_the_image_and_its_size(tmp_path):
    path = str(tmp_path / "phone.jpg")
    _photo(path, orientation=6)
    image = read_image(path)
    # Orientation 6: displayed = stored rotated 90° clockwise; 40x24 stored -> 24 wide, 40 high.
    assert image.shape == (40, 24, 3)
    assert image_size(path) == (40, 24)
    # The stored left (red) half is the displayed top half after a clockwise turn.
    assert image[5, 12, 0] > 200 and image[5, 12, 2] < 60
    assert image[35, 12, 2] > 200 and image[35, 12, 0] < 60


def test_no_orientation_and_bgr_order(tmp_path):
    path = str(tmp_path / "plain.png")
    pixels = _photo(path, fmt="PNG")
    np.testing.assert_array_equal(read_image(path), pixels)
    np.testing.assert_array_equal(read_image(path, "BGR"), pixels[:, :, ::-1])
    assert image_size(path) == (24, 40)
    with pytest.raises(ValueError, match="format must be one of"):
        read_image(path, "HSV")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_equals_the_decoded_shape_for_every_orientation(tmp_path, orientation):
    path = str(tmp_path / f"o{orientation}.jpg")
    _photo(path, orientation=orientation)
    assert image_size(path) == read_image(path).shape[:2]


def test_masks_are_never_rotated(tmp_path):
    path = str(tmp_path / "mask.png")
    values = np.arange(24 * 40, dtype=np.uint8).reshape(24, 40) % 7
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(values).save(path, exif=exif)
    np.testing.assert_array_equal(read_mask(path), values)


def test_palette_masks_give_indices(tmp_path):
    path = str(tmp_path / "voc.png")
    values = np.array([[0, 1], [15, 255]], np.uint8)
    image = Image.fromarray(values, mode="P")
    image.putpalette([200, 10, 10] * 256)
    image.save(path)
    np.testing.assert_array_equal(read_mask(path), values)


def test_colour_masks_are_refused(tmp_path):
    path = str(tmp_path / "colour.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ImageReadError, match=r"colour.png has shape \(4, 4, 3\); expected"):
        read_mask(path)


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "half.jpg"
    _photo(str(path), width=256, height=256)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cannot read image .*half.jpg: corrupt or truncated"):
        read_image(str(path))


def test_non_images_and_missing_files(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match=r"notes.jpg: not an image"):
        read_image(str(text))
    with pytest.raises(ImageReadError, match=r"notes.jpg: not an image"):
        image_size(str(text))
    with pytest.raises(ImageReadError, match=r"missing.png: no such file"):
        read_mask(str(tmp_path / "missing.png"))
    with pytest.raises(ImageReadError, match="it is a folder"):
        read_image(str(tmp_path))
