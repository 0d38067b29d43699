"""Masked scaled-dot-product attention shared by CMSAM and the dual-query decoder.

``F.scaled_dot_product_attention`` with a *boolean* mask returns NaN on torch 2.3's CPU
kernel for any query whose first 512 keys are all masked (its blockwise softmax starts
from -inf), which HierVL's masked cross-attention hits at crops above ~180 px. An
additive mask with a large *finite* negative value gives the same result on every
version and keeps the fused kernels.

Shape letters: B batch, H heads, Nq queries, Nk keys, d head width.
"""

import math
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


# How ``MultiHeadAttention`` evaluates its formula (all three are the same math):
STANDARD = "standard"  # project queries, keys and values, fused kernel (SDPA)
FOLD_QUERIES = "fold_queries"  # few queries: W_K / W_V move onto the query side
FOLD_KEYS = "fold_keys"  # few keys: W_Q / W_O move onto the key side
ORDERS = ("auto", STANDARD, FOLD_QUERIES, FOLD_KEYS)


def attention_cost(order: str, num_queries: int, num_keys: int, dim: int, heads: int) -> int:
    """Multiply-adds of one head-set of attention (per image) in a given evaluation order.

    standard:     Q, K, V, O projections + scores + weighted sum
                  = 2 (Nq + Nk) D^2 + 2 Nq Nk D
    fold_queries: the per-head query is mapped back through W_K (Nq D^2), the weighted
                  sum of raw values goes through W_V per head (Nq D^2), plus the Q and O
                  projections; scores and sum run at width D for every head
                  = 4 Nq D^2 + 2 H Nq Nk D
    fold_keys:    symmetric, for few keys = 4 Nk D^2 + 2 H Nq Nk D
    """
    nq, nk, d, h = num_queries, num_keys, dim, heads
    if order == STANDARD:
        return 2 * (nq + nk) * d * d + 2 * nq * nk * d
    if order == FOLD_QUERIES:
        return 4 * nq * d * d + 2 * h * nq * nk * d
    if order == FOLD_KEYS:
        return 4 * nk * d * d + 2 * h * nq * nk * d
    raise ValueError(f"unknown attention order {order!r}; expected one of {ORDERS}")


# A folded order runs unfused (bmm, mask, softmax, bmm) where ``standard`` uses one fused
# kernel, so it is picked only when it needs at most this fraction of the multiply-adds.
FOLD_MARGIN = 0.5


def cheapest_order(num_queries: int, num_keys: int, dim: int, heads: int) -> str:
    """``standard`` unless a folded order needs at most FOLD_MARGIN of its multiply-adds
    (then the cheaper fold)."""
    standard = attention_cost(STANDARD, num_queries, num_keys, dim, heads)
    folds = [
        (attention_cost(o, num_queries, num_keys, dim, heads), o) for o in (FOLD_QUERIES, FOLD_KEYS)
    ]
    cost, order = min(folds)
    return order if cost <= FOLD_MARGIN * standard else STANDARD


