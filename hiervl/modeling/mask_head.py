"""Dynamic mask head: every decoder query becomes its own mask kernel and is classified
by cosine similarity to text embeddings.

Shape letters: B batch, Q queries, D query width, E mask-feature width (``mask_dim``),
h×w mask-feature map (stride 4), C CLIP embedding width, K classes of the current
vocabulary.

- mask kernel ``θ_i = MLP(q_i)`` (a shared ``kernel_mlp_layers``-layer MLP D → E) and
  mask logits ``M_i(x, y) = θ_i · F_pixel(x, y)``;
- ``Φ(q_i)``: a 2-layer MLP D → C, L2-normalised (``query_proj``; also the input of L_qt);
- class logits over K + 1 = ``exp(s) · cos(Φ(q_i), [t_1 .. t_K, e_void])`` with a
  learnable void ("no object") embedding ``e_void`` and a learnable log-scale ``s``.

A linear class head ``W_c`` would fix K at training time; the cosine classifier takes the
class embeddings as an input, so a new vocabulary at inference only needs new text
embeddings (open vocabulary) and the no-object column always exists.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DynamicMaskHead", "MLP"]

# CLIP clamps its learnable temperature at 100 so that softmax logits stay bounded.
LOGIT_SCALE_MAX = 100.0


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least 1 layer, got num_layers={num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., in_dim). Returns: (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DynamicMaskHead(nn.Module):
    """Per-query mask kernels + open-vocabulary cosine classifier (see module docstring)."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        mask_dim: int,
        clip_dim: int,
        kernel_mlp_layers: int,
        logit_scale_init: float,
    ):
        """
        Args:
            hidden_dim: D, width of the decoder queries.
            mask_dim: E, channels of the pixel decoder's mask features.
            clip_dim: C, width of the CLIP text embeddings.
            kernel_mlp_layers: layers of the shared kernel MLP (MASK_HEAD.KERNEL_MLP_LAYERS).
            logit_scale_init: initial classifier temperature (MASK_HEAD.LOGIT_SCALE_INIT),
                in (0, LOGIT_SCALE_MAX].
        """
        super().__init__()
        if not 0 < logit_scale_init <= LOGIT_SCALE_MAX:
            raise ValueError(
                f"MASK_HEAD.LOGIT_SCALE_INIT must be in (0, {LOGIT_SCALE_MAX}], "
                f"got {logit_scale_init}"
            )
        self.mask_dim = mask_dim
        self.clip_dim = clip_dim
        self.kernel_mlp = MLP(
            in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=mask_dim, num_layers=kernel_mlp_layers
        )
        self.proj = MLP(in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=clip_dim, num_layers=2)
        # Random direction: any fixed unit vector would do; learning moves it away from
        # the class embeddings.
        self.void_embed = nn.Parameter(torch.randn(clip_dim) / math.sqrt(clip_dim))
        # Learned in log space (as CLIP does) so the scale stays positive.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    def scale(self) -> torch.Tensor:
        """The current classifier temperature, exp(log-scale) clamped to LOGIT_SCALE_MAX."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def forward(
        self, queries: torch.Tensor, mask_features: torch.Tensor, class_embed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: (B, Q, D) decoder queries (already layer-normalised by the decoder).
            mask_features: (B, E, h, w) per-pixel embeddings F_pixel.
            class_embed: (K, C) text embeddings of the current vocabulary (need not be
                normalised; the classifier uses their direction only).

        Returns:
            logits: (B, Q, K + 1), last column = no object.
            masks: (B, Q, h, w) mask logits.
            query_proj: (B, Q, C) L2-normalised Φ(q).
        """
        if mask_features.shape[1] != self.mask_dim:
            raise ValueError(
                f"mask_features have {mask_features.shape[1]} channels, the mask head was "
                f"built for mask_dim={self.mask_dim}"
            )
        if class_embed.dim() != 2 or class_embed.shape[1] != self.clip_dim:
            raise ValueError(
                f"class_embed must be (K, {self.clip_dim}), got {tuple(class_embed.shape)}"
            )
        kernels = self.kernel_mlp(queries)  # (B, Q, E)
        masks = torch.einsum("bqe,behw->bqhw", kernels, mask_features)

        query_proj = F.normalize(self.proj(queries), dim=-1)
        classifier = torch.cat([class_embed, self.void_embed[None].to(class_embed.dtype)], dim=0)
        classifier = F.normalize(classifier, dim=-1).to(query_proj.dtype)  # (K + 1, C)
        logits = self.scale() * torch.einsum("bqc,kc->bqk", query_proj, classifier)
        return logits, masks, query_proj
