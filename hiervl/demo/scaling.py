"""The demo's test scale without torch: the size rule, the image resize and the band-wise
bilinear upsampling of class probabilities, in numpy and OpenCV.

Shape letters: K classes, H×W the input image, h×w the test-scale image.

Shared by the PyTorch demo (:mod:`hiervl.demo.resize`, ``hiervl/demo/predictor.py``) and the
ONNX runner (``hiervl/tools/onnx_predict.py``, which must not import torch), so that both
resize an input the same way and label it at its own size the same way.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = [
    "bilinear_taps",
    "check_test_scale",
    "inference_size",
    "resize_image",
    "upsampled_labels_numpy",
]

# Elements of one band of upsampled probabilities (K x rows x W floats): 64 MB.
BAND_ELEMENTS = 1 << 24


def check_test_scale(min_size: int, max_size: int, source: str) -> None:
    """ValueError naming ``source`` unless ``min_size`` is 0 (no resizing) or positive with
    ``max_size`` >= it (detectron2's ResizeShortestEdge limits)."""
    if min_size < 0 or (min_size > 0 and max_size < min_size):
        raise ValueError(
            f"{source}: min size {min_size} / max size {max_size}: the shorter side "
            "(0 = no resizing) and a longer-side limit >= it"
        )


def inference_size(height: int, width: int, *, min_size: int, max_size: int) -> Tuple[int, int]:
    """(h, w): shorter side ``min_size``, longer side at most ``max_size``, aspect kept
    (detectron2's ``ResizeShortestEdge``); the input's own size when ``min_size`` is 0."""
    if min_size <= 0:
        return height, width
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H,W,3) uint8 → (h,w,3): area averaging when shrinking (no aliasing), bilinear when
    enlarging."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
    import cv2  # here: the export metadata imports this module on stacks without OpenCV

    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interpolation)


def bilinear_taps(out_len: int, in_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis (no
    antialiasing): for each of the ``out_len`` outputs, the two input indices (int64) and
    the float32 weight of the second; half-pixel centres, edges clamped."""
    source = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    source = np.maximum(source, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_len - 1)
    high = np.minimum(low + 1, in_len - 1)
    return low, high, (source - low).astype(np.float32)


def upsampled_labels_numpy(
    probs: np.ndarray,
    size: Tuple[int, int],
    *,
    threshold: float,
    unlabeled: int,
    band_elements: int = BAND_ELEMENTS,
) -> Tuple[np.ndarray, np.ndarray]:
    """Labels and confidence at ``size`` from class probabilities at the test scale.

    The numpy counterpart of :func:`hiervl.demo.resize.upsampled_labels` (same taps, same
    result): separable, along the width at the test scale's rows first (K×h×W, small), then
    along the height in bands of rows, one class at a time with a running maximum (numpy's
    argmax over a leading axis would copy the band), so that at most ``band_elements``
    full-size values exist at once.

    Args:
        probs: (K,h,w) per-pixel class distribution.
        size: (H, W) of the input.
        threshold: pixels whose top probability is below it get ``unlabeled``.
        unlabeled: the label of those pixels.
    Returns:
        labels (H,W) int64 (the first class on ties, as argmax) and confidence (H,W)
        float32.
    """
    num_classes, h, w = probs.shape
    height, width = size
    probs = np.asarray(probs, dtype=np.float32)
    if (h, w) != (height, width):
        cols_low, cols_high, cols_frac = bilinear_taps(width, w)
        left = probs[:, :, cols_low]
        wide = left + cols_frac * (probs[:, :, cols_high] - left)  # (K,h,W)
        rows_low, rows_high, rows_frac = bilinear_taps(height, h)
    labels = np.zeros((height, width), dtype=np.int64)
    confidence = np.empty((height, width), dtype=np.float32)
    band = max(1, band_elements // max(1, 2 * width))  # two (rows, W) buffers per class
    for top in range(0, height, band):
        rows = slice(top, min(top + band, height))
        best, best_label = confidence[rows], labels[rows]
        for k in range(num_classes):
            if (h, w) == (height, width):
                value = probs[k, rows]
            else:
                upper = wide[k, rows_low[rows]]
                value = wide[k, rows_high[rows]]
                value -= upper
                value *= rows_frac[rows, None]
                value += upper
            if k == 0:
                best[...] = value
                continue
            better = value > best
            best_label[better] = k
            np.maximum(best, value, out=best)
    labels[confidence < threshold] = unlabeled
    return labels, confidence
