"""Seeded augmentation primitives shared by the training mappers.

Every random choice is drawn from an explicit ``numpy.random.Generator``, never from a
global RNG, so a sample's augmentation is a function of the generator's seed alone (the
loader seeds it from the global seed and the sample's position in its stream).

Shape letters: H, W image height/width before an operation, h, w after it. Images are
RGB ``uint8`` arrays (H, W, 3); labels are integer arrays (H, W); CutMix boxes are bool
tensors (H, W).
"""

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

# Attempts at drawing a CutMix aspect ratio whose box fits the image before the box is
# clipped to the image instead (only reachable for extreme ratio ranges).
_CUTMIX_MAX_TRIES = 100


def random_rescale(
    image: np.ndarray,
    label: Optional[np.ndarray],
    scale_range: Sequence[float],
    rng: np.random.Generator,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize by a ratio drawn uniformly from ``scale_range`` of the image's own size.

    Args:
        image: (H, W, 3) uint8.
        label: (H, W) integer class ids, or None; resized with nearest neighbour so no new
            class ids appear.
    Returns:
        (image (h, w, 3), label (h, w) or None) with h = round(H·r), w = round(W·r).
    """
    ratio = rng.uniform(scale_range[0], scale_range[1])
    height, width = image.shape[:2]
    new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    if (new_h, new_w) == (height, width):
        return image, label
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    if label is not None:
        label = resize_nearest(label, new_h, new_w)
    return resized, label


def resize_nearest(label: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) array of any integer dtype to (new_h, new_w)."""
    height, width = label.shape
    rows = np.minimum(((np.arange(new_h) + 0.5) * height / new_h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * width / new_w).astype(np.int64), width - 1)
    return label[rows[:, None], cols[None, :]]


def random_crop_with_pad(
    image: np.ndarray,
    label: Optional[np.ndarray],
    crop_size: Sequence[int],
    rng: np.random.Generator,
    *,
    image_pad: int,
    label_pad: int,
) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Pad bottom/right up to ``crop_size`` where needed, then crop a random window.

    Args:
        image: (H, W, 3) uint8; label: (H, W) or None.
        crop_size: (h, w) of the output.
        image_pad / label_pad: fill values of the padded area (0 and the ignore label).
    Returns:
        image (h, w, 3), label (h, w) or None, padded (h, w) bool: True where the pixel was
        padding (for the unlabelled stream, whose pseudo-labels must ignore it).
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    height, width = image.shape[:2]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    padded = np.zeros((height + pad_h, width + pad_w), dtype=bool)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=image_pad)
        if label is not None:
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=label_pad)
        padded[height:, :] = True
        padded[:, width:] = True
    top = int(rng.integers(0, image.shape[0] - crop_h + 1))
    left = int(rng.integers(0, image.shape[1] - crop_w + 1))
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    image = image[window]
    if label is not None:
        label = label[window]
    return image, label, padded[window]


def color_jitter(image: Image.Image, strengths: Sequence[float], rng: np.random.Generator):
    """torchvision-style colour jitter with factors drawn from ``rng``.

    Brightness, contrast and saturation factors are uniform in [max(0, 1-s), 1+s], the hue
    shift uniform in [-s_hue, s_hue]; the four adjustments run in a random order (as
    ``torchvision.transforms.ColorJitter``). A zero strength skips that adjustment.

    Args:
        image: RGB PIL image.
        strengths: (brightness, contrast, saturation, hue).
    Returns:
        The jittered RGB PIL image.
    """
    brightness, contrast, saturation, hue = (float(s) for s in strengths)
    ops = []
    if brightness > 0:
        factor = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        ops.append(lambda img, f=factor: TF.adjust_brightness(img, f))
    if contrast > 0:
        factor = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        ops.append(lambda img, f=factor: TF.adjust_contrast(img, f))
    if saturation > 0:
        factor = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
        ops.append(lambda img, f=factor: TF.adjust_saturation(img, f))
    if hue > 0:
        shift = rng.uniform(-hue, hue)
        ops.append(lambda img, f=shift: TF.adjust_hue(img, f))
    for index in rng.permutation(len(ops)):
        image = ops[index](image)
    return image


def strong_view(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    jitter_prob: float,
    jitter_strengths: Sequence[float],
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
) -> np.ndarray:
    """UniMatch's strong photometric view: jitter, then grayscale, then Gaussian blur, each
    with its own probability.

    Runs on PIL (single-threaded C code): cheap in loader workers and unaffected by
    torch's intra-op thread pool when the loader runs in the main process.

    Args:
        image: (h, w, 3) uint8 RGB.
    Returns:
        (h, w, 3) uint8 RGB.
    """
    view = Image.fromarray(image)
    if rng.random() < jitter_prob:
        view = color_jitter(view, jitter_strengths, rng)
    if rng.random() < grayscale_prob:
        view = view.convert("L").convert("RGB")
    if rng.random() < blur_prob:
        # Pillow's GaussianBlur radius is the standard deviation.
        view = view.filter(ImageFilter.GaussianBlur(float(rng.uniform(*blur_sigma))))
    return np.asarray(view)


def sample_cutmix_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    prob: float,
    area_range: Sequence[float],
    ratio_range: Sequence[float],
) -> torch.Tensor:
    """Draw one CutMix box (or none, with probability 1 - ``prob``).

    The box covers a fraction of the image drawn uniformly from ``area_range`` and has
    aspect ratio box_h / box_w drawn uniformly from ``ratio_range``; ratios whose box would
    not fit are redrawn, and the position is uniform over the positions where it fits.

    Returns:
        (height, width) bool, True inside the box (where the partner image is pasted).
    """
    box = torch.zeros(height, width, dtype=torch.bool)
    if rng.random() >= prob:
        return box
    area = rng.uniform(area_range[0], area_range[1]) * height * width
    for _ in range(_CUTMIX_MAX_TRIES):
        ratio = rng.uniform(ratio_range[0], ratio_range[1])
        box_h = max(1, round(math.sqrt(area * ratio)))
        box_w = max(1, round(math.sqrt(area / ratio)))
        if box_h <= height and box_w <= width:
            break
    box_h, box_w = min(box_h, height), min(box_w, width)
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    box[top : top + box_h, left : left + box_w] = True
    return box
