"""Cross-Modal Spatial Alignment Module (CMSAM, paper §3.3, DESIGN §1.5).

Bidirectional cross-attention between the text queries of one hierarchy level and the
pixels of the matching feature level:

1. text -> pixel (queries absorb location cues), per head h:
       alpha_kp = softmax_p((W_Q q~_k) . (W_K (x_p + pos_p)) / sqrt(d))
       q^_k     = q~_k + W_O concat_h(sum_p alpha_kp W_V x_p)
   then a post-norm block: q = LN(q^); q = LN(q + FFN(q)).
   With one head and W_O = I this is exactly the paper's q^ = q~ + sum_p alpha v_p;
   W_O is the usual multi-head output projection.
2. pixel -> text (class priors into pixels): every pixel attends to the ACTIVE refined
   queries of step 1 (key padding from ``query_active``):
       x'_p = LN(x_p + W_O' sum_k beta_pk W_V' q_k),
       beta_pk = softmax_k over active k ((W_Q' (x_p + pos_p)) . (W_K' q_k) / sqrt(d)).
   No FFN on the pixel side: the next deformable encoder layer has one.

Positional encodings (sine + level embedding of the pixel decoder) are added where a
pixel's location should steer the attention weights (pixel keys in step 1, pixel queries
in step 2) but not to the values, as in DETR. Text queries carry no position.

Inactive queries are pruned: they are left unchanged by step 1 and are invisible to
step 2, so they affect no other output. An image with no active query gets no class
prior, only the LayerNorm (HSQG guarantees one active class; the module does not rely on
it). Padding pixels (``pixel_padding``) are never attended; each image needs one real pixel.

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels) on explicitly
projected q/k/v, so the math can be recomputed from the module's weights.

Shape letters: B images, Kq queries, P pixels, D width, H heads, d = D / H.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from hiervl.modeling.attention import MultiHeadAttention


class CMSAM(nn.Module):
    """Bidirectional text <-> pixel alignment for one feature level."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        """
        Args:
            dim: D, width of queries and pixel features.
            num_heads: attention heads (D must be divisible by it).
            ffn_dim: hidden width of the query-side FFN.
            dropout: dropout on attention weights and residual branches.
        """
        super().__init__()
        # text -> pixel
        self.text_to_pixel = MultiHeadAttention(
            dim=dim, num_heads=num_heads, dropout=dropout, name="CMSAM width"
        )
        self.text_norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim),
        )
        self.text_norm2 = nn.LayerNorm(dim)
        # pixel -> text
        self.pixel_to_text = MultiHeadAttention(
            dim=dim, num_heads=num_heads, dropout=dropout, name="CMSAM width"
        )
        self.pixel_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_active: torch.Tensor,
        pixels: torch.Tensor,
        pixel_pos: Optional[torch.Tensor] = None,
        pixel_padding: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: (B, Kq, D) text queries q~ of one level.
            query_active: (B, Kq) bool, False = pruned class.
            pixels: (B, P, D) flattened pixel features x_p.
            pixel_pos: (B, P, D) positional encoding of the pixels, or None.
            pixel_padding: (B, P) bool, True = padding pixel (never attended), or None.
        Returns:
            queries': (B, Kq, D) aligned queries (inactive ones unchanged).
            pixels': (B, P, D) pixel features with class priors.
        """
        if query_active.shape != queries.shape[:2]:
            raise ValueError(
                f"CMSAM: query_active has shape {tuple(query_active.shape)}, expected "
                f"{tuple(queries.shape[:2])}"
            )
        pixel_keys = pixels if pixel_pos is None else pixels + pixel_pos
        # Key masks broadcast over heads and query rows: (B, 1, 1, N_keys).
        pixel_valid = None if pixel_padding is None else ~pixel_padding[:, None, None, :]

        # text -> pixel: each query gathers visual context.
        context = self.text_to_pixel(queries, pixel_keys, pixels, pixel_valid)
        aligned = self.text_norm1(queries + self.drop(context))
        aligned = self.text_norm2(aligned + self.drop(self.ffn(aligned)))
        aligned = torch.where(query_active[..., None], aligned, queries)

        # pixel -> text: each pixel gathers the priors of the active classes.
        has_active = query_active.any(dim=1)  # (B,)
        # A row with no valid key would make softmax NaN: open it, then drop its update.
        key_valid = query_active | ~has_active[:, None]
        priors = self.pixel_to_text(pixel_keys, aligned, aligned, key_valid[:, None, None, :])
        priors = priors * has_active[:, None, None].to(priors.dtype)
        return aligned, self.pixel_norm(pixels + self.drop(priors))
