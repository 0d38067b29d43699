"""Pure-PyTorch reference of multi-scale deformable attention (Deformable-DETR).

Shape letters: N batch, S = sum of H_l·W_l flattened value positions over all levels,
nH heads, Dh channels per head, Lq queries, nL feature levels, nP sampling points per
head and level.

Every query gathers, for each head, nP bilinear samples from each of the nL value maps and
returns their attention-weighted sum. Sampling follows ``F.grid_sample(align_corners=False,
padding_mode="zeros")``: a location (x, y) in [0, 1] maps to the pixel coordinate
(x·W - 0.5, y·H - 0.5), and taps that fall outside the map read zeros. The compiled kernels
in ``hiervl/ops/csrc`` implement exactly this sampling rule; this file is their oracle.
"""

from typing import List

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference", "level_sizes"]


def level_sizes(spatial_shapes: torch.Tensor) -> List[int]:
    """H_l·W_l of every level as Python ints (one host sync; shapes are tiny).

    Args:
        spatial_shapes: (nL, 2) integer tensor of (H_l, W_l).
    """
    return [int(h) * int(w) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample`` per level.

    Args:
        value: (N, S, nH, Dh) values of all levels, flattened row-major per level.
        spatial_shapes: (nL, 2) long, (H_l, W_l) of each level.
        level_start_index: (nL,) long, offset of each level inside S. Unused here (the
            levels are contiguous in order); kept so every implementation shares one
            signature.
        sampling_locations: (N, Lq, nH, nL, nP, 2) normalised (x, y); [0, 1] covers the map,
            values outside it sample zero padding.
        attention_weights: (N, Lq, nH, nL, nP) weights of the samples (softmax-normalised
            over nL·nP by the caller).

    Returns:
        (N, Lq, nH·Dh) attended values, heads concatenated.
    """
    del level_start_index  # levels are split by their sizes, which imply the offsets
    n, s, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = level_sizes(spatial_shapes)
    assert sum(sizes) == s, f"spatial_shapes cover {sum(sizes)} positions, value has {s}"

    value_levels = value.split(sizes, dim=1)
    # grid_sample wants grids in [-1, 1]; align_corners=False makes -1 the left edge of
    # the first pixel, which is what 0 means for the normalised locations.
    grids = 2.0 * sampling_locations - 1.0
    samples = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H·W, nH, Dh) -> (N·nH, Dh, H, W): one image per (batch, head).
        value_l = value_levels[level].flatten(2).transpose(1, 2)
        value_l = value_l.reshape(n * n_heads, head_dim, h, w)
        # (N, Lq, nH, nP, 2) -> (N·nH, Lq, nP, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        samples.append(sampled)  # (N·nH, Dh, Lq, nP)
    # (N, Lq, nH, nL, nP) -> (N·nH, 1, Lq, nL·nP)
    weights = attention_weights.transpose(1, 2).reshape(
        n * n_heads, 1, n_queries, n_levels * n_points
    )
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (N·nH, Dh, Lq)
    return out.view(n, n_heads * head_dim, n_queries).transpose(1, 2).contiguous()
