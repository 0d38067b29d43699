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
