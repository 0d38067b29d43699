"""The one image reader of the project: validation, training, evaluation and the demo.

Photos carry an EXIF orientation tag (phones store the sensor's pixels and say "rotate 90°
to display"). HierVL applies it the same way everywhere, as detectron2's ``read_image``
does, so an image has one size and one orientation wherever it is read:

* :func:`read_image` decodes the whole file and applies the orientation; a truncated or
  corrupt file is an :class:`ImageReadError` naming it (never half an image);
* :func:`image_size` is the oriented (height, width) from the header alone (dataset
  records, cheap for thousands of files);
* :func:`read_mask` reads a label map's stored values and never rotates it: masks are
  drawn on the displayed image, and an EXIF tag in a mask file is not an instruction.

Only PIL and numpy are used (no torch, no detectron2), so deployment code can read images
the same way.
"""

from typing import Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# EXIF tag 0x0112 (Orientation). Values 5-8 include a quarter turn: width and height swap.
_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Every failure PIL reports for a missing, unknown, truncated or corrupt file.
_PIL_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)
# 16-bit grey images (e.g. microscopy PNG/TIFF): scaled to 8 bits by read_image.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Channel orders :func:`read_image` returns.
FORMATS = ("RGB", "BGR")


class ImageReadError(ValueError):
    """An image or mask file that cannot be read completely (message names the file)."""


def _open(path: str, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageReadError(f"cannot read {what} {path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read {what} {path}: it is a folder") from None
    except _PIL_ERRORS as e:
        raise ImageReadError(f"cannot read {what} {path}: not an image ({e})") from None


def _decode(image: Image.Image, path: str, what: str) -> None:
    """Decode every pixel; PIL raises on a truncated file unless LOAD_TRUNCATED_IMAGES."""
    try:
        image.load()
    except _PIL_ERRORS as e:
        message = f"cannot read {what} {path}: corrupt or truncated file ({e})"
        raise ImageReadError(message) from None


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 = as stored, also when there is no tag)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except _PIL_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_image(path: str, format: str = "RGB") -> np.ndarray:
    """The whole image, EXIF orientation applied.

    Args:
        path: an image file in any format PIL reads (grey, palette, CMYK and alpha images
            are converted, alpha is dropped; 16-bit grey is scaled to 8 bits).
        format: "RGB" or "BGR" (OpenCV's order) channel order.
    Returns:
        (H, W, 3) uint8 array, H x W the displayed (oriented) size.
    Raises:
        ImageReadError: missing, not an image, truncated or corrupt, or pixels without a
            0-255 scale (floating-point, 32-bit integer) (names ``path``).
    """
    if format not in FORMATS:
        raise ValueError(f"read_image: format must be one of {FORMATS}, got {format!r}")
    with _open(path, "image") as image:
        _decode(image, path, "image")
        oriented = ImageOps.exif_transpose(image)
        rgb = _to_rgb(oriented, path)
    return np.ascontiguousarray(rgb[:, :, ::-1]) if format == "BGR" else rgb


def _to_rgb(image: Image.Image, path: str) -> np.ndarray:
    """(H, W, 3) uint8. PIL's own conversion clips 16-bit grey at 255 (an almost white
    image) and maps float NaN to 0; those modes are scaled or refused here instead."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("F", "I"):
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        raise ImageReadError(
            f"cannot read image {path}: {kind} pixels (PIL mode {image.mode}) have no 0-255 "
            "scale (and may hold NaN); save it as an 8- or 16-bit image"
        )
    return np.asarray(image.convert("RGB"))


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of the displayed image, from the header (nothing decoded).

    Equals ``read_image(path).shape[:2]`` for every readable file.
    """
    with _open(path, "image") as image:
        width, height = image.size
        if orientation(image) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width


def read_mask(path: str) -> np.ndarray:
    """A label map's stored values, never rotated.

    Palette PNGs give their indices (VOC), grey PNGs their values. A mask must be a single
    channel of class ids.

    Returns:
        (H, W) integer array (uint8 for 8-bit masks).
    Raises:
        ImageReadError: missing, unreadable, truncated, or not single-channel.
    """
    with _open(path, "mask") as image:
        _decode(image, path, "mask")
        mask = np.asarray(image)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ImageReadError(
            f"mask {path} has shape {mask.shape}; expected a single-channel image of class ids "
            "(convert colour-coded masks with the dataset's prepare script)"
        )
    return mask
