"""Colour overlay of a semantic label map, with class names on the regions and a legend.

Shape letters: K classes, H×W the image.

Drawn with OpenCV on BGR images (the demo reads and writes with cv2), at the image's own
size so that a video keeps its frame size. Text size follows the image size; every label
has a dark outline so it reads on any colour.

numpy and OpenCV only (no torch): the ONNX runner (``hiervl.tools.onnx_predict``) draws
the same overlays without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from hiervl.data.generated_colors import generated_palette

__all__ = [
    "UNLABELED",
    "DatasetPalette",
    "LegendEntry",
    "SemanticVisualizer",
    "class_colors",
    "legend_entries",
]

# Label of pixels whose most likely class is less probable than the confidence threshold
# (the predictor's and the ONNX runner's convention; re-exported by hiervl.demo.predictor).
UNLABELED = -1

UNLABELED_NAME = "unlabelled"
UNLABELED_COLOR_BGR = (128, 128, 128)

FONT = cv2.FONT_HERSHEY_SIMPLEX
# Font scale = shorter image side / TEXT_REFERENCE_SIDE, clipped: 0.8 on a 480p frame.
TEXT_REFERENCE_SIDE = 600.0
MIN_FONT_SCALE = 0.3
MAX_FONT_SCALE = 1.5
TEXT_COLOR_BGR = (255, 255, 255)
OUTLINE_COLOR_BGR = (0, 0, 0)
# A region gets its name written when it covers at least this fraction of the image;
# each class is named on at most MAX_NAMES_PER_CLASS of its largest regions.
MIN_NAMED_REGION_FRACTION = 0.01
MAX_NAMES_PER_CLASS = 3
LEGEND_BACKGROUND_OPACITY = 0.6
# The legend may cover at most this share of the image height (extra rows become "+n more").
LEGEND_MAX_HEIGHT_FRACTION = 0.5


def class_colors(num_classes: int) -> np.ndarray:
    """(K,3) uint8 BGR colours, deterministic and distinct (golden-ratio hues): the colours
    of a vocabulary that has no dataset palette."""
    colors = np.asarray(generated_palette(num_classes), dtype=np.uint8).reshape(-1, 3)
    return np.ascontiguousarray(colors[:, ::-1])


@dataclass(frozen=True)
class DatasetPalette:
    """A dataset's colours for its class list (``stuff_colors`` metadata, RGB)."""

    class_names: Tuple[str, ...]
    colors_rgb: Tuple[Tuple[int, int, int], ...]

    @classmethod
    def from_metadata(cls, metadata) -> Optional[DatasetPalette]:
        """From detectron2 metadata with ``stuff_classes`` and ``stuff_colors`` (None
        when it has no colours)."""
        names = metadata.get("stuff_classes", None)
        colors = metadata.get("stuff_colors", None)
        if not names or not colors:
            return None
        if len(colors) != len(names):
            raise ValueError(f"{len(colors)} stuff_colors for {len(names)} stuff_classes")
        return cls(tuple(names), tuple(tuple(int(v) for v in c) for c in colors))

    def colors_for(self, class_names: Sequence[str]) -> Optional[np.ndarray]:
        """(K,3) uint8 BGR when ``class_names`` is this palette's class list, else None."""
        if tuple(class_names) != self.class_names:
            return None
        return np.asarray(self.colors_rgb, dtype=np.uint8)[:, ::-1].copy()


@dataclass
class _Font:
    scale: float
    thickness: int


@dataclass
class _Legend:
    """Layout of the legend box (pixels); ``swatches[r]`` is the class of row r or None."""

    rows: List[str]
    swatches: List[Optional[int]]
    pad: int
    row_height: int
    text_height: int
    width: int
    height: int


@dataclass
class LegendEntry:
    """One legend row: class index (``UNLABELED`` for unlabelled pixels), name, area share."""

    index: int
    name: str
    fraction: float