class MultiHeadAttention(nn.Module):
    """Multi-head attention with explicit q/k/v/out projections.

        out = W_O concat_h softmax_keys((W_Q^h query) . (W_K^h key) / sqrt(d)) (W_V^h value)

    (biases included). The projections are plain ``nn.Linear`` layers (xavier-initialised,
    zero bias), so tests can recompute the attention from the module's own weights.

    The formula is evaluated in one of three exact orders, chosen by multiply-add count
    (``cheapest_order``). Most attention here projects every token
    (``standard``, fused SDPA kernel). When one side is a handful of tokens and the other
    is thousands of pixels (CMSAM: a few active text queries against every pixel of a
    level), projecting the pixels dominates, and associativity removes it:

    - few queries (``fold_queries``): (W_Q^h q)·(W_K^h x + b_K^h) = (W_K^h^T W_Q^h q)·x +
      a term constant over the keys (softmax ignores it), and
      sum_x a (W_V^h x + b_V^h) = W_V^h (sum_x a x) + (sum_x a) b_V^h;
    - few keys (``fold_keys``): (W_Q^h x + b_Q^h)·k^h = x·(W_Q^h^T k^h) + b_Q^h·k^h and
      W_O^h sum_k a v^h = sum_k a (W_O^h v^h), with k^h, v^h the projected keys/values.

    Pixels are then only read, never projected: the cost goes from O(P D^2) to
    O(H Nq P D), e.g. 8x fewer multiply-adds for 4 queries against 4096 pixels at D = 256
    and 8 heads.
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
        self.order = "auto"  # tests pin one of ORDERS to compare them
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N, d)."""
        b, n, dim = x.shape
        return x.view(b, n, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def _head_weights(self, layer: nn.Linear) -> torch.Tensor:
        """An input projection's weight split by output head: (H, d, D)."""
        return layer.weight.view(self.num_heads, -1, layer.weight.shape[1])

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
        order = self.order
        if order == "auto":
            order = cheapest_order(query.shape[1], key.shape[1], query.shape[2], self.num_heads)
        if order in (FOLD_QUERIES, FOLD_KEYS):
            # The batched matmuls below need one batch size (keys may be shared: B = 1).
            b = max(query.shape[0], key.shape[0])
            query, key = query.expand(b, -1, -1), key.expand(b, -1, -1)
            value = value.expand(b, -1, -1)
            fold = self._fold_queries if order == FOLD_QUERIES else self._fold_keys
            return fold(query, key, value, allowed)
        if order != STANDARD:
            raise ValueError(f"unknown attention order {order!r}; expected one of {ORDERS}")
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        out = masked_attention(q, k, v, allowed, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _softmax(self, scores: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """Masked softmax over the last axis of (B, H, Nq, Nk) scores, then dropout."""
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min / 2)
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        return weights

    def _widened(self, x: torch.Tensor, own: nn.Linear, other: nn.Linear):
        """Project the short side ``x`` (B, N, D) with ``own`` (scaled by 1/sqrt(d)) and
        map it back through the other side's projection, head by head.

        Returns:
            p: (B, H, N, d) = own^h x / sqrt(d);
            p_wide: (B, H, N, D) = other^h^T p^h, to be dotted with the other side's raw
                tokens;
            p_bias: (B, H, N, 1) = other's bias^h · p^h, the rest of the dot product.
        """
        heads = self.num_heads
        p = self._heads(own(x)) / math.sqrt(x.shape[-1] // heads)
        p_wide = torch.matmul(p, self._head_weights(other))
        p_bias = (p * other.bias.view(1, heads, 1, -1)).sum(-1, keepdim=True)
        return p, p_wide, p_bias

    def _fold_queries(self, query, key, value, allowed) -> torch.Tensor:
        """``forward`` for few queries: keys and values are never projected."""
        b, nq, dim = query.shape
        heads, nk = self.num_heads, key.shape[1]
        _, q_wide, k_bias = self._widened(query, self.q_proj, self.k_proj)
        scores = torch.bmm(q_wide.reshape(b, heads * nq, dim), key.transpose(1, 2))
        # q^h·b_K^h is the same for every key, so softmax ignores it; it is added anyway
        # (B·H·Nq additions) so that b_K stays in the graph like in the standard order.
        weights = self._softmax(scores.view(b, heads, nq, nk) + k_bias, allowed)
        summed = torch.bmm(weights.reshape(b, heads * nq, nk), value)  # (B, H·Nq, D)
        summed = summed.view(b, heads, nq, dim)
        # W_V^h (sum a x) + (sum a) b_V^h: sum a is 1 unless dropout removed some weights.
        w_v = self._head_weights(self.v_proj).transpose(1, 2)  # (H, D, d)
        bias = self.v_proj.bias.view(heads, 1, -1)
        out = torch.matmul(summed, w_v) + weights.sum(dim=-1, keepdim=True) * bias
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, dim))

    def _fold_keys(self, query, key, value, allowed) -> torch.Tensor:
        """``forward`` for few keys: queries are never projected, W_O acts per key."""
        b, nq, dim = query.shape
        heads, nk = self.num_heads, key.shape[1]
        # x·(W_Q^h^T k^h) + b_Q^h·k^h
        _, k_wide, q_bias = self._widened(key, self.k_proj, self.q_proj)
        scores = torch.bmm(query, k_wide.reshape(b, heads * nk, dim).transpose(1, 2))
        scores = scores.view(b, nq, heads, nk).transpose(1, 2) + q_bias.transpose(2, 3)
        weights = self._softmax(scores, allowed)  # (B, H, Nq, Nk)
        # W_O^h v^h for every key: (B, H, Nk, D); the O bias is added once at the end.
        v = self._heads(self.v_proj(value))
        w_o = self.out_proj.weight.view(dim, heads, -1).permute(1, 2, 0)  # (H, d, D)
        v_out = torch.matmul(v, w_o)
        out = torch.bmm(
            weights.transpose(1, 2).reshape(b, nq, heads * nk), v_out.reshape(b, heads * nk, dim)
        )
        return out + self.out_proj.bias.to(out.dtype)
