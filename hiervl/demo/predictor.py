"""One-call inference on a numpy image, like detectron2's ``DefaultPredictor``.

Shape letters: K classes of the current vocabulary, H×W the input image.

The predictor builds the model from a frozen config, loads ``MODEL.WEIGHTS`` strictly
(through the one checkpoint reader), optionally switches to another vocabulary (open
vocabulary through the text queries), resizes the input to the test scale
(``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, like detectron2's ``DefaultPredictor``; see
:mod:`hiervl.demo.resize`), runs the same whole-image / sliding-window inference as the
evaluator there (optionally with a progress bar over the windows), and returns labels at
the input's size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import tqdm

from hiervl.demo.resize import upsampled_labels
from hiervl.demo.scaling import check_test_scale, inference_size, resize_image
from hiervl.demo.visualizer import UNLABELED
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.trainer import HierVLTrainer
from hiervl.modeling.backbone.class_names import validate_class_names
from hiervl.modeling.hiervl_model import HierVLModel

logger = logging.getLogger(__name__)

__all__ = ["SemanticPrediction", "SemanticPredictor", "parse_vocabulary", "UNLABELED"]

INPUT_FORMATS = ("BGR", "RGB")


def parse_vocabulary(value: str) -> List[str]:
    """Class names from ``"cat,dog,sofa"`` or from a ``.txt`` file with one name per line.

    In a file, blank lines and lines starting with ``#`` are skipped (names may contain
    commas and spaces there). Raises ValueError for a missing or unreadable file, and
    (:func:`validate_class_names`) for an empty list or two names that are one text query
    (``cat``/``Cat``: two queries for one name would split its pixels arbitrarily).
    """
    if value.lower().endswith(".txt") or os.path.isfile(value):
        if not os.path.isfile(value):
            raise ValueError(f"--vocabulary: vocabulary file {value!r} not found")
        try:
            with open(value, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--vocabulary: cannot read vocabulary file {value!r}: {e}") from None
        names = [line for line in lines if line and not line.startswith("#")]
        source = f"--vocabulary file {value!r}"
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
        source = f"--vocabulary {value!r}"
    return list(validate_class_names(names, source))


@dataclass
class SemanticPrediction:
    """Inference result for one image.

    H×W is the input image, h×w the test scale the model saw (H×W when the input already
    had it, or INPUT.MIN_SIZE_TEST is 0).

    Attributes:
        scores: (K,h,w) float32, the model's semantic scores S (Mask2Former's sum over
            queries of class probability × mask probability; not normalised over K).
        probs: (K,h,w) float32, S normalised over classes (a distribution per pixel).
        labels: (H,W) int64 class index per pixel (argmax of ``probs`` upsampled
            bilinearly), ``UNLABELED`` where that maximum is below the confidence threshold.
        confidence: (H,W) float32, the maximum of the upsampled ``probs`` per pixel.
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
        self.min_size, self.max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        check_test_scale(self.min_size, self.max_size, "INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST")
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

    def set_vocabulary(self, names: Sequence[str], *, source: str = "vocabulary") -> None:
        names = list(names)
        self.model.set_vocabulary(names, source=source)
        logger.info("Vocabulary (%d classes): %s", len(names), ", ".join(names))

    def _model_input(self, image: np.ndarray, input_format: str) -> dict:
        """uint8 (H,W,3) in ``input_format`` (or (H,W) grey) → the model's RGB (3,h,w) dict
        at the test scale."""
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
        height, width = inference_size(
            *image.shape[:2], min_size=self.min_size, max_size=self.max_size
        )
        image = resize_image(np.ascontiguousarray(image), (height, width))
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(
        self, image: np.ndarray, *, input_format: str = "BGR", progress: bool = False
    ) -> SemanticPrediction:
        """Segment one image (uint8 (H,W,3), BGR as read by cv2 unless told otherwise).

        ``progress``: show a progress bar (with ETA) over the sliding windows when the
        image needs more than one.
        """
        item = self._model_input(image, input_format)
        with _WindowProgress(enabled=progress) as bar:
            scores = self.model.inference([item], progress=bar.update)[0]["sem_seg"]
        scores = scores.float().cpu()
        probs = HierVLModel.semantic_probs(scores[None])[0]
        labels, confidence = upsampled_labels(
            probs, image.shape[:2], threshold=self.confidence_threshold, unlabeled=UNLABELED
        )
        return SemanticPrediction(
            scores=scores,
            probs=probs,
            labels=labels,
            confidence=confidence,
            class_names=self.class_names,
        )

    @torch.no_grad()
    def class_relevance(self, image: np.ndarray, *, input_format: str = "BGR") -> torch.Tensor:
        """HSQG's relevance (K,) in [0, 1] of every class of the vocabulary for this image."""
        item = self._model_input(image, input_format)
        return self.model.class_relevance([item])[0].float().cpu()


class _WindowProgress:
    """A tqdm bar over the sliding windows of one image, opened at the first window of an
    image that has several (a small image shows nothing)."""

    def __init__(self, *, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def update(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if self.bar is None:
            self.bar = tqdm.tqdm(total=total, desc="windows", unit="win", leave=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _WindowProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