def legend_entries(
    labels: np.ndarray, class_names: Sequence[str], unlabeled_name: str = UNLABELED_NAME
) -> List[LegendEntry]:
    """Classes present in ``labels`` (H,W), largest area first; unlabelled pixels last."""
    total = labels.size
    indices, counts = np.unique(labels, return_counts=True)
    entries = []
    for k, count in zip(indices.tolist(), counts.tolist()):
        if k == UNLABELED:
            continue
        if not 0 <= k < len(class_names):
            raise ValueError(f"label {k} outside the vocabulary of {len(class_names)} classes")
        entries.append(LegendEntry(k, class_names[k], count / total))
    entries.sort(key=lambda e: (-e.fraction, e.index))
    unlabeled = int((labels == UNLABELED).sum())
    if unlabeled:
        entries.append(LegendEntry(UNLABELED, unlabeled_name, unlabeled / total))
    return entries


class SemanticVisualizer:
    """Blend class colours into a BGR image, name the regions, add a legend."""

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        draw_names: bool = True,
        draw_legend: bool = True,
        palette: Optional[DatasetPalette] = None,
        unlabeled_name: str = UNLABELED_NAME,
    ):
        """
        Args:
            alpha: opacity of the class colours, in [0, 1] (0 = image only).
            draw_names: write class names on the larger regions.
            draw_legend: legend of the classes present (top-left corner).
            palette: the dataset's colours, used whenever the class list is the
                dataset's; other vocabularies get :func:`class_colors`.
            unlabeled_name: legend name of ``UNLABELED`` pixels.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.draw_names = draw_names
        self.draw_legend = draw_legend
        self.palette = palette
        self.unlabeled_name = unlabeled_name

    def colors_for(self, class_names: Sequence[str]) -> np.ndarray:
        """(K,3) uint8 BGR: the palette's when it is for these classes, else generated."""
        colors = self.palette.colors_for(class_names) if self.palette is not None else None
        return colors if colors is not None else class_colors(len(class_names))

    def draw(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        colors: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """
        Args:
            image: (H,W,3) uint8 BGR.
            labels: (H,W) int class indices, ``UNLABELED`` (-1) where nothing is shown.
            class_names: the K names.
            colors: (K,3) uint8 BGR; default :meth:`colors_for`.

        Returns:
            (H,W,3) uint8 BGR, the same size as ``image``.
        """
        if image.shape[:2] != labels.shape:
            raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
        if colors is None:
            colors = self.colors_for(class_names)
        labelled = labels != UNLABELED
        color_map = image.copy()
        color_map[labelled] = colors[labels[labelled]]
        out = cv2.addWeighted(color_map, self.alpha, image, 1.0 - self.alpha, 0.0)
        font = self._font(image.shape[:2])
        entries = legend_entries(labels, class_names, self.unlabeled_name)
        legend = self._legend_layout(entries, image.shape[:2], font) if self.draw_legend else None
        if self.draw_names:
            corner = (legend.width, legend.height) if legend is not None else (0, 0)
            for entry in entries:
                if entry.index != UNLABELED:
                    self._name_regions(out, labels == entry.index, corner, entry.name, font)
        if legend is not None:
            self._draw_legend(out, legend, colors, font)
        return out

    @staticmethod
    def _font(size: Tuple[int, int]) -> _Font:
        scale = float(np.clip(min(size) / TEXT_REFERENCE_SIDE, MIN_FONT_SCALE, MAX_FONT_SCALE))
        return _Font(scale, max(1, round(scale * 2)))

    @staticmethod
    def _text(image, text: str, origin: Tuple[int, int], font: _Font) -> None:
        """White text with a dark outline, ``origin`` = bottom-left of the text."""
        s, t = font.scale, font.thickness
        cv2.putText(image, text, origin, FONT, s, OUTLINE_COLOR_BGR, t + 2, cv2.LINE_AA)
        cv2.putText(image, text, origin, FONT, s, TEXT_COLOR_BGR, t, cv2.LINE_AA)

    def _name_regions(self, out, mask: np.ndarray, corner: Tuple[int, int], name: str, font: _Font):
        """Write ``name`` inside the largest connected regions of ``mask`` (H,W) bool, at
        the point of each region farthest from its border where the text stays clear of
        the top-left ``corner`` (width, height) kept for the legend."""
        height, width = mask.shape
        mask8 = mask.astype(np.uint8)
        count, components, stats, _ = cv2.connectedComponentsWithStats(mask8, connectivity=8)
        min_area = MIN_NAMED_REGION_FRACTION * height * width
        # Component 0 is the complement of the mask.
        regions = sorted(range(1, count), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
        regions = [i for i in regions if stats[i, cv2.CC_STAT_AREA] >= min_area]
        if not regions:
            return
        # The farthest point from the border is inside the region, even for rings; the
        # zero frame makes the image border count as a region border.
        framed = cv2.copyMakeBorder(mask8, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        distance = cv2.distanceTransform(framed, cv2.DIST_L2, 3)[1:-1, 1:-1]
        (text_w, text_h), baseline = cv2.getTextSize(name, FONT, font.scale, font.thickness)
        # A name wider or taller than its region would hide more than it explains.
        regions = [
            i
            for i in regions
            if stats[i, cv2.CC_STAT_WIDTH] >= text_w and stats[i, cv2.CC_STAT_HEIGHT] >= text_h
        ]
        free = np.ones_like(mask)
        free[: corner[1] + text_h // 2 + 1, : corner[0] + text_w // 2 + 1] = False
        for i in regions[:MAX_NAMES_PER_CLASS]:
            inside = np.where((components == i) & free, distance, 0.0)
            if inside.max() <= 0:
                continue
            y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
            left = int(np.clip(x - text_w // 2, 0, max(width - text_w, 0)))
            bottom = int(np.clip(y + text_h // 2, text_h, height - baseline))
            self._text(out, name, (left, bottom), font)

    def _legend_layout(
        self, entries: List[LegendEntry], size: Tuple[int, int], font: _Font
    ) -> Optional[_Legend]:
        """Rows ``[swatch] name  p%``; rows that do not fit are summarised as ``+n more``.
        None when the image is too small for two rows."""
        if not entries:
            return None
        height, width = size
        (_, text_h), baseline = cv2.getTextSize("Ag", FONT, font.scale, font.thickness)
        pad = max(2, text_h // 3)
        row_h = text_h + baseline + pad
        max_rows = int(LEGEND_MAX_HEIGHT_FRACTION * height - pad) // row_h
        if max_rows < min(2, len(entries)):
            return None  # too small an image: the legend would hide it
        rows = [f"{e.name} {100 * e.fraction:.0f}%" for e in entries]
        swatches = [e.index for e in entries]
        if len(entries) > max_rows:
            rows = rows[: max_rows - 1] + [f"+{len(entries) - max_rows + 1} more"]
            swatches = swatches[: max_rows - 1] + [None]
        text_w = max(cv2.getTextSize(r, FONT, font.scale, font.thickness)[0][0] for r in rows)
        return _Legend(
            rows=rows,
            swatches=swatches,
            pad=pad,
            row_height=row_h,
            text_height=text_h,
            width=min(width, 3 * pad + text_h + text_w),
            height=min(height, pad + len(rows) * row_h),
        )

    def _draw_legend(self, out, legend: _Legend, colors: np.ndarray, font: _Font) -> None:
        """Translucent dark box in the top-left corner, a colour swatch per class row."""
        region = out[: legend.height, : legend.width]
        region[:] = (region * (1.0 - LEGEND_BACKGROUND_OPACITY)).astype(np.uint8)
        pad, swatch = legend.pad, legend.text_height
        for r, (text, k) in enumerate(zip(legend.rows, legend.swatches)):
            top = pad + r * legend.row_height
            if k is not None:
                color = UNLABELED_COLOR_BGR if k == UNLABELED else tuple(int(c) for c in colors[k])
                cv2.rectangle(out, (pad, top), (pad + swatch, top + swatch), color, cv2.FILLED)
            self._text(out, text, (2 * pad + swatch, top + legend.text_height), font)
