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
