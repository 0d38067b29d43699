"""Run an open_clip ``VisionTransformer`` piece by piece, at any input size.

open_clip's own ``forward`` only accepts its native image size and hides the
intermediate token maps; the image backbone and the frozen copy both need them,
so they share these functions instead of patching the tower.

Shape letters: B batch, H×W input size, p patch size, h×w = H/p × W/p token grid,
N = h·w patch tokens (row-major), W_v tower width, C CLIP embedding width.
A token sequence is ``[class, patch_1 .. patch_N]`` of shape (B, 1+N, W_v).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "apply_block",
    "check_vision_tower",
    "embed_tokens",
    "global_embedding",
    "interpolate_pos_embed",
    "project_tokens",
    "token_grid",
]


def check_vision_tower(visual: nn.Module) -> None:
    """Raise ``ValueError`` unless ``visual`` is an open_clip ViT these helpers can run."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"HierVL needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(ResNet and timm towers have no patch-token grid)"
        )
    if visual.attn_pool is not None:
        raise ValueError("open_clip image towers with attentional pooling are not supported")
    if isinstance(visual.patch_dropout, PatchDropout):
        # Dropping patches breaks the token grid the feature pyramid reshapes.
        raise ValueError("open_clip image towers with patch_dropout > 0 are not supported")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"unsupported open_clip pool_type {visual.pool_type!r}")
    if visual.proj is None:
        raise ValueError("the open_clip image tower has no output projection (visual.proj)")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise ValueError(f"non-square patches {visual.patch_size} are not supported")
    grid_h, grid_w = visual.grid_size
    rows = visual.positional_embedding.shape[0]
    if rows != 1 + grid_h * grid_w:
        raise ValueError(
            f"positional_embedding has {rows} rows, expected 1 + {grid_h}x{grid_w} "
            "(class token + native grid)"
        )


def token_grid(visual: VisionTransformer, height: int, width: int) -> Tuple[int, int]:
    """Token grid (h, w) of an H×W input; ``ValueError`` if the patch size does not divide it."""
    patch = visual.patch_size[0]
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the CLIP patch size {patch}; "
            f"pad or crop inputs to a multiple of {patch}"
        )
    return height // patch, width // patch


def interpolate_pos_embed(
    pos_embed: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]
) -> torch.Tensor:
    """Resample a ViT position embedding to another token grid (bicubic, like SemiVL/MaskCLIP).

    Args:
        pos_embed: (1 + h0·w0, W_v), class-token row first, then the h0×w0 grid row-major.
        src_grid: (h0, w0), the grid ``pos_embed`` was trained for.
        dst_grid: (h, w), the grid of the current input.
    Returns:
        (1 + h·w, W_v); the class-token row is kept as is.
    """
    src_h, src_w = src_grid
    assert pos_embed.shape[0] == 1 + src_h * src_w, (
        f"pos_embed rows {pos_embed.shape[0]} != 1 + {src_h}x{src_w}"
    )
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, src_h, src_w, dim).permute(0, 3, 1, 2)
    # Bicubic needs float32 on CPU for half inputs; cast back afterwards.
    grid = F.interpolate(
        grid.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False
    ).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, dim)
    return torch.cat([cls_row, grid], dim=0)


def embed_tokens(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patchify, prepend the class token, add the (resampled) position embedding, ln_pre.

    Args:
        images: (B, 3, H, W), CLIP-normalised; H, W multiples of the patch size.
    Returns:
        (B, 1+N, W_v) tokens entering the first transformer block.
    """
    grid = token_grid(visual, images.shape[-2], images.shape[-1])
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, W_v, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, N, W_v)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, grid)
    x = x + pos.to(x.dtype)
    return visual.ln_pre(x)


def apply_block(visual: VisionTransformer, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One residual attention block on batch-first tokens (B, L, W_v) -> (B, L, W_v).

    Honours open_clip's ``batch_first`` layout and its gradient-checkpointing switch
    (``visual.set_grad_checkpointing(True)``).
    """
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    if visual.transformer.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint(block, x, use_reentrant=False)
    else:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


def global_embedding(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """open_clip's pooled image embedding from final-block tokens.

    Args:
        x: (B, 1+N, W_v) output of the last block.
    Returns:
        (B, C), not normalised (as ``CLIP.encode_image``).
    """
    if visual.pool_type == "tok":
        # LayerNorm is per token, so "LN then take the class token" == "take then LN".
        pooled = visual.ln_post(x[:, 0])
    elif visual.final_ln_after_pool:
        pooled = visual.ln_post(x[:, 1:].mean(dim=1))
    else:
        pooled = visual.ln_post(x)[:, 1:].mean(dim=1)
    return pooled @ visual.proj


def project_tokens(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Map tower tokens into CLIP space with the tower's own ln_post + proj.

    Args:
        tokens: (B, N, W_v).
    Returns:
        (B, N, C), not normalised.
    """
    return visual.ln_post(tokens) @ visual.proj
