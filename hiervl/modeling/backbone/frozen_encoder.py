"""E_I^0: a frozen copy of the CLIP image encoder (no gradients, always in eval mode).

``forward`` provides, in one pass over the blocks:
- the pooled global image embedding at the input's resolution,
- the final-block patch tokens (reference x_ref of L_mask; same representation as
  ``CLIPImageBackbone.forward_tokens``),
- MaskCLIP dense CLIP-space tokens (SemiVL's dense guidance): in the last block the
  q·k attention is skipped and each token keeps only its value path,
  ``y = x + out_proj(v_proj(ln_1(x)))``, ``y = y + mlp(ln_2(y))`` (residual and MLP
  kept, as MaskCLIP's and SemiVL's ViT code does), then ``ln_post(y) @ proj``.
  Equivalently: the last block applied to every token as a length-1 sequence.

``global_embedding`` gives HSQG's v the way CLIP embeds an image: the image resized so its
shorter side is CLIP's input size (224 for ViT-B/16; the aspect ratio kept, sides rounded
to the patch size), one pass, pooled. At a 512 crop that pass costs a fifth of a
full-resolution one, and v stays at the resolution CLIP's image-text alignment was trained
at.

Shape letters: B batch, H×W input size, h×w token grid, N = h·w, W_v tower width,
C CLIP embedding width.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from .clip_vit import (
    apply_block,
    check_vision_tower,
    embed_tokens,
    global_embedding,
    project_tokens,
    token_grid,
)

__all__ = [
    "FrozenCLIPImageEncoder",
    "FrozenImageFeatures",
    "antialiased_resize_matrix",
    "maskclip_value_path",
]


def antialiased_resize_matrix(src: int, dst: int) -> torch.Tensor:
    """The (dst, src) float32 matrix A with ``A @ x`` = x (src,) resized to (dst,) by
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` along one axis.

    That resize is separable with fixed weights, so at a fixed input size it is two
    matmuls with constant matrices: a form ONNX can express (the exporters have no
    antialiased resize, and ONNX Resize's antialias rule is not torch's). The weights are
    torch's CPU kernel's, computed with its float32 roundings step by step (a triangle
    filter stretched by the downscale factor, truncated at the borders, renormalised): the
    filter centre of an output pixel near 500 carries float32 error ~3e-5, which exact
    float64 weights would not reproduce. In Python, so a traced graph holds constants.
    """
    f32 = np.float32
    scale = f32(src) / f32(dst)
    support = scale if scale >= 1.0 else f32(1.0)  # the bilinear half-width, 1 input pixel
    inv_scale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    matrix = np.zeros((dst, src), dtype=np.float32)
    for i in range(dst):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(center - support) + 0.5), 0)
        hi = min(int(float(center + support) + 0.5), src)
        taps = []
        for j in range(lo, hi):
            x = abs(f32((float(f32(j) - center) + 0.5) * float(inv_scale)))
            taps.append(f32(1.0 - float(x)) if x < 1.0 else f32(0.0))
        total = f32(0.0)
        for w in taps:
            total = f32(total + w)
        if total != 0.0:
            matrix[i, lo:hi] = [w / total for w in taps]
    return torch.from_numpy(matrix)


class FrozenImageFeatures(NamedTuple):
    """Outputs of :class:`FrozenCLIPImageEncoder` (none of them normalised)."""

    global_embed: torch.Tensor  # (B, C) pooled embedding, == CLIP.encode_image at native size
    dense_tokens: torch.Tensor  # (B, N, W_v) final-block patch tokens, before ln_post
    dense_clip: torch.Tensor  # (B, C, h, w) MaskCLIP value-path tokens after ln_post + proj


def _check_value_path_block(block: nn.Module) -> None:
    if not isinstance(block, ResidualAttentionBlock) or not isinstance(
        block.attn, nn.MultiheadAttention
    ):
        raise ValueError(
            f"MaskCLIP's value path needs open_clip's default attention block, got "
            f"{type(block).__name__}"
        )
    if block.attn.in_proj_weight is None:
        raise ValueError("MaskCLIP's value path needs a packed in_proj_weight (q, k, v same dim)")


def maskclip_value_path(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """An attention block with attention replaced by each token's own value.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside).
        x: (B, L, W_v) tokens entering the block.
    Returns:
        (B, L, W_v); token i depends on x[:, i] only.
    """
    attn = block.attn
    width = x.shape[-1]
    # in_proj_weight stacks [W_q; W_k; W_v]; only the value rows are used.
    w_v = attn.in_proj_weight[2 * width :]
    b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    y = x + block.ls_1(attn.out_proj(F.linear(block.ln_1(x), w_v, b_v)))
    return y + block.ls_2(block.mlp(block.ln_2(y)))


class FrozenCLIPImageEncoder(nn.Module):
    """Deep copy of the pretrained image tower, frozen; see the module docstring."""

    def __init__(self, *, visual: VisionTransformer):
        """
        Args:
            visual: the open_clip image tower to copy (before any fine-tuning).
        """
        super().__init__()
        check_vision_tower(visual)
        _check_value_path_block(visual.transformer.resblocks[-1])
        self.visual = copy.deepcopy(visual)
        self.visual.requires_grad_(False)
        self.embed_dim = int(visual.proj.shape[1])
        self.width = int(visual.transformer.width)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenCLIPImageEncoder:
        """Stays in eval mode whatever ``mode`` is (E_I^0 is a fixed reference)."""
        return super().train(False)

    @property
    def native_size(self) -> int:
        """CLIP's input side (the shorter side of ``global_embedding``'s resized image)."""
        return int(self.visual.grid_size[0] * self.visual.patch_size[0])

    @torch.no_grad()
    def global_embedding(
        self, images: torch.Tensor, *, static_shapes: bool = False
    ) -> torch.Tensor:
        """v: the pooled embedding (B, C) of the image resized to CLIP's native size.

        Args:
            images: (B, 3, H, W), CLIP-normalised, any size.
            static_shapes: export mode: the resize as two constant matrices
                (:func:`antialiased_resize_matrix`), the same result up to rounding.
        Returns:
            (B, C), not normalised (as ``CLIP.encode_image``).
        """
        height, width = images.shape[-2:]
        patch = self.visual.patch_size[0]
        scale = self.native_size / min(height, width)
        # Round half up to a multiple of the patch (not Python's round-half-even).
        size = tuple(max(1, int(side * scale / patch + 0.5)) * patch for side in (height, width))
        if size != (height, width) and static_shapes:
            rows = antialiased_resize_matrix(height, size[0]).to(images)  # (h', H)
            cols = antialiased_resize_matrix(width, size[1]).to(images)  # (w', W)
            images = torch.matmul(torch.matmul(rows, images), cols.t())
        elif size != (height, width):
            # Bilinear with antialiasing, like CLIP's PIL resize; it commutes with the
            # per-channel normalisation the images already carry.
            images = F.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        x = embed_tokens(self.visual, images)
        for block in self.visual.transformer.resblocks:
            x = apply_block(self.visual, block, x)
        return global_embedding(self.visual, x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FrozenImageFeatures:
        """
        Args:
            images: (B, 3, H, W), CLIP-normalised; H, W multiples of the patch size.
        Returns:
            :class:`FrozenImageFeatures` with global_embed (B, C), dense_tokens (B, N, W_v),
            dense_clip (B, C, h, w).
        """
        height, width = token_grid(self.visual, images.shape[-2], images.shape[-1])
        blocks = self.visual.transformer.resblocks
        x = embed_tokens(self.visual, images)
        for block in blocks[:-1]:
            x = apply_block(self.visual, block, x)
        value_tokens = maskclip_value_path(blocks[-1], x[:, 1:])
        x = apply_block(self.visual, blocks[-1], x)
        dense_clip = project_tokens(self.visual, value_tokens)  # (B, N, C)
        dense_clip = dense_clip.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        return FrozenImageFeatures(
            global_embed=global_embedding(self.visual, x),
            dense_tokens=x[:, 1:],
            dense_clip=dense_clip,
        )
