"""ViTDet-style simple feature pyramid: single-stride ViT token maps -> multi-stride maps.

Each pyramid level takes the token map of its own ViT block (all at the ViT's
stride p), resamples it to the level's stride s — log2(p/s) stride-2
transposed convolutions when s < p, identity when s == p, log2(s/p) 2×2 max-pools
when s > p — and projects it to the level's channel count with a 1×1 conv +
GroupNorm followed by a 3×3 conv + GroupNorm (ViTDet's projection, with GroupNorm
instead of LayerNorm/BatchNorm so that it is batch-size independent).

Shape letters: B batch, W_v ViT width, h×w token grid (stride p), N = h·w,
c_i channels and s_i stride of level i.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["SimpleFeaturePyramid"]


def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    # The largest group count <= max_groups that divides the channels, so that tiny
    # test widths (8, 16 channels) work with the usual 32 groups at full size.
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


def _scale_steps(in_stride: int, out_stride: int) -> int:
    """Signed number of 2× steps from ``in_stride`` to ``out_stride`` (>0: upsample)."""
    if in_stride <= 0 or out_stride <= 0:
        raise ValueError(f"strides must be positive, got {in_stride} and {out_stride}")
    ratio = in_stride / out_stride
    steps = round(math.log2(ratio))
    if 2.0**steps != ratio:
        raise ValueError(
            f"pyramid stride {out_stride} is not a power-of-two multiple or fraction of the "
            f"ViT stride (patch size) {in_stride}"
        )
    return steps


class SimpleFeaturePyramid(nn.Module):
    """Resample + project one ViT token map per output level."""

    def __init__(
        self,
        *,
        in_channels: int,
        in_stride: int,
        out_strides: Sequence[int],
        out_channels: Sequence[int],
        norm_groups: int,
    ):
        """
        Args:
            in_channels: W_v, width of the ViT tokens.
            in_stride: p, the ViT patch size.
            out_strides: s_i per level, each p·2^k for an integer k.
            out_channels: c_i per level.
            norm_groups: maximum GroupNorm group count (the gcd with the channels is used).
        """
        super().__init__()
        if len(out_strides) != len(out_channels):
            raise ValueError(
                f"{len(out_strides)} pyramid strides but {len(out_channels)} channel counts "
                f"({list(out_channels)})"
            )
        if any(c <= 0 for c in out_channels):
            raise ValueError(f"pyramid channels must be positive, got {list(out_channels)}")
        self.out_strides = tuple(out_strides)
        self.out_channels = tuple(out_channels)
        # Pre-LN ViT residual streams have a few huge channels; normalise each tap first.
        self.token_norms = nn.ModuleList(nn.LayerNorm(in_channels) for _ in out_strides)
        self.resamplers = nn.ModuleList()
        self.projections = nn.ModuleList()
        for stride, channels in zip(out_strides, out_channels):
            resample, width = self._resampler(
                in_channels, _scale_steps(in_stride, stride), norm_groups
            )
            self.resamplers.append(resample)
            self.projections.append(
                nn.Sequential(
                    nn.Conv2d(width, channels, kernel_size=1, bias=False),
                    _group_norm(channels, norm_groups),
                    nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
                    _group_norm(channels, norm_groups),
                )
            )

    @staticmethod
    def _resampler(width: int, steps: int, norm_groups: int) -> Tuple[nn.Module, int]:
        """Layers taking stride p to stride p / 2^steps; returns them and their output width."""
        layers: List[nn.Module] = []
        if steps < 0:
            layers = [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-steps)]
        for step in range(steps):
            # Halve the width per 2× upsampling (as ViTDet) to bound the stride-4 cost.
            out_width = width // 2 if width % 2 == 0 else width
            if step > 0:
                layers += [_group_norm(width, norm_groups), nn.GELU()]
            layers.append(nn.ConvTranspose2d(width, out_width, kernel_size=2, stride=2))
            width = out_width
        return (nn.Sequential(*layers) if layers else nn.Identity()), width

    def forward(self, tokens: Sequence[torch.Tensor], grid: Tuple[int, int]) -> List[torch.Tensor]:
        """
        Args:
            tokens: one (B, N, W_v) patch-token tensor per level (no class token).
            grid: (h, w) with h·w = N.
        Returns:
            one (B, c_i, h·p/s_i, w·p/s_i) map per level (max-pool floors odd sizes).
        """
        assert len(tokens) == len(self.resamplers), (
            f"{len(tokens)} token maps for {len(self.resamplers)} pyramid levels"
        )
        height, width = grid
        outputs = []
        for x, norm, resample, project in zip(
            tokens, self.token_norms, self.resamplers, self.projections
        ):
            assert x.shape[1] == height * width, f"{x.shape[1]} tokens for grid {grid}"
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, height, width)
            outputs.append(project(resample(x)))
        return outputs
