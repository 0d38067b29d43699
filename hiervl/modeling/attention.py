"""Masked scaled-dot-product attention shared by CMSAM and the dual-query decoder.

``F.scaled_dot_product_attention`` with a *boolean* mask returns NaN on torch 2.3's CPU
kernel for any query whose first 512 keys are all masked (its blockwise softmax starts
from -inf), which HierVL's masked cross-attention hits at crops above ~180 px. An
additive mask with a large *finite* negative value gives the same result on every
version and keeps the fused kernels.

Shape letters: B batch, H heads, Nq queries, Nk keys, d head width.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: Optional[torch.Tensor],
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention restricted to ``allowed`` keys.

    Args:
        q: (B,H,Nq,d); k, v: (B,H,Nk,d).
        allowed: bool broadcastable to (B,H,Nq,Nk), True = may attend, or None. Every
            query row needs at least one allowed key.
        dropout_p: attention dropout (0 in eval).
    Returns:
        (B,H,Nq,d).
    """
    mask = None
    if allowed is not None:
        # Half the dtype's minimum: finite after adding any realistic score, so no row
        # of the blockwise softmax starts from -inf.
        blocked = torch.finfo(q.dtype).min / 2
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~allowed, blocked)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with explicit q/k/v/out projections on fused kernels.

    The projections are plain ``nn.Linear`` layers (xavier-initialised, zero bias), so
    tests can recompute the attention from the module's own weights.
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float, name: str):
        """
        Args:
            dim: D, width of queries, keys and values.
            num_heads: heads (D must be divisible by it).
            dropout: dropout on the attention weights (training only).
            name: the config key of the width, for the error message.
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"{name}={dim} is not divisible by its NUM_HEADS={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N, d)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Nq, D) (positions already added); key: (B, Nk, D) (positions
                already added); value: (B, Nk, D).
            allowed: bool broadcastable to (B, H, Nq, Nk), True = may attend; every row
                must allow at least one key. None = no mask.
        Returns:
            (B, Nq, D) = W_O concat_h(softmax(q k^T / sqrt(d)) v).
        """
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        out = masked_attention(q, k, v, allowed, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))
