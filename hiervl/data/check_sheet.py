"""``check.png`` of the dataset check: people look at their data rather than read about it.

One picture: a header with every class and its colour, then a grid of labelled samples
with their masks overlaid (the demo's visualiser: dataset colours, region names, a legend
of the classes present with their area share; ignore pixels grey), a row of val samples
drawn the same way and a row of unlabelled samples as they are. Samples are taken evenly
through each part (the same ones every run); files with problems are left out (the
printed report names them).
"""

import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from hiervl.data.image_io import read_image, read_mask
from hiervl.data.validation import IGNORE_LABEL, PartReport, SampleResult
from hiervl.demo.predictor import UNLABELED
from hiervl.demo.visualizer import DatasetPalette, SemanticVisualizer

TILE = 240
GAP = 8
COLUMNS = 4
CAPTION_HEIGHT = 20
TITLE_HEIGHT = 30
LABELLED_SHOWN, VAL_SHOWN, UNLABELLED_SHOWN = 8, 4, 4
BACKGROUND_BGR = (32, 32, 32)
TILE_BACKGROUND_BGR = (60, 60, 60)
TEXT_BGR = (235, 235, 235)
FONT = cv2.FONT_HERSHEY_SIMPLEX
CAPTION_SCALE, TITLE_SCALE = 0.42, 0.55
OVERLAY_ALPHA = 0.55
IGNORE_NAME = "ignore"
SWATCH = 14


def pick(results: Sequence[SampleResult], count: int) -> List[SampleResult]:
    """Up to ``count`` readable samples spread evenly over the part."""
    good = [r for r in results if not r.problems]
    if len(good) <= count or count < 2:
        return good[:count]
    return [good[round(i * (len(good) - 1) / (count - 1))] for i in range(count)]


def _fit(image: np.ndarray, interpolation: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = TILE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=interpolation)


def _text(canvas: np.ndarray, text: str, origin: Tuple[int, int], scale: float) -> None:
    cv2.putText(canvas, text, origin, FONT, scale, TEXT_BGR, 1, cv2.LINE_AA)


def _clipped(text: str, width: int, scale: float) -> str:
    """``text`` shortened from the left ("...tail") to fit ``width`` pixels."""
    while len(text) > 4 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        text = "..." + text[4:]
    return text


def _tile(picture: np.ndarray, caption: str) -> np.ndarray:
    tile = np.full((TILE + CAPTION_HEIGHT, TILE, 3), TILE_BACKGROUND_BGR, np.uint8)
    height, width = picture.shape[:2]
    top, left = (TILE - height) // 2, (TILE - width) // 2
    tile[top : top + height, left : left + width] = picture
    tile[TILE:] = BACKGROUND_BGR
    _text(tile, _clipped(caption, TILE - 4, CAPTION_SCALE), (2, TILE + 14), CAPTION_SCALE)
    return tile


def _labelled_tile(result: SampleResult, classes: Sequence[str], drawer) -> np.ndarray:
    image = _fit(read_image(result.sample.image, "BGR"), cv2.INTER_AREA)
    mask = _fit(read_mask(result.sample.mask), cv2.INTER_NEAREST).astype(np.int64)
    mask[mask == IGNORE_LABEL] = UNLABELED
    return _tile(drawer.draw(image, mask, classes), result.sample.id)


def _plain_tile(result: SampleResult) -> np.ndarray:
    image = _fit(read_image(result.sample.image, "BGR"), cv2.INTER_AREA)
    return _tile(image, result.sample.id)


def _grid(tiles: List[np.ndarray], title: str, width: int) -> np.ndarray:
    rows = max(1, -(-len(tiles) // COLUMNS))
    cell_h = TILE + CAPTION_HEIGHT
    block = np.full((TITLE_HEIGHT + rows * (cell_h + GAP), width, 3), BACKGROUND_BGR, np.uint8)
    _text(block, title, (GAP, TITLE_HEIGHT - 10), TITLE_SCALE)
    for i, tile in enumerate(tiles):
        row, column = divmod(i, COLUMNS)
        top = TITLE_HEIGHT + row * (cell_h + GAP)
        left = GAP + column * (TILE + GAP)
        block[top : top + cell_h, left : left + TILE] = tile
    return block


def _legend(classes: Sequence[str], colors_bgr: np.ndarray, title: str, width: int) -> np.ndarray:
    """Title line, then every class as ``[swatch] k name``, wrapped to ``width``."""
    entries = [
        (f"{k} {name}", tuple(int(c) for c in colors_bgr[k])) for k, name in enumerate(classes)
    ]
    entries.append((f"{IGNORE_LABEL} {IGNORE_NAME}", (128, 128, 128)))
    row_h = SWATCH + 8
    positions, x, y = [], GAP, TITLE_HEIGHT
    for text, _ in entries:
        text_w = cv2.getTextSize(text, FONT, CAPTION_SCALE, 1)[0][0]
        item_w = SWATCH + 6 + text_w + 16
        if x + item_w > width - GAP and x > GAP:
            x, y = GAP, y + row_h
        positions.append((x, y))
        x += item_w
    block = np.full((y + row_h + GAP, width, 3), BACKGROUND_BGR, np.uint8)
    _text(block, title, (GAP, TITLE_HEIGHT - 10), TITLE_SCALE)
    for (text, color), (x, y) in zip(entries, positions):
        cv2.rectangle(block, (x, y), (x + SWATCH, y + SWATCH), color, cv2.FILLED)
        _text(block, text, (x + SWATCH + 6, y + SWATCH - 2), CAPTION_SCALE)
    return block


def _section(
    reports: Sequence[PartReport], shown: int, what: str, width: int, make
) -> Optional[np.ndarray]:
    results = [r for report in reports for r in report.results]
    chosen = pick(results, shown)
    if not chosen:
        return None
    names = ", ".join(report.name for report in reports)
    title = f"{what}: {names} ({len(chosen)} of {len(results)} shown)"
    return _grid([make(r) for r in chosen], title, width)


def write_check_sheet(result, path: str, palette: Optional[DatasetPalette] = None) -> str:
    """Draw the sheet of a :class:`hiervl.data.check.CheckResult` to ``path``; returns it."""
    classes = result.classes
    drawer = SemanticVisualizer(alpha=OVERLAY_ALPHA, palette=palette, unlabeled_name=IGNORE_NAME)
    width = GAP + COLUMNS * (TILE + GAP)
    header = f"HierVL dataset check: {len(classes)} classes (masks overlaid, ignore grey)"
    blocks = [_legend(classes, drawer.colors_for(classes), header, width)]
    sections = (
        ("labelled", LABELLED_SHOWN, "labelled", True),
        ("evaluation", VAL_SHOWN, "val", True),
        ("unlabelled", UNLABELLED_SHOWN, "unlabelled (no masks)", False),
    )
    for role, shown, what, with_masks in sections:
        reports = [r for r in result.parts(role) if r.labelled == with_masks]
        if with_masks:
            block = _section(
                reports, shown, what, width, lambda r: _labelled_tile(r, classes, drawer)
            )
        else:
            block = _section(reports, shown, what, width, _plain_tile)
        if block is not None:
            blocks.append(block)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    if not cv2.imwrite(path, np.concatenate(blocks, axis=0)):
        raise ValueError(f"cannot write the check picture {path}")
    return path
