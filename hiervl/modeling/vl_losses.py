"""Vision–language regularisers (paper §3.6, DESIGN §3.4–3.6).

- Prompt regularity ``L_prompt = L_topo + L_anchor`` keeps the learned prompt embeddings
  t̂ close to the CLIP template embeddings t̂^CLIP (pairwise angles and per-class anchors
  through the projector Φ_p, with a repulsion between classes).
- Masked consistency ``L_mask`` and pixel–text alignment ``L_pt`` act on the token
  positions of one blanked class per image; :func:`blank_random_class` picks the class,
  blanks its pixels and returns the token mask M at the ViT patch grid.

Every loss returns a scalar attached to the graph (a zero built from the inputs) when M is
empty, so it never yields NaN.

Shape letters: B batch, K classes, C CLIP embedding width, H×W image, N = (H/p)·(W/p)
patch tokens (row-major, no CLS token), W_v ViT width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlankedBatch",
    "PromptProjector",
    "ANCHOR_REPULSIONS",
    "anchor_loss",
    "blank_random_class",
    "masked_consistency_loss",
    "pixel_text_alignment_loss",
    "prompt_regularity_loss",
    "topology_loss",
]


class PromptProjector(nn.Module):
    """Φ_p of L_anchor: a 2-layer MLP C → C (Linear, ReLU, Linear)."""

    def __init__(self, *, dim: int, hidden_dim: int | None = None):
        """
        Args:
            dim: C, the CLIP embedding width (input and output).
            hidden_dim: width of the hidden layer; None = C.
        """
        super().__init__()
        hidden = dim if hidden_dim is None else hidden_dim
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…,C) → (…,C)."""
        return self.layers(x)


