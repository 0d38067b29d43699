"""Hierarchical Semantic Query Generator (HSQG, paper §3.2, DESIGN §1.4).

Turns the K class-text embeddings into L levels of relevance-gated decoder queries:

    q_k^(l) = MLP_l(t_k)                          L separate 2-layer MLPs C -> D
    s_k     = sigmoid(w * cos(v, t_k) + b)         predicted relevance, scalar learnable w, b
    gate_k  = 1[k in ground truth]  (labelled images)   |   s_k  (other images)
              with labeled_gate="union": 1 on ground-truth classes, s_k on the others
    q~_k^(l) = gate_k * q_k^(l)
    active  = {k : gate_k >= threshold}, topped up to the ``min_active`` best-ranked classes

Shape letters: B images, K classes, L hierarchy levels, C CLIP embedding width,
D decoder width.

Everything is fixed-size (B, ..., K, ...) with a boolean ``active`` mask. Downstream,
classes inactive in every image of the batch are not computed at all
(``hiervl_model.live_text_queries``); the others are pruned per image (key padding in
attention, dropped from outputs and losses).

``labeled_gate`` decides the labelled images' gate. "ground_truth" is the paper's rule:
only the ground-truth classes are active, so a text query never meets a class that is
absent and never learns to answer "no object", though at inference (predicted gate) it
must. "union" (our option) keeps the predicted active set ∪ the ground-truth classes; the
false-positive text queries are then valid and unmatched, and the criterion supervises
them as no object.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

LABELED_GATES = ("ground_truth", "union")


class HSQGOutput(NamedTuple):
    """What HSQG hands to CMSAM / the decoder / the criterion.

    Attributes:
        queries: (B, L, K, D) gated queries q~ = gate * MLP_l(t_k).
        gate: (B, K) the gate that multiplied the queries (GT indicator for labelled
            images, predicted relevance otherwise; all ones when HSQG is disabled).
        relevance: (B, K) predicted sigmoid(w * cos(v, t_k) + b) for every image
            (the input of L_rel, whatever the gate was); None when HSQG is disabled and
            no image embedding was given.
        active: (B, K) bool, classes kept for this image.
    """

    queries: torch.Tensor
    gate: torch.Tensor
    relevance: Optional[torch.Tensor]
    active: torch.Tensor


class HSQG(nn.Module):
    """Relevance-gated, multi-level class queries from CLIP text embeddings."""

    def __init__(
        self,
        *,
        clip_dim: int,
        hidden_dim: int,
        num_levels: int,
        relevance_threshold: float,
        min_active: int,
        init_scale: float,
        init_bias: float,
        enabled: bool,
        labeled_gate: str,
    ):
        """
        Args:
            clip_dim: C, width of the text / image CLIP embeddings.
            hidden_dim: D, width of the produced queries (and of each MLP's hidden layer).
            num_levels: L, number of hierarchy levels (one MLP each).
            relevance_threshold: classes with gate >= this are active.
            min_active: never fewer active classes than this per image (>= 1; clipped to K).
            init_scale: initial w of the relevance logit w * cos + b.
            init_bias: initial b of the relevance logit.
            enabled: False = ablation "static text queries" (gate 1, every class active).
            labeled_gate: gate of labelled images, "ground_truth" (the paper) or "union"
                (ground truth ∪ predicted active set, see the module docstring).
        """
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"HSQG.NUM_LEVELS must be >= 1, got {num_levels}")
        if min_active < 1:
            raise ValueError(
                f"HSQG.MIN_ACTIVE must be >= 1 (an image needs at least one class), "
                f"got {min_active}"
            )
        if not 0.0 <= relevance_threshold <= 1.0:
            raise ValueError(
                f"HSQG.RELEVANCE_THRESHOLD must be in [0, 1] (it is compared with a "
                f"sigmoid), got {relevance_threshold}"
            )
        if labeled_gate not in LABELED_GATES:
            raise ValueError(
                f"HSQG.LABELED_GATE must be one of {LABELED_GATES}, got {labeled_gate!r}"
            )
        self.labeled_gate = labeled_gate
        self.num_levels = num_levels
        self.relevance_threshold = relevance_threshold
        self.min_active = min_active
        self.enabled = enabled
        self.level_mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(clip_dim, hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, hidden_dim),
            )
            for _ in range(num_levels)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def relevance(self, text_embed: torch.Tensor, image_embed: torch.Tensor) -> torch.Tensor:
        """Predicted relevance s = sigmoid(w * cos(v, t) + b).

        Args:
            text_embed: (K, C) class embeddings t_k.
            image_embed: (B, C) global image embeddings v.
        Returns:
            (B, K) in (0, 1).
        """
        cos = F.normalize(image_embed, dim=-1) @ F.normalize(text_embed, dim=-1).t()
        return torch.sigmoid(self.logit_scale * cos + self.logit_bias)

    def forward(
        self,
        text_embed: torch.Tensor,
        image_embed: Optional[torch.Tensor],
        presence: Optional[torch.Tensor] = None,
        labeled: Optional[torch.Tensor] = None,
        *,
        num_images: Optional[int] = None,
    ) -> HSQGOutput:
        """
        Args:
            text_embed: (K, C) class text embeddings t_k.
            image_embed: (B, C) frozen-CLIP global image embeddings v; may be None when
                HSQG is disabled (static queries need no image), then give ``num_images``.
            presence: (B, K) bool, class k is in image b's ground truth; rows of
                unlabelled images are ignored. None = no image has ground truth.
            labeled: (B,) bool, which images use the ground-truth gate. None = all
                images are labelled when ``presence`` is given, none otherwise.
            num_images: B when ``image_embed`` is None.
        Returns:
            HSQGOutput (see its docstring).
        """
        if image_embed is None:
            if self.enabled or num_images is None:
                raise ValueError(
                    "HSQG: the frozen-CLIP image embedding is needed when HSQG is enabled "
                    "(and num_images when it is not given)"
                )
            queries = torch.stack([mlp(text_embed) for mlp in self.level_mlps])  # (L, K, D)
            ones = queries.new_ones(num_images, text_embed.shape[0])
            expanded = queries.unsqueeze(0).expand(num_images, -1, -1, -1)
            return HSQGOutput(expanded, ones, None, ones.bool())
        expected_image_shape = (image_embed.shape[0], text_embed.shape[-1])
        if text_embed.dim() != 2 or image_embed.shape != expected_image_shape:
            raise ValueError(
                f"HSQG: expected text (K, C) and image (B, C) embeddings, got "
                f"{tuple(text_embed.shape)} and {tuple(image_embed.shape)}"
            )
        num_images = image_embed.shape[0]
        queries = torch.stack([mlp(text_embed) for mlp in self.level_mlps])  # (L, K, D)
        relevance = self.relevance(text_embed, image_embed)  # (B, K)

        if not self.enabled:
            gate = torch.ones_like(relevance)
            active = torch.ones_like(relevance, dtype=torch.bool)
            return HSQGOutput(
                queries.unsqueeze(0).expand(num_images, -1, -1, -1), gate, relevance, active
            )

        gate = self._gate(relevance, presence, labeled)
        active = self._active(gate, relevance, gate_is_relevance=presence is None)
        return HSQGOutput(gate[:, None, :, None] * queries[None], gate, relevance, active)

    def _gate(
        self,
        relevance: torch.Tensor,
        presence: Optional[torch.Tensor],
        labeled: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """(B, K): ground-truth indicator on labelled rows (with ``labeled_gate="union"``:
        1 on ground-truth classes, the predicted relevance on the others), predicted
        relevance elsewhere."""
        if presence is None:
            if labeled is not None and bool(labeled.any()):
                raise ValueError("HSQG: images are marked labelled but no presence was given")
            return relevance
        if presence.shape != relevance.shape:
            raise ValueError(
                f"HSQG: presence has shape {tuple(presence.shape)}, expected (B, K) = "
                f"{tuple(relevance.shape)}"
            )
        if labeled is None:
            labeled = torch.ones(relevance.shape[0], dtype=torch.bool, device=relevance.device)
        if labeled.shape != relevance.shape[:1]:
            raise ValueError(
                f"HSQG: labeled has shape {tuple(labeled.shape)}, expected (B,) = "
                f"({relevance.shape[0]},)"
            )
        truth = presence.to(relevance.dtype)
        if self.labeled_gate == "union":
            truth = torch.where(presence, truth, relevance)
        return torch.where(labeled[:, None], truth, relevance)

    @torch.no_grad()
    def _active(
        self, gate: torch.Tensor, relevance: torch.Tensor, *, gate_is_relevance: bool = False
    ) -> torch.Tensor:
        """(B, K) bool: gate >= threshold, plus the ``min_active`` best-ranked classes.

        Ranking is by gate, ties (0/1 gates of labelled images) broken by the predicted
        relevance, so an image with no ground-truth class keeps its most likely ones.
        ``gate_is_relevance`` (no ground truth, as at inference): the two keys are one, and
        ``topk`` gives the same classes without the stable sorts ONNX cannot express
        (relevances of distinct class names do not tie exactly).
        """
        active = gate >= self.relevance_threshold
        keep = min(self.min_active, gate.shape[1])
        if keep == 0:
            return active
        if gate_is_relevance:
            top = relevance.topk(keep, dim=1).indices
            return active.scatter(1, top, torch.ones_like(top, dtype=torch.bool))
        # Two stable sorts = lexicographic order (gate, then relevance), both descending.
        order = torch.sort(relevance, dim=1, descending=True, stable=True).indices
        by_gate = torch.sort(gate.gather(1, order), dim=1, descending=True, stable=True).indices
        top = order.gather(1, by_gate[:, :keep])
        return active.scatter(1, top, torch.ones_like(top, dtype=torch.bool))
