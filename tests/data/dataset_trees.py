"""Tiny on-disk dataset trees for the registration tests (real layouts, few pixels)."""

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# Smallest sizes that still let a test tell height from width.
HEIGHT, WIDTH = 6, 8


def write_image(path: str, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path: str, label: np.ndarray, palette: Optional[Sequence[int]] = None) -> None:
    """Single-channel PNG; with ``palette`` a palette ("P") PNG like VOC's originals."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    if palette is None:
        Image.fromarray(label).save(path)
        return
    image = Image.new("P", (label.shape[1], label.shape[0]))
    image.putpalette(list(palette))
    image.frombytes(label.tobytes())
    image.save(path)


def read_label(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def touch(path: str) -> None:
    """An empty file: enough for tests that only list a folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def write_photo(path: str, width: int, height: int, orientation: Optional[int] = None) -> None:
    """A JPEG stored ``width`` x ``height`` with an optional EXIF orientation tag (phones)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", exif=exif, quality=90)


def truncate(path: str) -> None:
    """Cut a file in half (a download that stopped)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write_user_tree(
    root: str,
    *,
    labeled: int = 6,
    unlabeled: int = 10,
    val: int = 4,
    size: int = 64,
) -> str:
    """The built-in synthetic data laid out as a user's folders (the "parts" layout):
    ``labeled/{images,masks}``, ``unlabeled/images/{phone,camera}/`` bare JPEGs (no masks,
    two nested sub-folders, ``.jpg`` and ``.jpeg``), ``val/{images,masks}`` and
    ``classes.txt``. Returns ``root``."""
    from hiervl.data.datasets.synthetic import CLASSES, render_sample

    def save(split: str, index: int, image_path: str, mask_path: Optional[str]) -> None:
        image, label = render_sample(0, split, index, size)
        os.makedirs(os.path.dirname(image_path), exist_ok=True)
        Image.fromarray(image).save(image_path, "JPEG", quality=90)
        if mask_path is not None:
            write_label(mask_path, label)

    for i in range(labeled):
        stem = f"lab{i:03d}"
        save("train", i, f"{root}/labeled/images/{stem}.jpg", f"{root}/labeled/masks/{stem}.png")
    for i in range(unlabeled):
        sub, ext = ("phone", ".jpg") if i % 2 == 0 else ("camera", ".jpeg")
        save("train", labeled + i, f"{root}/unlabeled/images/{sub}/un{i:03d}{ext}", None)
    for i in range(val):
        stem = f"val{i:03d}"
        save("val", i, f"{root}/val/images/{stem}.jpg", f"{root}/val/masks/{stem}.png")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("# one name per line, index 0 first\n" + "\n".join(CLASSES) + "\n")
    return root
