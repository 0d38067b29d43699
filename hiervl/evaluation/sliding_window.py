"""Sliding-window semantic inference (plain PyTorch).

Shape letters: B batch, K classes, H×W the image, h×w one window (``crop``).

Windows of ``crop × crop`` are placed every ``stride`` pixels (the last window of a
row/column is shifted back so it ends at the border); scores of overlapping windows
are averaged. Along a side shorter than ``crop`` the window is the whole side (no
padding to the crop size, as in mmsegmentation's slide inference), so a window that
covers the image gives exactly whole-image inference.
"""

from typing import Callable, List, Optional

import torch


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of the windows along one axis of ``length`` (>= ``crop``) pixels."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"sliding window needs crop > 0 and stride > 0, got {crop}, {stride}")
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    starts.append(length - crop)
    return starts


def sliding_window_inference(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    crop: int,
    stride: int,
    num_classes: int,
    progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Run ``predict`` on overlapping windows and average the overlaps.

    Args:
        predict: maps windows (B,3,h,w) to scores (B,K,h,w) at the window's size.
        images: (B,3,H,W) normalised images.
        crop: window size (square).
        stride: distance between window starts (``crop // 2`` = 50% overlap).
        num_classes: K, used to allocate the accumulator.
        progress: called as ``progress(done, total)`` after each window (a progress bar).
    Returns:
        (B,K,H,W) averaged scores.
    """
    b, _, height, width = images.shape
    scores = images.new_zeros((b, num_classes, height, width))
    counts = images.new_zeros((1, 1, height, width))
    win_h, win_w = min(crop, height), min(crop, width)
    windows = [
        (top, left)
        for top in window_starts(height, win_h, stride)
        for left in window_starts(width, win_w, stride)
    ]
    for done, (top, left) in enumerate(windows, start=1):
        window = images[:, :, top : top + win_h, left : left + win_w]
        out = predict(window)
        assert out.shape == (b, num_classes, win_h, win_w), (
            f"predict returned {tuple(out.shape)}, expected {(b, num_classes, win_h, win_w)}"
        )
        scores[:, :, top : top + win_h, left : left + win_w] += out
        counts[:, :, top : top + win_h, left : left + win_w] += 1
        if progress is not None:
            progress(done, len(windows))
    return scores / counts
