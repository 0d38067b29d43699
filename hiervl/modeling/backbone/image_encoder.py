"""E_I^θ: the fine-tuned CLIP ViT image encoder as a multi-scale segmentation backbone.

The token maps after the 1-based blocks ``out_indices`` (default 3, 6, 9, 12) feed
res2..res5 in that order through a simple feature pyramid (strides 4, 8, 16, 32).
The position embedding is resampled to each input's token grid, so any H, W that
the patch size divides is accepted.

Shape letters: B batch, H×W input size, p patch size, h×w = H/p × W/p token grid,
N = h·w patch tokens (row-major, no class token), W_v tower width, C CLIP
embedding width, c_i channels of pyramid level i.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from .clip_vit import apply_block, check_vision_tower, embed_tokens, project_tokens, token_grid
from .feature_pyramid import SimpleFeaturePyramid

__all__ = ["CLIPImageBackbone", "PYRAMID_NAMES", "PYRAMID_STRIDES"]

# Detectron2-style names and strides of the backbone outputs (coarsest last).
PYRAMID_NAMES = ("res2", "res3", "res4", "res5")
PYRAMID_STRIDES = (4, 8, 16, 32)


class CLIPImageBackbone(nn.Module):
    """Fine-tuned open_clip ViT + simple feature pyramid -> {res2..res5}."""

    def __init__(
        self,
        *,
        visual: VisionTransformer,
        out_indices: Sequence[int],
        pyramid_channels: Sequence[int],
        norm_groups: int = 32,
    ):
        """
        Args:
            visual: the open_clip image tower (owned and fine-tuned by this module).
            out_indices: 1-based block indices feeding res2..res5, one per level.
            pyramid_channels: c_i of res2..res5.
            norm_groups: maximum GroupNorm groups in the pyramid.
        """
        super().__init__()
        check_vision_tower(visual)
        num_blocks = len(visual.transformer.resblocks)
        if len(out_indices) != len(PYRAMID_NAMES):
            raise ValueError(
                f"OUT_INDICES needs {len(PYRAMID_NAMES)} block indices (one per "
                f"{'/'.join(PYRAMID_NAMES)}), got {list(out_indices)}"
            )
        bad = [i for i in out_indices if not 1 <= int(i) <= num_blocks]
        if bad:
            raise ValueError(
                f"OUT_INDICES {list(out_indices)}: {bad} outside 1..{num_blocks} "
                f"(the tower has {num_blocks} blocks; indices are 1-based)"
            )
        if len(pyramid_channels) != len(PYRAMID_NAMES):
            raise ValueError(
                f"PYRAMID_CHANNELS needs {len(PYRAMID_NAMES)} values, got {list(pyramid_channels)}"
            )
        self.visual = visual
        self.out_indices = tuple(int(i) for i in out_indices)
        self.patch_size = int(visual.patch_size[0])
        self.width = int(visual.transformer.width)
        self.embed_dim = int(visual.proj.shape[1])
        self.pyramid = SimpleFeaturePyramid(
            in_channels=self.width,
            in_stride=self.patch_size,
            out_strides=PYRAMID_STRIDES,
            out_channels=[int(c) for c in pyramid_channels],
            norm_groups=norm_groups,
        )

    @property
    def size_divisibility(self) -> int:
        """Input sizes divisible by this give exact H/4 .. H/32 maps (and a valid token grid)."""
        return math.lcm(self.patch_size, max(PYRAMID_STRIDES))

    def output_shape(self) -> Dict[str, Tuple[int, int]]:
        """{name: (channels, stride)} of the outputs of :meth:`forward`."""
        return {
            name: (channels, stride)
            for name, channels, stride in zip(
                PYRAMID_NAMES, self.pyramid.out_channels, PYRAMID_STRIDES
            )
        }

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid (h, w) of an H×W input; ``ValueError`` if the patch size does not divide."""
        return token_grid(self.visual, height, width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each ViT block in the backward instead of storing its activations
        (open_clip's switch, honoured by ``apply_block``; E_I^0 runs without grad and is
        unaffected)."""
        self.visual.set_grad_checkpointing(enable)

    def tap_tokens(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Patch tokens after each block of ``out_indices``.

        Args:
            images: (B, 3, H, W), CLIP-normalised.
        Returns:
            one (B, N, W_v) tensor per out index, in ``out_indices`` order.
        """
        x = embed_tokens(self.visual, images)
        taps = {}
        for index, block in enumerate(
            self.visual.transformer.resblocks[: max(self.out_indices)], start=1
        ):
            x = apply_block(self.visual, block, x)
            if index in self.out_indices:
                taps[index] = x[:, 1:]
        return [taps[i] for i in self.out_indices]

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W), CLIP-normalised; H, W multiples of ``patch_size``.
        Returns:
            {"res2": (B, c_2, H/4, W/4), "res3": (B, c_3, H/8, W/8),
             "res4": (B, c_4, H/16, W/16), "res5": (B, c_5, H/32, W/32)}
            (sizes floored when H/p or W/p is odd for the max-pooled levels).
        """
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        maps = self.pyramid(self.tap_tokens(images), grid)
        return dict(zip(PYRAMID_NAMES, maps))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the final block (before ln_post), e.g. x_mask of L_mask.

        Args:
            images: (B, 3, H, W), CLIP-normalised.
        Returns:
            (B, N, W_v), row-major over the (h, w) grid of :meth:`grid_size`.
        """
        x = embed_tokens(self.visual, images)
        for block in self.visual.transformer.resblocks:
            x = apply_block(self.visual, block, x)
        return x[:, 1:]

    def to_clip_space(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post + proj of this (fine-tuned) tower: (B, N, W_v) -> (B, N, C), not normalised."""
        return project_tokens(self.visual, tokens)
