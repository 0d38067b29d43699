"""The registered detectron2 meta-architecture ``HierVL``: config → modules, batches → tensors.

``from_config`` is the only place that reads the config for the network; the network
itself is the plain-torch :class:`~hiervl.modeling.hiervl_model.HierVLModel` and its
training losses are :class:`~hiervl.modeling.objective.HierVLObjective`.

``forward`` accepts
- in training, a named two-stream batch ``{"labeled": [...], "unlabeled": [...],
  "unlabeled_mix": [...], "iteration": int, "max_iter": int}`` (semi-supervised) or a plain list of
  labelled dicts (supervised only), and returns a dict of prefixed, weighted losses;
- in eval mode, a list of ``{"image": uint8 (3,H,W), "height", "width"}`` and returns
  ``[{"sem_seg": (K, height, width) scores}]`` (whole image or sliding window).

Shape letters: B images, K classes, H×W padded batch size.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from hiervl.evaluation.sliding_window import sliding_window_inference
from hiervl.model_builder import build_hiervl_model, build_objective
from hiervl.modeling.backbone.class_names import validate_class_names
from hiervl.modeling.hiervl_model import HierVLModel
from hiervl.modeling.objective import HierVLObjective, LabeledBatch, UnlabeledBatch

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
# Image entries of the training dicts (their sizes decide the batch size).
_IMAGE_KEYS = ("image", "image_weak", "image_strong1", "image_strong2")


def vocabulary_from_cfg(cfg) -> List[str]:
    """Class names: TEST.VOCABULARY if set, else the metadata of the first train/test set.

    Checked by :func:`validate_class_names` (no empty name, no two names that are one CLIP
    text query), naming the key or the dataset they come from.
    """
    if len(cfg.TEST.VOCABULARY) > 0:
        return list(validate_class_names(cfg.TEST.VOCABULARY, "TEST.VOCABULARY"))
    names = list(cfg.DATASETS.TRAIN_LABELED) + list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    for name in names:
        classes = MetadataCatalog.get(name).get("stuff_classes", None)
        if classes:
            return list(validate_class_names(classes, f"the classes of dataset {name!r}"))
    raise ValueError(
        "no class names: set DATASETS.TRAIN_LABELED / DATASETS.TEST to a registered dataset "
        f"with 'stuff_classes' metadata, or TEST.VOCABULARY (datasets tried: {names})"
    )


@META_ARCH_REGISTRY.register()
class HierVL(nn.Module):
    """Detectron2 wrapper of :class:`HierVLModel` + :class:`HierVLObjective`."""

    @configurable
    def __init__(
        self,
        *,
        model: HierVLModel,
        objective: Optional[HierVLObjective],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        sliding_window: bool,
        window_crop: int,
        window_stride: int,
        prune_classes: bool,
    ):
        """
        Args:
            model: the network.
            objective: training losses (None for an inference-only model).
            pixel_mean, pixel_std: normalisation of 0..255 RGB inputs (CLIP's).
            sliding_window: evaluate with overlapping windows (TEST.SLIDING_WINDOW.ENABLED).
            window_crop: window size (TEST.SLIDING_WINDOW.CROP_SIZE).
            window_stride: window stride (TEST.SLIDING_WINDOW.STRIDE; 0 = crop // 2).
            prune_classes: drop the classes HSQG pruned from the scores (TEST.PRUNE_CLASSES).
        """
        super().__init__()
        self.model = model
        self.objective = objective
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.sliding_window = sliding_window
        self.window_crop = window_crop
        self.window_stride = window_stride if window_stride > 0 else max(window_crop // 2, 1)
        self.prune_classes = prune_classes

    @classmethod
    def from_config(cls, cfg):
        model = build_hiervl_model(cfg, vocabulary_from_cfg(cfg))
        sw = cfg.TEST.SLIDING_WINDOW
        return {
            "model": model,
            "objective": build_objective(cfg, model.backbone.embed_dim),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "sliding_window": sw.ENABLED,
            "window_crop": sw.CROP_SIZE,
            "window_stride": sw.STRIDE,
            "prune_classes": cfg.TEST.PRUNE_CLASSES,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def set_vocabulary(self, class_names: Sequence[str], *, source: str = "vocabulary") -> None:
        """Segment with any class names (open vocabulary); no retraining needed."""
        self.model.set_vocabulary(class_names, source=source)

    # ------------------------------------------------------------------ batching
    def _batch_size(self, *streams: List[dict]) -> Tuple[int, int]:
        """(H, W) every map of these streams is padded to: the largest image, rounded up
        to multiples of the patch size (crops share a size; with INPUT.CROP.ENABLED False
        the rescaled images differ, as in detectron2's ImageList)."""
        div = self.model.size_divisibility
        sizes = [d[key].shape[-2:] for ds in streams for d in ds for key in d if key in _IMAGE_KEYS]
        height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
        return -(-height // div) * div, -(-width // div) * div

    def _stack(self, maps: List[torch.Tensor], size: Tuple[int, int], value) -> torch.Tensor:
        """Pad each (..., h, w) map at bottom/right to ``size`` with ``value`` and stack."""
        padded = [
            F.pad(
                m.to(self.device), (0, size[1] - m.shape[-1], 0, size[0] - m.shape[-2]), value=value
            )
            for m in maps
        ]
        return torch.stack(padded)

    def _images(self, dicts: List[dict], key: str, size: Tuple[int, int]) -> torch.Tensor:
        """Normalised images of one stream, padded with 0 (the mean colour) → (B,3,H,W)."""
        images = [
            (d[key].to(self.device).float() - self.pixel_mean) / self.pixel_std for d in dicts
        ]
        return self._stack(images, size, 0.0)

    def _padding(self, dicts: List[dict], key: str, size: Tuple[int, int]) -> torch.Tensor:
        """(B,H,W) bool, True on padding: the mapper's (crop) padding, then the batch's."""
        maps = [
            d[key].bool() if key in d else torch.zeros(d["image"].shape[-2:], dtype=torch.bool)
            for d in dicts
        ]
        return self._stack(maps, size, True)

    def _labeled_batch(self, dicts: List[dict]) -> LabeledBatch:
        size = self._batch_size(dicts)
        return LabeledBatch(
            images=self._images(dicts, "image", size),
            labels=self._stack([d["sem_seg"].long() for d in dicts], size, IGNORE_LABEL),
            padding=self._padding(dicts, "padding_mask", size),
        )

    def _unlabeled_batch(self, dicts: List[dict], partner: List[dict]) -> UnlabeledBatch:
        # One size for both: CutMix pastes the partner's pixels at the same coordinates.
        size = self._batch_size(dicts, partner)

        def boxes(ds, key):
            return self._stack([d[key].bool() for d in ds], size, False)

        views = ("image_weak", "image_strong1", "image_strong2")
        imgs = {k: self._images(dicts, k, size) for k in views}
        mix = {k: self._images(partner, k, size) for k in views}
        return UnlabeledBatch(
            weak=imgs["image_weak"],
            strong1=imgs["image_strong1"],
            strong2=imgs["image_strong2"],
            box1=boxes(dicts, "cutmix_box1"),
            box2=boxes(dicts, "cutmix_box2"),
            ignore=self._padding(dicts, "ignore_mask", size),
            mix_weak=mix["image_weak"],
            mix_strong1=mix["image_strong1"],
            mix_strong2=mix["image_strong2"],
            mix_ignore=self._padding(partner, "ignore_mask", size),
        )

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        if self.objective is None:
            raise RuntimeError("this HierVL instance was built without training losses")
        if isinstance(batched_inputs, dict):
            labeled = self._labeled_batch(batched_inputs["labeled"])
            unlabeled = None
            if self.objective.semi_supervised and batched_inputs.get("unlabeled"):
                unlabeled = self._unlabeled_batch(
                    batched_inputs["unlabeled"], batched_inputs["unlabeled_mix"]
                )
            iteration = int(batched_inputs.get("iteration", 0))
            max_iter = int(batched_inputs.get("max_iter", 1))
        else:
            labeled, unlabeled = self._labeled_batch(batched_inputs), None
            iteration, max_iter = 0, 1
        return self.objective(
            self.model, labeled, unlabeled, iteration=iteration, max_iter=max_iter
        )

    def _normalized(self, item: dict) -> torch.Tensor:
        image = item["image"].to(self.device).float()[None]
        return (image - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def class_relevance(self, batched_inputs: List[dict]) -> List[torch.Tensor]:
        """HSQG relevance (K,) of every class for each input image (for the demo)."""
        text = self.model.class_embeddings()
        return [self.model.class_relevance(self._normalized(d), text)[0] for d in batched_inputs]

    @torch.no_grad()
    def inference(
        self, batched_inputs: List[dict], *, progress: Optional[Callable[[int, int], None]] = None
    ) -> List[Dict[str, torch.Tensor]]:
        """Semantic scores per image at its original (height, width).

        ``progress(done, total)`` is called after each sliding window (the demo's bar).
        """
        text = self.model.class_embeddings()
        num_classes = text[0].shape[0]
        results = []
        for item in batched_inputs:
            image = self._normalized(item)
            if self.sliding_window:
                scores = sliding_window_inference(
                    lambda x: self.model.predict_scores(x, text, prune_classes=self.prune_classes),
                    image,
                    crop=self.window_crop,
                    stride=self.window_stride,
                    num_classes=num_classes,
                    progress=progress,
                )
            else:
                scores = self.model.predict_scores(image, text, prune_classes=self.prune_classes)
            height = item.get("height", image.shape[-2])
            width = item.get("width", image.shape[-1])
            if tuple(scores.shape[-2:]) != (height, width):
                scores = F.interpolate(
                    scores, size=(height, width), mode="bilinear", align_corners=False
                )
            results.append({"sem_seg": scores[0]})
        return results
