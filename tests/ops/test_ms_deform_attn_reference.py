"""The PyTorch reference of MSDeformAttn against hand computations and a scalar loop."""

import math

import torch
from msda_inputs import level_geometry, random_inputs

from hiervl.ops import ms_deform_attn_reference


def _loop_reference(value, spatial_shapes, level_start_index, locations, weights):
    """Scalar loop over every tap: the sampling rule written out literally."""
    n, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = locations.shape
    out = torch.zeros(n, n_queries, n_heads, head_dim, dtype=value.dtype)
    for b in range(n):
        for q in range(n_queries):
            for h in range(n_heads):
                for lvl in range(n_levels):
                    height, width = spatial_shapes[lvl].tolist()
                    start = int(level_start_index[lvl])
                    for p in range(n_points):
                        x = float(locations[b, q, h, lvl, p, 0]) * width - 0.5
                        y = float(locations[b, q, h, lvl, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < height and 0 <= xx < width:
                                    tap = value[b, start + yy * width + xx, h]
                                    out[b, q, h] += weights[b, q, h, lvl, p] * wy * wx * tap
    return out.flatten(2)


def test_pixel_centre_reads_the_pixel_and_midpoint_averages():
    # One 2x3 level, one head, one channel: value = position index + 1.
    shapes, starts, s = level_geometry([[2, 3]])
    value = torch.arange(1, s + 1, dtype=torch.float64).view(1, s, 1, 1)
    # Centre of pixel (row 1, col 2) is ((2 + 0.5) / 3, (1 + 0.5) / 2); the midpoint between
    # pixels (0, 0) and (0, 1) is (1 / 3, 0.25); the top-left corner (0, 0) is a quarter of
    # pixel (0, 0) (three taps in the zero padding).
    locations = torch.tensor(
        [[2.5 / 3, 0.75], [1 / 3, 0.25], [0.0, 0.0]], dtype=torch.float64
    ).view(1, 3, 1, 1, 1, 2)
    weights = torch.full((1, 3, 1, 1, 1), 2.0, dtype=torch.float64)
    out = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    expected = 2.0 * torch.tensor([6.0, 1.5, 0.25 * 1.0], dtype=torch.float64)
    torch.testing.assert_close(out.view(3), expected)


def test_levels_and_heads_are_weighted_and_concatenated():
    # Two 1x1 levels: every in-map location reads the single pixel with full weight only at
    # the pixel centre (0.5, 0.5).
    shapes, starts, s = level_geometry([[1, 1], [1, 1]])
    value = torch.tensor([[[1.0, 2.0]], [[10.0, 20.0]]], dtype=torch.float64)  # (S, nH, 1)
    value = value.view(1, s, 2, 1)
    locations = torch.full((1, 1, 2, 2, 1, 2), 0.5, dtype=torch.float64)
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2, 1)
    out = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    # head 0: 0.25 * 1 + 0.75 * 10; head 1: 1.0 * 2 + 0.0 * 20.
    torch.testing.assert_close(out.view(2), torch.tensor([7.75, 2.0], dtype=torch.float64))


def test_matches_scalar_loop_on_random_inputs():
    inputs = random_inputs(
        batch=2, shapes=[[3, 5], [2, 2], [1, 3]], heads=2, channels=3, queries=4, points=3
    )
    inputs = [t.detach() for t in inputs]
    torch.testing.assert_close(
        ms_deform_attn_reference(*inputs), _loop_reference(*inputs), rtol=1e-12, atol=1e-12
    )


def test_far_outside_reads_zero():
    inputs = random_inputs(
        batch=1, shapes=[[4, 4]], heads=1, channels=2, queries=3, points=2, low=1.2, high=3.0
    )
    out = ms_deform_attn_reference(*[t.detach() for t in inputs])
    assert torch.count_nonzero(out) == 0
