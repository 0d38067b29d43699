"""Mask2Former's multi-scale deformable pixel decoder with CMSAM after every layer.

Pipeline (DESIGN §1.5):

1. The encoder features (``transformer_in_features``, e.g. res3..res5) are projected to
   D = ``conv_dim`` (1×1 conv + GroupNorm), ordered coarse→fine (res5, res4, res3) and
   flattened into one sequence; each position gets a sine encoding + a learnable
   embedding of its level.
2. ``num_encoder_layers`` deformable encoder layers (self-attention over all levels). After
   EACH layer, a CMSAM aligns the text queries with the pixels:
   - L == F: text level l <-> feature level l (coarse→fine), one CMSAM call per level;
   - L == 1: the single query set attends to the pixels of all levels at once (softmax
     over every pixel), and every pixel attends to that set.
   One CMSAM module per encoder layer, shared by the levels: the levels already differ by
   their level embedding (added to pixel keys/queries) and by their own query MLP in HSQG,
   so separate weights per level would triple CMSAM's parameters for no clear gain.
3. FPN: the finer inputs (stride < the finest encoder level, down to ``common_stride``)
   get a 1×1 lateral conv, the coarser map is upsampled (bilinear) and added, then a 3×3
   output conv; a 1×1 conv of the finest map gives the mask features.

With ``cmsam_enabled=False`` this is Mask2Former's pixel decoder and the text queries pass
through unchanged.

Padding (``padding``, True on pixels that are crop/batch padding, not image): a cell of
encoder level f is padding when every input pixel it covers is. Padded cells are invisible
to the deformable attention (their values read 0) and to CMSAM's text→pixel attention, so
the text queries' visual context comes from the image alone and matches inference, where
windows are not padded. Mask2Former passes all-False masks; training crops of images
smaller than the crop (half of VOC's 512 crops at scales 0.5–2) are largely padding.

Shape letters: B batch, L text levels, K classes, D = conv_dim, F encoder feature levels,
P pixels, h_f×w_f the size of level f, H×W the input image.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hiervl.modeling.cmsam import CMSAM
from hiervl.modeling.deformable_encoder import (
    DeformableEncoderLayer,
    encoder_reference_points,
    sine_position_encoding,
)


class PixelDecoderOutput(NamedTuple):
    """
    Attributes:
        mask_features: (B, mask_dim, H/common_stride, W/common_stride).
        multi_scale_features: F maps (B, D, h_f, w_f), coarse→fine (encoder outputs).
        text_queries: (B, L, K, D) text queries after CMSAM (unchanged when it is off).
    """

    mask_features: torch.Tensor
    multi_scale_features: List[torch.Tensor]
    text_queries: torch.Tensor


def _conv_norm(in_ch: int, out_ch: int, kernel: int, groups: int, relu: bool) -> nn.Sequential:
    """Bias-free conv + GroupNorm (+ ReLU), He-uniform init as detectron2's c2_xavier_fill."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    layers = [conv, nn.GroupNorm(groups, out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CMSAMPixelDecoder(nn.Module):
    """Deformable pixel decoder whose encoder layers are each followed by CMSAM."""

    def __init__(
        self,
        *,
        input_shape: Dict[str, Tuple[int, int]],
        transformer_in_features: Sequence[str],
        conv_dim: int,
        mask_dim: int,
        num_encoder_layers: int,
        num_heads: int,
        num_points: int,
        ffn_dim: int,
        dropout: float,
        common_stride: int,
        cmsam_enabled: bool,
        cmsam_heads: int,
        cmsam_ffn_dim: int,
        cmsam_dropout: float,
        num_text_levels: int,
        mask_padding: bool,
        norm_groups: int = 32,
        checkpointing: bool = False,
    ):
        """
        Args:
            input_shape: backbone outputs {name: (channels, stride)}.
            transformer_in_features: names fed to the deformable encoder (any order).
            conv_dim: D, width of the encoder, the FPN and the text queries.
            mask_dim: channels of the mask features.
            num_encoder_layers: deformable encoder layers (each followed by a CMSAM).
            num_heads, num_points: deformable attention heads / points per level.
            ffn_dim, dropout: encoder FFN width and dropout.
            common_stride: stride of the mask features (the finest FPN output).
            cmsam_enabled: False = ablation "CMSAM off".
            cmsam_heads, cmsam_ffn_dim, cmsam_dropout: CMSAM sizes.
            num_text_levels: L of the text queries; must be F or 1.
            mask_padding: hide padded cells from the deformable attention and CMSAM
                (PIXEL_DECODER.MASK_PADDING; False = Mask2Former's all-False masks).
            norm_groups: GroupNorm groups of every conv (Mask2Former uses 32).
            checkpointing: recompute each encoder layer and its CMSAM in the backward
                instead of storing their activations (CHECKPOINTING.PIXEL_DECODER).
        """
        super().__init__()
        unknown = [n for n in transformer_in_features if n not in input_shape]
        if unknown or not transformer_in_features:
            raise ValueError(
                f"PIXEL_DECODER.IN_FEATURES={list(transformer_in_features)}: {unknown or 'empty'} "
                f"not among the backbone outputs {sorted(input_shape)}"
            )
        if conv_dim % norm_groups != 0:
            raise ValueError(
                f"PIXEL_DECODER.CONV_DIM={conv_dim} is not divisible by the GroupNorm "
                f"groups ({norm_groups})"
            )
        # Coarse→fine, as the encoder levels and the text hierarchy are paired in that order.
        self.encoder_features = sorted(transformer_in_features, key=lambda n: -input_shape[n][1])
        finest = input_shape[self.encoder_features[-1]][1]
        self.fpn_features = sorted(
            (n for n, (_, s) in input_shape.items() if common_stride <= s < finest),
            key=lambda n: -input_shape[n][1],
        )
        out_stride = input_shape[self.fpn_features[-1]][1] if self.fpn_features else finest
        if out_stride != common_stride:
            raise ValueError(
                f"PIXEL_DECODER.COMMON_STRIDE={common_stride}: no backbone output has that "
                f"stride (outputs: { {n: s for n, (_, s) in input_shape.items()} })"
            )
        num_levels = len(self.encoder_features)
        if num_text_levels not in (1, num_levels):
            raise ValueError(
                f"HSQG.NUM_LEVELS={num_text_levels} must be 1 or the number of pixel-decoder "
                f"levels F={num_levels} (PIXEL_DECODER.IN_FEATURES={self.encoder_features})"
            )
        self.conv_dim = conv_dim
        self.num_text_levels = num_text_levels
        self.checkpointing = checkpointing
        self.mask_padding = mask_padding

        self.input_proj = nn.ModuleList()
        for name in self.encoder_features:
            conv = nn.Conv2d(input_shape[name][0], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(norm_groups, conv_dim)))
        self.level_embed = nn.Parameter(torch.randn(num_levels, conv_dim))
        self.encoder_layers = nn.ModuleList(
            DeformableEncoderLayer(
                dim=conv_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_encoder_layers)
        )
        self.cmsam_layers = nn.ModuleList(
            CMSAM(dim=conv_dim, num_heads=cmsam_heads, ffn_dim=cmsam_ffn_dim, dropout=cmsam_dropout)
            for _ in range(num_encoder_layers if cmsam_enabled else 0)
        )
        self.lateral_convs = nn.ModuleList(
            _conv_norm(input_shape[n][0], conv_dim, 1, norm_groups, relu=False)
            for n in self.fpn_features
        )
        self.output_convs = nn.ModuleList(
            _conv_norm(conv_dim, conv_dim, 3, norm_groups, relu=True) for _ in self.fpn_features
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    @property
    def cmsam_enabled(self) -> bool:
        return len(self.cmsam_layers) > 0

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        text_queries: torch.Tensor,
        text_active: torch.Tensor,
        padding: Optional[torch.Tensor] = None,
    ) -> PixelDecoderOutput:
        """
        Args:
            features: backbone maps {name: (B, channels, H/stride, W/stride)}.
            text_queries: (B, L, K, D) gated HSQG queries.
            text_active: (B, K) bool, classes kept by HSQG.
            padding: (B, H, W) bool at the input image's size, True = padding pixel (every
                image needs one real pixel), or None = no padding. Ignored unless
                ``mask_padding``.
        Returns:
            PixelDecoderOutput (see its docstring).
        """
        if text_queries.dim() != 4 or text_queries.shape[1] != self.num_text_levels:
            raise ValueError(
                f"pixel decoder: text_queries has shape {tuple(text_queries.shape)}, expected "
                f"(B, L={self.num_text_levels}, K, D)"
            )
        if self.cmsam_enabled and text_queries.shape[-1] != self.conv_dim:
            raise ValueError(
                f"pixel decoder: text query width {text_queries.shape[-1]} != "
                f"PIXEL_DECODER.CONV_DIM={self.conv_dim} (CMSAM mixes them)"
            )
        src, pos, shapes = self._flatten_levels(features)
        batch = src.shape[0]
        level_padding = None
        if padding is not None and self.mask_padding:
            level_padding = self._level_padding(padding, shapes)
        sizes = [h * w for h, w in shapes]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.tensor(
            [sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.long, device=src.device
        )
        reference_points = encoder_reference_points(shapes, device=src.device)
        # Kept in float32 even under autocast: bf16 cannot resolve pixel centres of big maps.
        reference_points = reference_points[None].expand(batch, -1, -1, -1)

        for i in range(len(self.encoder_layers)):
            args = (src, text_queries, pos, reference_points, spatial_shapes, level_start_index)
            if self.checkpointing and torch.is_grad_enabled():
                # Non-reentrant: keeps the RNG state for dropout and takes the ints as is.
                src, text_queries = checkpoint(
                    self._encoder_round,
                    i,
                    *args,
                    sizes,
                    text_active,
                    level_padding,
                    use_reentrant=False,
                )
            else:
                src, text_queries = self._encoder_round(i, *args, sizes, text_active, level_padding)

        multi_scale = [
            level.transpose(1, 2).reshape(batch, self.conv_dim, h, w)
            for level, (h, w) in zip(src.split(sizes, dim=1), shapes)
        ]
        y = multi_scale[-1]
        for name, lateral, output in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            x = lateral(features[name])
            y = output(
                x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            )
        return PixelDecoderOutput(self.mask_features(y), multi_scale, text_queries)

    def _encoder_round(
        self,
        i: int,
        src: torch.Tensor,
        text_queries: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sizes: List[int],
        text_active: torch.Tensor,
        level_padding: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deformable encoder layer ``i``, then its CMSAM: (src', text_queries').

        ``level_padding``: (B, S) bool, True on padded positions, or None.
        """
        src = self.encoder_layers[i](
            src, pos, reference_points, spatial_shapes, level_start_index, level_padding
        )
        if self.cmsam_enabled:
            src, text_queries = self._align(
                self.cmsam_layers[i], src, pos, sizes, text_queries, text_active, level_padding
            )
        return src, text_queries

    def _flatten_levels(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
        """Project, flatten and concatenate the encoder levels (coarse→fine).

        Returns:
            src: (B, S, D) projected features.
            pos: (B, S, D) sine encoding + level embedding.
            shapes: F pairs (h_f, w_f).
        """
        srcs, poss, shapes = [], [], []
        for level, (name, proj) in enumerate(zip(self.encoder_features, self.input_proj)):
            x = proj(features[name])
            h, w = x.shape[-2:]
            srcs.append(x.flatten(2).transpose(1, 2))
            pe = sine_position_encoding(h, w, self.conv_dim, device=x.device, dtype=x.dtype)
            poss.append(pe + self.level_embed[level])
            shapes.append((h, w))
        src = torch.cat(srcs, dim=1)
        pos = torch.cat(poss, dim=0)[None].expand(src.shape[0], -1, -1)
        return src, pos, shapes

    @staticmethod
    def _level_padding(padding: torch.Tensor, shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """(B, H, W) pixel padding → (B, S) flattened padding of the encoder levels: a cell
        is padding when no real pixel falls inside it."""
        if padding.dim() != 3:
            raise ValueError(f"padding must be (B, H, W), got {tuple(padding.shape)}")
        real = (~padding).float()[:, None]
        levels = [F.adaptive_max_pool2d(real, (h, w)).flatten(1) == 0 for h, w in shapes]
        return torch.cat(levels, dim=1)

    def _align(
        self,
        cmsam: CMSAM,
        src: torch.Tensor,
        pos: torch.Tensor,
        sizes: List[int],
        text_queries: torch.Tensor,
        text_active: torch.Tensor,
        padding: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One CMSAM round between the text hierarchy and the pixel levels.

        Args:
            src, pos: (B, S, D) pixels of all levels and their positional embeddings.
            sizes: F pixel counts h_f·w_f (coarse→fine).
            text_queries: (B, L, K, D) with L == F or L == 1.
            text_active: (B, K) bool.
            padding: (B, S) bool, True = padded cell, or None.
        Returns:
            src': (B, S, D), text_queries': (B, L, K, D).
        """
        if self.num_text_levels == 1:
            queries, src = cmsam(text_queries[:, 0], text_active, src, pos, padding)
            return src, queries[:, None]
        pads = [None] * len(sizes) if padding is None else padding.split(sizes, 1)
        pixels, queries = [], []
        for level, (x, p, pad) in enumerate(zip(src.split(sizes, 1), pos.split(sizes, 1), pads)):
            q, x = cmsam(text_queries[:, level], text_active, x, p, pad)
            pixels.append(x)
            queries.append(q)
        return torch.cat(pixels, dim=1), torch.stack(queries, dim=1)
