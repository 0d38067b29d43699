"""Zero-shot checks of a CLIP model on labelled images: what HierVL's CLIP-driven parts
can rely on.

- **Presence AUC** per class: how well ``cos(v, t_k)`` (the pooled image embedding v
  against the template text embedding t_k of "a photo of a {class}.") ranks the images
  that contain class k above those that do not; HSQG's relevance gate thresholds this
  cosine. 0.5 = chance, 1 = perfect.
- **MaskCLIP dense zero-shot** (the frozen encoder's value-path tokens against the
  template embeddings, :func:`hiervl.modeling.ssl_losses.maskclip_pseudo_labels`): mIoU of
  the argmax map, and the share and accuracy of the pixels certain enough to become
  MaskCLIP pseudo-labels in training (certainty >= ``MASKCLIP_CERTAINTY``).

Shape letters: N images, K classes, S image side, C CLIP embedding width.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from hiervl.config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from hiervl.modeling.backbone.frozen_encoder import FrozenCLIPImageEncoder
from hiervl.modeling.ssl_losses import maskclip_pseudo_labels

__all__ = [
    "binary_auc",
    "confusion_iou",
    "normalize_images",
    "template_embeddings",
    "zero_shot_report",
]

_BATCH = 100


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN without both
    positives and negatives.

    Args:
        scores: (N,) float; positive: (N,) bool.
    """
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value.
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 RGB -> (N, 3, S, S) float, CLIP-normalised as HierVL's model does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def confusion_iou(labels: np.ndarray, pred: np.ndarray, *, num_classes: int) -> np.ndarray:
    """(K,) IoU per class of ``pred`` against ``labels`` (any equal shapes; labels >= K,
    e.g. 255, are ignored); NaN for classes absent from the labels, as detectron2's
    SemSegEvaluator leaves them out of the mean."""
    labels, pred = np.asarray(labels, np.int64), np.asarray(pred, np.int64)
    valid = labels < num_classes
    confusion = np.bincount(
        labels[valid] * num_classes + pred[valid], minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    return np.where(confusion.sum(1) > 0, inter / np.maximum(union, 1), np.nan)


@torch.no_grad()
def template_embeddings(
    model: nn.Module, tokenizer: SimpleTokenizer, class_names: Sequence[str], template: str
) -> torch.Tensor:
    """(K, C) L2-normalised t_k of ``template.format(name)`` (HierVL's t^CLIP)."""
    tokens = tokenizer([template.format(name) for name in class_names])
    return F.normalize(model.encode_text(tokens), dim=-1)


@torch.no_grad()
def zero_shot_report(
    model: nn.Module,
    tokenizer: SimpleTokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    present: np.ndarray,
    *,
    class_names: Sequence[str],
    template: str,
    logit_scale: float,
    certainty: float,
) -> Dict[str, float]:
    """Presence AUC per class and MaskCLIP dense zero-shot figures of ``model``.

    Args:
        model: an open_clip ``CLIP`` (ViT image tower).
        images: (N, S, S, 3) uint8 RGB; labels: (N, S, S) class ids; present: (N, K) bool,
            the classes an image shows (what its caption would name).
        class_names, template: the vocabulary and MODEL.HIERVL.CLIP.TEMPLATE.
        logit_scale, certainty: MODEL.HIERVL.SSL.MASKCLIP_LOGIT_SCALE / MASKCLIP_CERTAINTY.
    Returns:
        {"auc-<class>": AUC (NaN when every image shows the class, e.g. background),
        "auc_mean": mean over the defined ones, "maskclip_mIoU", "maskclip-IoU-<class>",
        "maskclip_pixel_acc", "maskclip_certain_share", "maskclip_certain_acc"}, AUCs in
        [0, 1], the rest in %.
    """
    was_training = model.training
    model.eval()
    try:
        text = template_embeddings(model, tokenizer, class_names, template)
        frozen = FrozenCLIPImageEncoder(visual=model.visual)
        sims, maps, certain = [], [], []
        for start in range(0, len(images), _BATCH):
            x = normalize_images(images[start : start + _BATCH])
            features = frozen(x)
            sims.append(F.normalize(features.global_embed, dim=-1) @ text.T)
            dense = maskclip_pseudo_labels(
                features.dense_clip,
                text,
                output_size=tuple(x.shape[-2:]),
                logit_scale=logit_scale,
                certainty_threshold=0.0,
            )
            kept = maskclip_pseudo_labels(
                features.dense_clip,
                text,
                output_size=tuple(x.shape[-2:]),
                logit_scale=logit_scale,
                certainty_threshold=certainty,
            )
            maps.append(dense)
            certain.append(kept != 255)
    finally:
        model.train(was_training)
    sim = torch.cat(sims).numpy()
    pred = torch.cat(maps).numpy()
    sure = torch.cat(certain).numpy()
    labels = np.asarray(labels, np.int64)
    report: Dict[str, float] = {}
    aucs = []
    for k, name in enumerate(class_names):
        report[f"auc-{name}"] = binary_auc(sim[:, k], present[:, k])
        if not np.isnan(report[f"auc-{name}"]):
            aucs.append(report[f"auc-{name}"])
    report["auc_mean"] = float(np.mean(aucs)) if aucs else float("nan")
    num = len(class_names)
    valid = labels < num
    iou = confusion_iou(labels, pred, num_classes=num)
    for k, name in enumerate(class_names):
        report[f"maskclip-IoU-{name}"] = 100.0 * float(iou[k])
    report["maskclip_mIoU"] = 100.0 * float(np.nanmean(iou))
    hits = (pred == labels) & valid
    report["maskclip_pixel_acc"] = 100.0 * float(hits.sum() / max(valid.sum(), 1))
    report["maskclip_certain_share"] = 100.0 * float(sure[valid].mean())
    report["maskclip_certain_acc"] = 100.0 * float(
        (hits & sure).sum() / max((sure & valid).sum(), 1)
    )
    return report
