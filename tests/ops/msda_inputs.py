"""Random MSDeformAttn inputs shared by the op tests (no detectron2)."""

from typing import List, Sequence, Tuple

import torch


def level_geometry(shapes: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(spatial_shapes (nL, 2) long, level_start_index (nL,) long, S) for a list of (H, W)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(dim=1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, starts, int(sizes.sum())


def random_inputs(
    *,
    batch: int,
    shapes: List[List[int]],
    heads: int,
    channels: int,
    queries: int,
    points: int,
    dtype: torch.dtype = torch.float64,
    low: float = -0.25,
    high: float = 1.25,
    seed: int = 0,
    device: str = "cpu",
):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights.

    Locations are uniform in [low, high]^2, so by default some samples fall partly or wholly
    outside the map (zero padding). The float tensors require grad.
    """
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, s = level_geometry(shapes)
    levels = len(shapes)
    value = torch.randn(batch, s, heads, channels, generator=gen, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype)
    locations = locations * (high - low) + low
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=dtype)
    tensors = [t.to(device).requires_grad_() for t in (value, locations, weights)]
    return (
        tensors[0],
        spatial_shapes.to(device),
        starts.to(device),
        tensors[1],
        tensors[2],
    )


def outputs_and_grads(fn, inputs, grad_output=None):
    """fn(*inputs), then grads of (value, locations, weights) for a fixed random grad_output."""
    value, shapes, starts, locations, weights = inputs
    out = fn(value, shapes, starts, locations, weights)
    if grad_output is None:
        gen = torch.Generator().manual_seed(1)
        # Drawn in float64 and rounded, so every dtype sees (a rounding of) the same numbers.
        grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grad_output = grad_output.to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, (value, locations, weights), grad_output)
    return out, grads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zero)."""
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff
