"""One-call inference on a numpy image, like detectron2's ``DefaultPredictor``.

Shape letters: K classes of the current vocabulary, H×W the input image.

The predictor builds the model from a frozen config, loads ``MODEL.WEIGHTS`` strictly,
optionally switches to another vocabulary (open vocabulary through the text queries) and
runs the same whole-image / sliding-window inference as the evaluator: no resizing, the
input is seen at its own resolution.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from hiervl.demo.visualizer import UNLABELED
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.trainer import HierVLTrainer
from hiervl.modeling.hiervl_model import HierVLModel

logger = logging.getLogger(__name__)

__all__ = ["SemanticPrediction", "SemanticPredictor", "parse_vocabulary", "UNLABELED"]

INPUT_FORMATS = ("BGR", "RGB")


def parse_vocabulary(value: str) -> List[str]:
    """Class names from ``"cat,dog,sofa"`` or from a ``.txt`` file with one name per line.

    In a file, blank lines and lines starting with ``#`` are skipped (names may contain
    commas and spaces there). Raises ValueError for an empty list, a missing file or a
    repeated name (two queries for one name would split its pixels arbitrarily).
    """
    if value.lower().endswith(".txt") or os.path.isfile(value):
        if not os.path.isfile(value):
            raise ValueError(f"vocabulary file not found: {value!r}")
        with open(value, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        names = [line for line in lines if line and not line.startswith("#")]
        source = f"vocabulary file {value!r}"
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
        source = f"vocabulary {value!r}"
    if not names:
        raise ValueError(f"{source} contains no class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source} repeats class names: {repeated}")
    return names


@dataclass
class SemanticPrediction:
    """Inference result for one image.

    Attributes:
        scores: (K,H,W) float32, the model's semantic scores S (Mask2Former's sum over
            queries of class probability × mask probability; not normalised over K).
        probs: (K,H,W) float32, S normalised over classes (a distribution per pixel).
        labels: (H,W) int64 class index per pixel, ``UNLABELED`` where the maximum of
            ``probs`` is below the confidence threshold.
        confidence: (H,W) float32, the maximum of ``probs`` per pixel.
        class_names: the K names, index-aligned with ``scores``.
    """

    scores: torch.Tensor
    probs: torch.Tensor
    labels: np.ndarray
    confidence: np.ndarray
    class_names: List[str]


class SemanticPredictor:
    """Load a HierVL model once, then segment numpy images one at a time."""

    def __init__(
        self,
        cfg,
        *,
        vocabulary: Optional[Sequence[str]] = None,
        confidence_threshold: float = 0.0,
    ):
        """
        Args:
            cfg: a config from :func:`hiervl.engine.launcher.setup_cfg` (datasets registered,
                MODEL.DEVICE valid). ``MODEL.WEIGHTS`` is loaded when set.
            vocabulary: class names replacing the trained ones (None = keep).
            confidence_threshold: in [0, 1); pixels whose top class probability is below it
                are labelled ``UNLABELED``.
        """
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(
                f"confidence threshold must be in [0, 1), got {confidence_threshold} "
                "(it is compared with a per-pixel class probability)"
            )
        self.cfg = cfg.clone()
        self.confidence_threshold = float(confidence_threshold)
        self.model = HierVLTrainer.build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            HierVLCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        else:
            logger.warning(
                "MODEL.WEIGHTS is empty: the demo runs an untrained model "
                "(pass --opts MODEL.WEIGHTS path/to/model_final.pth)"
            )
        # After loading: the text queries are computed from the names, so any vocabulary
        # works with weights trained on another one.
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    @property
    def class_names(self) -> List[str]:
        return self.model.model.class_names

    def set_vocabulary(self, names: Sequence[str]) -> None:
        names = list(names)
        if not names:
            raise ValueError("the vocabulary must contain at least one class name")
        self.model.set_vocabulary(names)
        logger.info("Vocabulary (%d classes): %s", len(names), ", ".join(names))

    def _model_input(self, image: np.ndarray, input_format: str) -> dict:
        """uint8 (H,W,3) in ``input_format`` (or (H,W) grey) → the model's RGB (3,H,W) dict."""
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"expected a uint8 numpy image, got {kind}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        if input_format == "BGR":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, image: np.ndarray, *, input_format: str = "BGR") -> SemanticPrediction:
        """Segment one image (uint8 (H,W,3), BGR as read by cv2 unless told otherwise)."""
        scores = self.model([self._model_input(image, input_format)])[0]["sem_seg"]
        scores = scores.float().cpu()
        probs = HierVLModel.semantic_probs(scores[None])[0]
        confidence, labels = probs.max(dim=0)
        labels[confidence < self.confidence_threshold] = UNLABELED
        return SemanticPrediction(
            scores=scores,
            probs=probs,
            labels=labels.numpy().astype(np.int64),
            confidence=confidence.numpy(),
            class_names=self.class_names,
        )

    @torch.no_grad()
    def class_relevance(self, image: np.ndarray, *, input_format: str = "BGR") -> torch.Tensor:
        """HSQG's relevance (K,) in [0, 1] of every class of the vocabulary for this image."""
        item = self._model_input(image, input_format)
        return self.model.class_relevance([item])[0].float().cpu()
