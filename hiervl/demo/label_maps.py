"""Predictions saved as label maps (``demo/demo.py --save-masks DIR``).

One single-channel 8-bit PNG per input image (per frame of a video): value k = class k of
the vocabulary, the dataset's ignore value (255) where ``--confidence-threshold`` left the
pixel unlabelled, the input's own size. These are exactly the masks a custom dataset
reads (:mod:`hiervl.data.datasets.custom`), so predictions can be reviewed, corrected by
hand and added to the labelled part without conversion: that is how users pseudo-label.

Names follow the inputs: ``DIR/<path below the inputs' common folder>/<stem>.png``, so
the label maps of ``unlabeled/images/**`` mirror that tree like a ``masks`` folder.
Frames of ``clip.mp4`` go to ``DIR/clip/000000.png, 000001.png, ...``. With overlays on,
the coloured picture is written beside each map as ``<stem>_overlay.jpg`` (never a
``.png``, so a masks folder holds masks only).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence

import cv2
import numpy as np

from hiervl.demo.visualizer import UNLABELED

__all__ = ["LabelMapWriter", "ignore_value", "label_map", "vocabulary_metadata"]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
MASK_SUFFIX = ".png"
OVERLAY_SUFFIX = "_overlay.jpg"
FRAME_DIGITS = 6


def label_map(labels: np.ndarray, *, num_classes: int, ignore_label: int) -> np.ndarray:
    """(H,W) int class indices with ``UNLABELED`` -> (H,W) uint8 mask values."""
    if labels.size and (labels.max() >= num_classes or labels.min() < UNLABELED):
        raise ValueError(
            f"labels outside 0..{num_classes - 1} (and {UNLABELED} = unlabelled): "
            f"{labels.min()}..{labels.max()}"
        )
    out = labels.astype(np.uint8)
    out[labels == UNLABELED] = ignore_label
    return out


class LabelMapWriter:
    """Writes label maps (and optionally overlays) for the demo's inputs."""

    def __init__(
        self,
        folder: str,
        *,
        num_classes: int,
        ignore_label: int = IGNORE_LABEL,
        overlays: bool = False,
        inputs: Sequence[str] = (),
    ):
        """
        Args:
            folder: where the label maps go (created).
            num_classes: K of the vocabulary; class k is written as value k.
            ignore_label: the value of unlabelled pixels (the dataset's ignore value).
            overlays: also write ``<stem>_overlay.jpg`` beside each map.
            inputs: every input image path, to name the maps below their common folder.
        """
        if not 0 <= ignore_label <= 255:
            raise ValueError(f"the ignore value {ignore_label} does not fit an 8-bit label map")
        if num_classes > ignore_label:
            raise ValueError(
                f"--save-masks writes 8-bit PNGs with {ignore_label} = ignore: at most "
                f"{ignore_label} classes, the vocabulary has {num_classes}"
            )
        self.folder = folder
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.overlays = overlays
        self._names = self._plan(list(inputs))

    def _plan(self, inputs: Sequence[str]) -> Dict[str, str]:
        """input path -> label-map path, unique (a clash gets ``_1`` and a warning)."""
        if not inputs:
            return {}
        absolute = [os.path.abspath(p) for p in inputs]
        base = os.path.commonpath([os.path.dirname(p) for p in absolute])
        planned, taken = {}, set()
        for path, full in zip(inputs, absolute):
            stem = os.path.splitext(os.path.relpath(full, base))[0]
            name, n = stem, 1
            while name in taken:
                name, n = f"{stem}_{n}", n + 1
            if name != stem:
                logger.warning("%s: another input has the name %s; writing %s", path, stem, name)
            taken.add(name)
            planned[path] = os.path.join(self.folder, name + MASK_SUFFIX)
        return planned

    def path_for(self, input_path: str) -> str:
        if input_path in self._names:
            return self._names[input_path]
        stem = os.path.splitext(os.path.basename(input_path))[0]
        return os.path.join(self.folder, stem + MASK_SUFFIX)

    def _save(
        self, destination: str, labels: np.ndarray, size, overlay: Optional[np.ndarray]
    ) -> str:
        height, width = size
        mask = label_map(labels, num_classes=self.num_classes, ignore_label=self.ignore_label)
        if mask.shape != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
        if not cv2.imwrite(destination, mask):
            raise ValueError(f"cannot write the label map {destination!r}")
        if self.overlays and overlay is not None:
            picture = destination[: -len(MASK_SUFFIX)] + OVERLAY_SUFFIX
            if not cv2.imwrite(picture, overlay):
                raise ValueError(f"cannot write the overlay {picture!r}")
        return destination

    def write(
        self,
        input_path: str,
        labels: np.ndarray,
        size,
        overlay: Optional[np.ndarray] = None,
    ) -> str:
        """Write the label map of one image; ``size`` = the input's (height, width)."""
        return self._save(self.path_for(input_path), labels, size, overlay)

    def write_frame(
        self, video: str, index: int, labels: np.ndarray, overlay: Optional[np.ndarray] = None
    ) -> str:
        """Write frame ``index`` of ``video`` as ``DIR/<video stem>/<index>.png``."""
        stem = os.path.splitext(os.path.basename(video))[0]
        name = f"{index:0{FRAME_DIGITS}d}{MASK_SUFFIX}"
        return self._save(os.path.join(self.folder, stem, name), labels, labels.shape, overlay)


def vocabulary_metadata(cfg):
    """detectron2 metadata of the dataset whose class list the model is built with (the
    rule of :func:`hiervl.meta_arch.vocabulary_from_cfg`), or None with TEST.VOCABULARY
    or no such dataset: its ``stuff_colors`` and ``ignore_label`` apply to predictions."""
    from detectron2.data import MetadataCatalog

    if len(cfg.TEST.VOCABULARY) > 0:
        return None
    d = cfg.DATASETS
    for name in list(d.TRAIN_LABELED) + list(d.TRAIN) + list(d.TEST):
        metadata = MetadataCatalog.get(name)
        if metadata.get("stuff_classes", None):
            return metadata
    return None


def ignore_value(metadata) -> int:
    """The ignore value of a dataset's masks (255 without metadata)."""
    return int(metadata.get("ignore_label", IGNORE_LABEL)) if metadata is not None else IGNORE_LABEL
