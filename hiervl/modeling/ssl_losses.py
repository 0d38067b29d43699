"""Semi-supervised losses on the per-pixel semantic probability map (DESIGN §3.1–3.3).

HierVL's segmentation output is not a logit map: it is ``P = normalise_k(S)`` with
``S[k] = Σ_i softmax(c_i)[k] · sigmoid(M_i)`` (Mask2Former's semantic inference), so every
loss here takes *probabilities* and takes their log itself, clamped away from 0.

Conventions follow UniMatch (weak-to-strong consistency, ``pixel`` mode) and SemiVL
(``pixelavg`` mode, MaskCLIP guidance):

- Pseudo-labels come from the weak view (model in eval mode, no grad); CutMix of the
  pseudo-label, confidence and ignore maps with the partner batch is done by the data
  path, so the functions here receive the already mixed maps.
- An *ignore map* marks pixels that belong to no image content (crop padding):
  ``ignore == ignore_value`` (255) for integer maps, ``True`` for bool maps.
- Every loss returns a scalar that stays attached to the graph (a zero built from the
  prediction) when no pixel counts, so it never yields NaN.

Shape letters: B batch, K classes, H×W prediction size, h×w CLIP token grid,
C CLIP embedding width.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "CONSISTENCY_MODES",
    "MASKCLIP_REDUCTIONS",
    "UNIMATCH_WEIGHTS",
    "confident_fraction",
    "consistency_loss",
    "entropy_loss",
    "maskclip_loss",
    "maskclip_pseudo_labels",
    "maskclip_weight",
    "pseudo_labels",
    "valid_pixels",
]

CONSISTENCY_MODES = ("pixel", "pixelavg")
MASKCLIP_REDUCTIONS = ("mean_all", "mean")

# UniMatch's combination (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 without its global
# "/ 2", written per term. The halving is a global scale (nothing under AdamW, half the LR
# under SGD) in UniMatch, where nothing else is added; here, halving L_x next to the
# unlabelled stream would double the weight of every term added after it (L_prompt,
# L_mask, L_pt, entropy) relative to the segmentation loss, so the semi-supervised run and
# its labelled-only ablation would weight them differently. SemiVL adds its MaskCLIP term
# with 0.25/0.25/0.5 next to the halved L_x, i.e. 0.5/0.5/1 relative to L_x.
UNIMATCH_WEIGHTS: Dict[str, float] = {"x": 1.0, "s1": 0.25, "s2": 0.25, "fp": 0.5}


def valid_pixels(ignore: torch.Tensor, *, ignore_value: int = 255) -> torch.Tensor:
    """Turn an ignore map into a validity mask.

    Args:
        ignore: (B,H,W) integer map (``ignore_value`` = ignored) or bool map (True = ignored).
        ignore_value: value that marks ignored pixels in an integer map.

    Returns:
        (B,H,W) bool, True where the pixel counts.
    """
    if ignore.dtype == torch.bool:
        return ~ignore
    return ignore != ignore_value


def _check_map(probs: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B,K,H,W), got shape {tuple(probs.shape)}")
    expected = (probs.shape[0],) + tuple(probs.shape[2:])
    if tuple(other.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} to match probs, got {tuple(other.shape)}"
        )


def _log_probs(probs: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 so that eps does not underflow under fp16/bf16 autocast.
    return probs.float().clamp_min(eps).log()


def _pixel_nll(probs: torch.Tensor, labels: torch.Tensor, eps: float, ignore_value: int):
    """Per-pixel −log P[label]; pixels labelled ``ignore_value`` get 0 and are reported invalid.

    Returns (B,H,W) float NLL and (B,H,W) bool "has a label".
    """
    labelled = labels != ignore_value
    index = torch.where(labelled, labels, torch.zeros_like(labels)).long()
    picked = _log_probs(probs, eps).gather(1, index.unsqueeze(1)).squeeze(1)
    return -picked * labelled, labelled


@torch.no_grad()
def pseudo_labels(probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels of the weak view (argmax) with their confidence (max prob).

    Args:
        probs: (B,K,H,W) per-pixel class probabilities of the weak view.

    Returns:
        labels (B,H,W) long, confidence (B,H,W) float — both detached.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B,K,H,W), got shape {tuple(probs.shape)}")
    confidence, labels = probs.detach().float().max(dim=1)
    return labels, confidence


@torch.no_grad()
def confident_fraction(
    confidence: torch.Tensor,
    ignore: torch.Tensor,
    *,
    conf_threshold: float,
    ignore_value: int = 255,
) -> float:
    """Share of the valid pixels whose pseudo-label passes the confidence threshold.

    0 means the ``pixel``-mode consistency loss is exactly 0 this iteration: the unlabelled
    images contribute nothing through it.

    Args:
        confidence: (B,H,W) pseudo-label confidence of the weak view.
        ignore: (B,H,W) ignore map (see :func:`valid_pixels`).
        conf_threshold: MODEL.HIERVL.SSL.CONF_THRESHOLD.

    Returns:
        A float in [0, 1]; 0 when no pixel is valid.
    """
    _check_map(confidence[:, None], ignore, "ignore")
    valid = valid_pixels(ignore, ignore_value=ignore_value)
    keep = valid & (confidence.float() >= conf_threshold)
    return float(keep.sum()) / max(int(valid.sum()), 1)


def consistency_loss(
    probs: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor,
    ignore: torch.Tensor,
    *,
    conf_threshold: float,
    mode: str = "pixel",
    ignore_value: int = 255,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Weak-to-strong cross-entropy of one perturbed view against the weak pseudo-labels.

    ``pixel`` (UniMatch)::

        Σ_{valid p} CE_p · [conf_p ≥ conf_threshold]  /  #valid pixels

    i.e. unconfident pixels contribute 0 but still count in the denominator.

    ``pixelavg`` (SemiVL, its Cityscapes setting): no threshold; each image's summed CE is
    weighted by that image's mean confidence over its valid pixels::

        Σ_b  mean_{valid p∈b}(conf_p) · Σ_{valid p∈b} CE_p  /  #valid pixels

    SemiVL's code (``utils/train_utils.py::confidence_weighted_loss``) computes
    ``(Σ_{all p} CE_p) · Σ_b avg_conf_b / #valid``: with its batch of 1 image per GPU on
    Cityscapes this is the formula above, except that its CE sum also runs over ignored
    (padded) pixels. We weight per image (so batch size does not rescale the loss) and
    exclude ignored pixels, as its ``pixelwise`` mode does.

    Args:
        probs: (B,K,H,W) probabilities of the perturbed view (strong / CutMixed / fp).
        labels: (B,H,W) long pseudo-labels (already CutMix-mixed for strong views);
            ``ignore_value`` entries are ignored too.
        confidence: (B,H,W) pseudo-label confidence (no gradient is taken through it).
        ignore: (B,H,W) ignore map (see :func:`valid_pixels`).
        conf_threshold: MODEL.HIERVL.SSL.CONF_THRESHOLD (``pixel`` mode only).
        mode: MODEL.HIERVL.SSL.CONSISTENCY_MODE, ``"pixel"`` or ``"pixelavg"``.
        ignore_value: ignore label.
        eps: floor of the probabilities before the log.

    Returns:
        () scalar loss; 0 (attached to ``probs``) when no pixel is valid.
    """
    if mode not in CONSISTENCY_MODES:
        raise ValueError(
            f"MODEL.HIERVL.SSL.CONSISTENCY_MODE must be one of {CONSISTENCY_MODES}, got {mode!r}"
        )
    for name, tensor in (("labels", labels), ("confidence", confidence), ("ignore", ignore)):
        _check_map(probs, tensor, name)

    # A pseudo-label equal to ignore_value (never produced by argmax) adds 0 to the sum but,
    # like an unconfident pixel, still counts as valid: the denominator is the ignore map's.
    nll, _ = _pixel_nll(probs, labels, eps, ignore_value)
    valid = valid_pixels(ignore, ignore_value=ignore_value)
    confidence = confidence.detach().float()
    num_valid = valid.sum().clamp_min(1)  # numerator is 0 when nothing is valid

    if mode == "pixel":
        keep = valid & (confidence >= conf_threshold)
        return (nll * keep).sum() / num_valid

    valid_f = valid.float()
    per_image_valid = valid_f.sum(dim=(1, 2)).clamp_min(1)
    mean_conf = (confidence * valid_f).sum(dim=(1, 2)) / per_image_valid
    per_image_nll = (nll * valid_f).sum(dim=(1, 2))
    return (mean_conf * per_image_nll).sum() / num_valid


