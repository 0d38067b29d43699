"""The demo's test scale: resize the input like detectron2's ``DefaultPredictor``, and bring
the prediction back to the input's size without holding (K, H, W) at full resolution.

Shape letters: K classes, H×W the input image, h×w the test-scale image.

A 6000×4000 photo at its own resolution is thousands of sliding windows (an hour on a
CPU) and (K, 6000, 4000) score maps (gigabytes for 81 classes); the model was trained on
images of the dataset's scale anyway. The predictor therefore resizes the shorter side to
``INPUT.MIN_SIZE_TEST`` (longer side at most ``INPUT.MAX_SIZE_TEST``; 0 = no resizing),
runs the model there, and upsamples the class probabilities bilinearly band by band
(exactly ``F.interpolate(mode="bilinear", align_corners=False)``) to take the labels and the
confidence at every input pixel. The evaluator does not resize (the paper's protocol).
The torch-free pieces live in :mod:`hiervl.demo.scaling` (the ONNX runner uses them and
its numpy twin of :func:`upsampled_labels`).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

# The size rule and the image resize are torch-free (the ONNX runner shares them).
from hiervl.demo.scaling import BAND_ELEMENTS, bilinear_taps, inference_size, resize_image

__all__ = ["resize_image", "inference_size", "upsampled_labels"]

# Read at each call (the tests shrink it to exercise band edges).
_BAND_ELEMENTS = BAND_ELEMENTS


def _source_taps(out_len: int, in_len: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hiervl.demo.scaling.bilinear_taps` as tensors."""
    return tuple(torch.from_numpy(t) for t in bilinear_taps(out_len, in_len))


def upsampled_labels(
    probs: torch.Tensor, size: Tuple[int, int], *, threshold: float, unlabeled: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Labels and confidence at ``size`` from class probabilities at the test scale.

    Args:
        probs: (K,h,w) per-pixel class distribution.
        size: (H, W) of the input.
        threshold: pixels whose top probability is below it get ``unlabeled``.
        unlabeled: the label of those pixels.
    Returns:
        labels (H,W) int64 and confidence (H,W) float32: argmax / max over K of the
        bilinearly upsampled probabilities, computed in bands of rows.
    """
    k, h, w = probs.shape
    height, width = size
    if (h, w) == (height, width):
        confidence, labels = probs.max(dim=0)
    else:
        # Separable: along the width at the test scale's rows first (small), then along
        # the height band by band (the only full-size work).
        cols_low, cols_high, cols_frac = _source_taps(width, w)
        probs = probs.float()
        wide = torch.lerp(probs[:, :, cols_low], probs[:, :, cols_high], cols_frac)  # (K,h,W)
        rows_low, rows_high, rows_frac = _source_taps(height, h)
        labels = torch.empty((height, width), dtype=torch.long)
        confidence = torch.empty((height, width), dtype=torch.float32)
        band = max(1, _BAND_ELEMENTS // max(1, k * width))
        for top in range(0, height, band):
            rows = slice(top, min(top + band, height))
            frac = rows_frac[rows].view(1, -1, 1)
            full = torch.lerp(wide[:, rows_low[rows]], wide[:, rows_high[rows]], frac)
            torch.max(full, dim=0, out=(confidence[rows], labels[rows]))
    labels = labels.clone()
    labels[confidence < threshold] = unlabeled
    return labels.numpy().astype(np.int64), confidence.numpy()
