"""Multi-scale deformable attention: autograd Function, kernel dispatch and the nn.Module.

Shape letters: N batch, Lq queries, D model width, S = sum of H_l·W_l flattened value
positions, nH heads, Dh = D / nH channels per head, nL feature levels, nP sampling points
per head and level.

``ms_deform_attn`` runs the compiled kernel of ``hiervl._C`` for the tensors' device when it
exists and the PyTorch reference otherwise (warning once). Either way the math is float32
(float64 when an input is float64) and the result is cast back to the value's dtype, so the
op is safe under autocast.
"""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from hiervl.ops import _ext
from hiervl.ops.ms_deform_attn_ref import level_sizes, ms_deform_attn_reference

__all__ = ["MSDeformAttnFunction", "ms_deform_attn", "MSDeformAttn"]


class MSDeformAttnFunction(torch.autograd.Function):
    """The compiled kernels as an autograd Function (inputs already contiguous, one dtype).

    Gradients flow to value, sampling_locations and attention_weights; spatial_shapes and
    level_start_index are integer metadata.
    """

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        module = _ext.compiled_module()
        assert module is not None, "MSDeformAttnFunction called without hiervl._C"
        ctx.module = module  # the backward uses the very kernels that ran forward
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return module.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.module.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, grad_output.contiguous()
        )
        return grad_value, None, None, grad_locations, grad_weights


def _autocast_off(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention on the best available kernel.

    Args:
        value: (N, S, nH, Dh) values of all levels, flattened row-major per level.
        spatial_shapes: (nL, 2) long, (H_l, W_l) of each level.
        level_start_index: (nL,) long, offset of each level inside S.
        sampling_locations: (N, Lq, nH, nL, nP, 2) normalised (x, y) in [0, 1]; outside
            samples zero padding (``grid_sample(align_corners=False)`` convention).
        attention_weights: (N, Lq, nH, nL, nP) weights of the samples.

    Returns:
        (N, Lq, nH·Dh) in value's dtype.
    """
    device = value.device
    inputs = (value, sampling_locations, attention_weights)
    compute_dtype = torch.float64 if torch.float64 in {t.dtype for t in inputs} else torch.float32
    value32, locations32, weights32 = (t.to(compute_dtype).contiguous() for t in inputs)
    shapes = spatial_shapes.to(device=device, dtype=torch.long).contiguous()
    starts = level_start_index.to(device=device, dtype=torch.long).contiguous()
    with _autocast_off(device):
        if _ext.reference_forced():
            out = ms_deform_attn_reference(value32, shapes, starts, locations32, weights32)
        elif _ext.compiled_available(device):
            out = MSDeformAttnFunction.apply(value32, shapes, starts, locations32, weights32)
        else:
            _ext.warn_fallback_once(device)
            out = ms_deform_attn_reference(value32, shapes, starts, locations32, weights32)
    return out.to(value.dtype)


class MSDeformAttn(nn.Module):
    """Deformable-DETR's multi-scale deformable attention layer.

    Each query predicts, per head, nP sampling offsets around its reference point on every
    level and a softmax over the nL·nP samples; the sampled (projected) values are summed
    with those weights and projected back to D.
    """

    def __init__(
        self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ):
        """
        Args:
            d_model: width D of queries and values; must be divisible by n_heads.
            n_levels: number of feature levels nL.
            n_heads: attention heads nH.
            n_points: sampling points nP per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}"
            )
        for name, v in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if v < 1:
                raise ValueError(f"MSDeformAttn: {name}={v} must be >= 1")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's initialisation.

        Offsets start as a fixed pattern: head h looks along direction 2πh/nH (scaled so the
        larger coordinate is 1 pixel), point p at distance p+1, the same on every level,
        so the heads cover a star around the reference point before training. Attention
        starts uniform (zero logits).
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (nH, 2)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float64)  # (nP,)
        bias = directions[:, None, None, :] * distance[None, None, :, None]
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1).to(self.sampling_offsets.bias))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: "torch.Tensor | None" = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, D) queries (with their positional embedding added).
            reference_points: (N, Lq, nL, 2) normalised (x, y) in [0, 1] per level.
            input_flatten: (N, S, D) values of all levels, flattened row-major per level.
            input_spatial_shapes: (nL, 2) long, (H_l, W_l).
            input_level_start_index: (nL,) long, offset of each level inside S.
            input_padding_mask: (N, S) bool, True at padded positions (they read zero), or None.

        Returns:
            (N, Lq, D)
        """
        n, n_queries, _ = query.shape
        _, s, _ = input_flatten.shape
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                "MSDeformAttn: input_spatial_shapes has shape "
                f"{tuple(input_spatial_shapes.shape)}, expected ({self.n_levels}, 2) "
                f"for n_levels={self.n_levels}"
            )
        covered = sum(level_sizes(input_spatial_shapes))
        if covered != s:
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes {input_spatial_shapes.tolist()} cover "
                f"{covered} positions but input_flatten has {s}"
            )
        if reference_points.shape != (n, n_queries, self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: reference_points has shape {tuple(reference_points.shape)}, "
                f"expected {(n, n_queries, self.n_levels, 2)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(
            n, n_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            n, n_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = F.softmax(weights, dim=-1).view(
            n, n_queries, self.n_heads, self.n_levels, self.n_points
        )
        # Offsets are in pixels of each level: divide by (W_l, H_l) to normalise.
        normalizer = input_spatial_shapes.flip(-1).to(offsets)  # (nL, 2) as (W, H)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights
        )
        return self.output_proj(out)
