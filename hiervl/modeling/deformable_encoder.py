"""Pieces of Deformable-DETR's encoder used by the pixel decoder.

- ``sine_position_encoding``: DETR's 2-D sine encoding of a feature grid (normalised
  coordinates, so it does not depend on the image size).
- ``encoder_reference_points``: every flattened position's own centre, shared by all levels.
- ``DeformableEncoderLayer``: multi-scale deformable self-attention + FFN, post-norm.

Shape letters: B batch, S = sum over feature levels of h_f·w_f flattened positions,
F feature levels, D width.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from hiervl.ops import MSDeformAttn


def sine_position_encoding(
    height: int,
    width: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding of an h×w grid.

    Pixel centres are mapped to (0, 2π) per axis; the first D/2 channels encode y, the
    last D/2 encode x, each as interleaved sin/cos at geometric frequencies.

    Args:
        height, width: grid size h, w.
        dim: D, must be divisible by 4 (sin + cos per axis).
        temperature: base of the geometric frequency ladder.
    Returns:
        (h·w, D), row-major over the grid like ``x.flatten(2).transpose(1, 2)``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sine position encoding needs a width divisible by 4, got {dim}")
    feats = dim // 2
    # Centres (i + 0.5) / n, scaled to (0, 2π): the same physical place gets the same code
    # at every resolution.
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    exponent = 2 * (torch.arange(feats, device=device, dtype=torch.float32) // 2) / feats
    freqs = temperature**exponent  # (D/2,) pairs share a frequency

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[:, None] / freqs  # (n, D/2)
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, feats)
    pos_x = encode(x)[None, :, :].expand(height, width, feats)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, dim).to(dtype)


def encoder_reference_points(
    spatial_shapes: Sequence[Tuple[int, int]], *, device: torch.device | None = None
) -> torch.Tensor:
    """Normalised (x, y) centre of every flattened position, repeated for every level.

    Without padding the same normalised point names the same place on every level, so a
    position's reference point is its own centre on all F levels.

    Args:
        spatial_shapes: F pairs (h_f, w_f), in the flattening order.
    Returns:
        (S, F, 2) in (0, 1).
    """
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    flat = torch.cat(points, dim=0)
    return flat[:, None, :].expand(-1, len(spatial_shapes), -1)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x))."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        ffn_dim: int,
        dropout: float,
    ):
        """
        Args:
            dim: D.
            num_heads: deformable attention heads.
            num_levels: F feature levels sampled by every query.
            num_points: sampling points per head and level.
            ffn_dim: hidden width of the FFN.
            dropout: dropout on both residual branches and inside the FFN.
        """
        super().__init__()
        self.self_attn = MSDeformAttn(
            d_model=dim, n_levels=num_levels, n_heads=num_heads, n_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim),
        )
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        # MSDeformAttn initialises itself (offset star pattern); only the FFN gets Xavier.
        for layer in (self.ffn[0], self.ffn[3]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            src: (B, S, D) flattened features of all levels.
            pos: (B or 1, S, D) positional + level embedding.
            reference_points: (B, S, F, 2) normalised (x, y).
            spatial_shapes: (F, 2) long (h_f, w_f).
            level_start_index: (F,) long offset of each level in S.
            padding: (B, S) bool, True = padded position (its value reads 0), or None.
        Returns:
            (B, S, D)
        """
        attn = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding
        )
        src = self.norm1(src + self.drop(attn))
        return self.norm2(src + self.drop(self.ffn(src)))