def entropy_loss(
    probs: torch.Tensor,
    ignore: torch.Tensor | None = None,
    *,
    ignore_value: int = 255,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Entropy minimisation: mean over valid pixels of ``−Σ_k p_k log p_k``.

    Args:
        probs: (B,K,H,W) probabilities (unlabelled images).
        ignore: optional (B,H,W) ignore map (see :func:`valid_pixels`); None = all valid.
        ignore_value: ignore label of an integer map.
        eps: floor inside the log (p = 0 contributes 0).

    Returns:
        () mean entropy in nats (log K for a uniform map); 0 when no pixel is valid.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B,K,H,W), got shape {tuple(probs.shape)}")
    p = probs.float()
    entropy = -(p * _log_probs(p, eps)).sum(dim=1)
    if ignore is None:
        return entropy.mean()
    _check_map(probs, ignore, "ignore")
    valid = valid_pixels(ignore, ignore_value=ignore_value)
    return (entropy * valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def maskclip_pseudo_labels(
    dense_clip: torch.Tensor,
    text_clip: torch.Tensor,
    *,
    output_size: Tuple[int, int],
    logit_scale: float,
    certainty_threshold: float,
    ignore: torch.Tensor | None = None,
    ignore_value: int = 255,
) -> torch.Tensor:
    """MaskCLIP dense pseudo-labels from the frozen image encoder (SemiVL's CLIP guidance).

    As in SemiVL's ``forward_maskclip``: the cosine map between dense CLIP tokens and the
    template text embeddings is upsampled **bilinearly** (align_corners=False) to the
    prediction size *before* the scaled softmax — interpolating the smooth cosines gives
    sub-token boundaries, whereas nearest-upsampling labels would give blocky ones — then
    ``softmax(logit_scale · cos)`` over K, argmax, and pixels whose max probability is below
    ``certainty_threshold`` (or ignored in ``ignore``) become ``ignore_value``.

    Args:
        dense_clip: (B,C,h,w) dense CLIP embeddings (MaskCLIP value path + ln_post + proj);
            normalised here.
        text_clip: (K,C) template text embeddings t^CLIP; normalised here.
        output_size: (H, W) of the prediction the labels supervise.
        logit_scale: MODEL.HIERVL.SSL.MASKCLIP_LOGIT_SCALE (100 = CLIP's).
        certainty_threshold: MODEL.HIERVL.SSL.MASKCLIP_CERTAINTY.
        ignore: optional (B,H,W) ignore map at ``output_size`` (crop padding).
        ignore_value: label written to uncertain / ignored pixels.

    Returns:
        (B,H,W) long labels in [0, K) or ``ignore_value``.
    """
    if dense_clip.dim() != 4 or text_clip.dim() != 2 or dense_clip.shape[1] != text_clip.shape[1]:
        raise ValueError(
            f"dense_clip must be (B,C,h,w) and text_clip (K,C) with the same C, got "
            f"{tuple(dense_clip.shape)} and {tuple(text_clip.shape)}"
        )
    dense = F.normalize(dense_clip.float(), dim=1)
    text = F.normalize(text_clip.float(), dim=1)
    cos = torch.einsum("bchw,kc->bkhw", dense, text)
    cos = F.interpolate(cos, size=tuple(output_size), mode="bilinear", align_corners=False)
    certainty, labels = (logit_scale * cos).softmax(dim=1).max(dim=1)
    drop = certainty < certainty_threshold
    if ignore is not None:
        if tuple(ignore.shape) != tuple(labels.shape):
            raise ValueError(
                f"ignore must have shape {tuple(labels.shape)}, got {tuple(ignore.shape)}"
            )
        drop |= ~valid_pixels(ignore, ignore_value=ignore_value)
    return labels.masked_fill(drop, ignore_value)


def maskclip_loss(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean_all",
    ignore_value: int = 255,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Cross-entropy of a prediction against MaskCLIP pseudo-labels.

    ``mean_all`` (SemiVL's ``mcc_loss_reduce`` in all its published configs): summed CE over
    the labelled pixels divided by *all* B·H·W pixels, so few certain pixels give a small
    loss. ``mean``: divided by the number of labelled pixels.

    SemiVL adds this term on the two strong views and the fp view with weights
    0.25 / 0.25 / 0.5 times the decaying weight of :func:`maskclip_weight`.

    Args:
        probs: (B,K,H,W) probabilities.
        labels: (B,H,W) long MaskCLIP labels (``ignore_value`` = no label), CutMix-mixed
            for the strong views.
        reduction: ``"mean_all"`` or ``"mean"``.
        ignore_value: ignore label.
        eps: floor of the probabilities before the log.

    Returns:
        () scalar loss; 0 (attached to ``probs``) when no pixel is labelled.
    """
    if reduction not in MASKCLIP_REDUCTIONS:
        raise ValueError(
            f"maskclip reduction must be one of {MASKCLIP_REDUCTIONS}, got {reduction!r}"
        )
    _check_map(probs, labels, "labels")
    nll, labelled = _pixel_nll(probs, labels, eps, ignore_value)
    if reduction == "mean_all":
        return nll.sum() / max(labels.numel(), 1)
    return nll.sum() / labelled.sum().clamp_min(1)


def maskclip_weight(iteration: int, max_iter: int, *, start: float, end: float = 0.0) -> float:
    """Linearly decaying MaskCLIP weight: ``start`` at iteration 0, ``end`` at ``max_iter``.

    Args:
        iteration: current (0-based) iteration.
        max_iter: SOLVER.MAX_ITER.
        start: MODEL.HIERVL.SSL.MASKCLIP_WEIGHT (0.1).
        end: final weight (0 in SemiVL).

    Returns:
        The weight as a float (held at ``end`` past ``max_iter``).
    """
    if max_iter <= 0:
        raise ValueError(
            f"SOLVER.MAX_ITER must be positive for the MaskCLIP schedule, got {max_iter}"
        )
    progress = min(max(iteration / max_iter, 0.0), 1.0)
    return start * (1.0 - progress) + end * progress