def _check_prompts(t: torch.Tensor, t_clip: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape != t_clip.shape:
        raise ValueError(
            f"prompt embeddings must be (K,C) with t_clip of the same shape, got "
            f"{tuple(t.shape)} and {tuple(t_clip.shape)}"
        )


def topology_loss(t: torch.Tensor, t_clip: torch.Tensor) -> torch.Tensor:
    """``L_topo = Σ_i Σ_j (t̂_i·t̂_j − t̂_i^CLIP·t̂_j^CLIP)²`` (a sum, not a mean, as in eq. 3).

    Args:
        t: (K,C) learned-prompt text embeddings (normalised here).
        t_clip: (K,C) template embeddings t^CLIP (normalised here; no gradient).

    Returns:
        () loss, 0 when the two sets have the same pairwise cosines.
    """
    _check_prompts(t, t_clip)
    t_hat = F.normalize(t, dim=-1)
    ref = F.normalize(t_clip.detach(), dim=-1)
    return ((t_hat @ t_hat.T - ref @ ref.T) ** 2).sum()


ANCHOR_REPULSIONS = ("mean", "sum")


def anchor_loss(
    t: torch.Tensor,
    t_clip: torch.Tensor,
    projector: nn.Module,
    *,
    repulsion: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """``L_anchor = Σ_k [ ‖Φ_p(t̂_k) − t̂_k^CLIP‖ − λ R_k ]`` with the repulsion
    ``R_k = mean_{j≠k} log(1 + ‖Φ_p(t̂_k) − Φ_p(t̂_j)‖)`` (``reduction="mean"``), or the
    paper's ``Σ_{j≠k}`` (eq. 4, ``reduction="sum"``).

    Why the mean (a departure from eq. 4): with the sum, each class is pushed away from
    K − 1 others while pulled to one anchor, so the repulsion outweighs the anchor once
    λ(K − 1) is large. Scaling Φ_p's outputs by c > 1 then lowers the loss for K = 81 or
    150 (COCO, ADE20K; e.g. up to c ≈ 7 for orthonormal embeddings and λ = 0.1): the
    anchor stops binding. The mean keeps the balance of one anchor against one average
    pair at every K, so λ means the same on VOC and on ADE20K.

    The anchor term grows linearly with ‖Φ_p‖ and the repulsion only logarithmically, so the
    loss is bounded below without normalising Φ_p's output.

    Args:
        t: (K,C) learned-prompt text embeddings (normalised here).
        t_clip: (K,C) template embeddings (normalised here; no gradient).
        projector: Φ_p, e.g. :class:`PromptProjector`.
        repulsion: λ, MODEL.HIERVL.VL.ANCHOR_LAMBDA.
        reduction: MODEL.HIERVL.VL.ANCHOR_REPULSION, ``"mean"`` or ``"sum"`` over j ≠ k.

    Returns:
        () loss (may be negative); with K = 1 the repulsion is 0.
    """
    _check_prompts(t, t_clip)
    if reduction not in ANCHOR_REPULSIONS:
        raise ValueError(
            f"MODEL.HIERVL.VL.ANCHOR_REPULSION must be one of {ANCHOR_REPULSIONS}, "
            f"got {reduction!r}"
        )
    projected = projector(F.normalize(t, dim=-1))
    ref = F.normalize(t_clip.detach(), dim=-1)
    # vector_norm's backward is 0 (not NaN) at a zero vector, e.g. on the diagonal below.
    anchor = torch.linalg.vector_norm(projected - ref, dim=-1).sum()
    pairwise = torch.linalg.vector_norm(projected[:, None, :] - projected[None, :, :], dim=-1)
    num_classes = t.shape[0]
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=t.device)
    spread = (torch.log1p(pairwise) * off_diagonal).sum()
    if reduction == "mean":
        spread = spread / max(num_classes - 1, 1)
    return anchor - repulsion * spread


def prompt_regularity_loss(
    t: torch.Tensor,
    t_clip: torch.Tensor,
    projector: nn.Module,
    *,
    repulsion: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """``L_prompt = L_topo + L_anchor`` (see :func:`topology_loss`, :func:`anchor_loss`).

    Args:
        t: (K,C) learned-prompt text embeddings.
        t_clip: (K,C) template embeddings t^CLIP.
        projector: Φ_p.
        repulsion: λ, MODEL.HIERVL.VL.ANCHOR_LAMBDA.
        reduction: the repulsion over j ≠ k, ``"mean"`` or the paper's ``"sum"``.

    Returns:
        () loss.
    """
    return topology_loss(t, t_clip) + anchor_loss(
        t, t_clip, projector, repulsion=repulsion, reduction=reduction
    )


class BlankedBatch(NamedTuple):
    """Result of :func:`blank_random_class`.

    images: (B,3,H,W) copy of the input with the chosen class's pixels set to the fill value.
    pixel_mask: (B,H,W) bool, the blanked pixels.
    token_mask: (B,N) bool, M — tokens whose patch is at least ``min_token_fraction`` blanked.
    token_labels: (B,N) long, the blanked class on M, ``ignore_value`` elsewhere.
    chosen: (B,) long, the blanked class per image, −1 for an image without a valid label.
    """

    images: torch.Tensor
    pixel_mask: torch.Tensor
    token_mask: torch.Tensor
    token_labels: torch.Tensor
    chosen: torch.Tensor


def blank_random_class(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    patch_size: int,
    generator: torch.Generator | None = None,
    fill_value: float = 0.0,
    min_token_fraction: float = 0.5,
    ignore_value: int = 255,
) -> BlankedBatch:
    """Blank all pixels of one class per image, chosen uniformly among the classes present.

    Images are CLIP-normalised, so the default fill 0.0 is CLIP's mean colour — a neutral
    grey that removes the class without adding an out-of-distribution value. Images whose
    label map has no valid pixel are returned unchanged (``chosen`` = −1, no token in M).
    A class too small to cover ``min_token_fraction`` of any patch is blanked but yields no
    token in M.

    Args:
        images: (B,3,H,W) CLIP-normalised images; H and W multiples of ``patch_size``.
        labels: (B,H,W) long label maps (ground truth, or pseudo-labels for unlabelled images).
        patch_size: ViT patch size p (token grid H/p × W/p).
        generator: torch.Generator for the class choice (deterministic under a seed); its
            device is used for the random draw.
        fill_value: value written to every channel of the blanked pixels.
        min_token_fraction: fraction of a patch's pixels that must be blanked for the token to
            enter M.
        ignore_value: ignore label (never chosen).

    Returns:
        :class:`BlankedBatch`.
    """
    if images.dim() != 4 or labels.shape != (images.shape[0],) + tuple(images.shape[2:]):
        raise ValueError(
            f"images must be (B,3,H,W) and labels (B,H,W) of the same size, got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    height, width = labels.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of patch size {patch_size}"
        )

    valid = labels != ignore_value
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    num_classes = int(safe.max().item()) + 1 if safe.numel() else 1
    batch = labels.shape[0]
    presence = torch.zeros(batch, num_classes, dtype=torch.bool, device=labels.device)
    presence.scatter_(1, safe.flatten(1), valid.flatten(1))
    has_class = presence.any(dim=1)

    device = generator.device if generator is not None else labels.device
    scores = torch.rand(batch, num_classes, generator=generator, device=device)
    scores = scores.to(labels.device).masked_fill(~presence, -1.0)
    chosen = torch.where(
        has_class, scores.argmax(dim=1), torch.full_like(has_class, -1, dtype=torch.long)
    )

    pixel_mask = (labels == chosen[:, None, None]) & valid
    blanked = images.masked_fill(pixel_mask[:, None], fill_value)

    fraction = F.avg_pool2d(pixel_mask[:, None].float(), kernel_size=patch_size)
    token_mask = (fraction >= min_token_fraction).flatten(1)
    token_labels = torch.where(
        token_mask,
        chosen[:, None].expand_as(token_mask),
        torch.full_like(token_mask, ignore_value, dtype=torch.long),
    )
    return BlankedBatch(blanked, pixel_mask, token_mask, token_labels, chosen)


def _check_tokens(x: torch.Tensor, token_mask: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or tuple(token_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{name} must be (B,N,C) with token_mask (B,N), got {tuple(x.shape)} and "
            f"{tuple(token_mask.shape)}"
        )


def masked_consistency_loss(
    x_mask: torch.Tensor, x_ref: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """``L_mask = mean_{i∈M} (1 − cos(x_mask,i, x_ref,i))``.

    Args:
        x_mask: (B,N,W_v) tokens of the blanked images from the fine-tuned encoder E_I^θ.
        x_ref: (B,N,W_v) tokens of the original images from the frozen encoder E_I^0
            (detached here: only x_mask learns).
        token_mask: (B,N) bool, M.

    Returns:
        () loss in [0, 2]; 0 (attached to x_mask) when M is empty.
    """
    _check_tokens(x_mask, token_mask, "x_mask")
    if x_ref.shape != x_mask.shape:
        raise ValueError(f"x_ref {tuple(x_ref.shape)} must match x_mask {tuple(x_mask.shape)}")
    cos = F.cosine_similarity(x_mask.float(), x_ref.detach().float(), dim=-1)
    selected = token_mask.float()
    return ((1.0 - cos) * selected).sum() / selected.sum().clamp_min(1)


def pixel_text_alignment_loss(
    x_mask: torch.Tensor,
    text: torch.Tensor,
    token_mask: torch.Tensor,
    token_labels: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """``L_pt = −mean_{i∈M} log softmax_c(cos(x_mask,i, t_c) / τ)[y_i]``.

    Args:
        x_mask: (B,N,C) blanked-image tokens projected to CLIP space (ln_post + proj).
        text: (K,C) class text embeddings (DESIGN: the template t^CLIP); gradients flow into
            whatever is passed.
        token_mask: (B,N) bool, M.
        token_labels: (B,N) long, class y_i on M (other entries are not read).
        temperature: τ, MODEL.HIERVL.VL.PT_TEMPERATURE.

    Returns:
        () loss; 0 (attached to x_mask) when M is empty.
    """
    _check_tokens(x_mask, token_mask, "x_mask")
    if text.dim() != 2 or text.shape[1] != x_mask.shape[-1]:
        raise ValueError(f"text must be (K,{x_mask.shape[-1]}), got {tuple(text.shape)}")
    if token_labels.shape != token_mask.shape:
        raise ValueError(
            f"token_labels {tuple(token_labels.shape)} must match token_mask "
            f"{tuple(token_mask.shape)}"
        )
    logits = F.normalize(x_mask.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    targets = torch.where(token_mask, token_labels, torch.zeros_like(token_labels)).long()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    selected = token_mask.flatten().float()
    return (nll * selected).sum() / selected.sum().clamp_min(1)
