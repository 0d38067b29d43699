"""Dual-query transformer decoder (DQTD): Mask2Former's masked-attention decoder run on
CMSAM-aligned text queries together with learnable visual queries.

Shape letters: B batch, L text (hierarchy) levels, K classes, K' classes given text
queries (K' = K, or fewer when the caller drops classes no image keeps), M visual queries,
Q = L·K' + M queries (M alone with text queries off), D decoder width, F feature levels
(coarse → fine), S_f = h_f·w_f tokens of feature level f, E mask-feature width, h×w
mask-feature size, C CLIP width.

Query order: text queries level-major (index l·K' + j, class ``text_classes[j]``), then
the M visual queries.
Text queries take their content from the pixel decoder and carry a learnable level
embedding as positional embedding; visual queries have a learnable content and a
learnable positional embedding (as in Mask2Former).

Each layer: masked cross-attention to feature level ``i mod F`` (a query only sees the
pixels its previous mask prediction covers), self-attention over the queries (inactive
text queries are masked out as keys, so they cannot influence anything), FFN. The mask
head predicts at the start and after every layer; all but the last prediction are
returned as ``aux_outputs`` for deep supervision.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hiervl.modeling.attention import MultiHeadAttention
from hiervl.modeling.deformable_encoder import sine_position_encoding

__all__ = ["DualQueryDecoder"]

# A pixel is visible to a query's cross-attention when its previous mask probability
# reaches this value (Mask2Former's rule).
MASK_ATTENTION_THRESHOLD = 0.5
# Frequency base of the sine positional encoding (as in "Attention is all you need").


class _AttentionBlock(nn.Module):
    """Residual attention sub-layer, post-norm (Mask2Former default) or pre-norm.

    Positional embeddings are added to queries and keys, never to values. Without a
    memory the block is self-attention.
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.attn = MultiHeadAttention(
            dim=dim, num_heads=num_heads, dropout=dropout, name="DECODER.HIDDEN_DIM"
        )
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x, x_pos, allowed, memory=None, memory_pos=None):
        """x, x_pos: (B, Q, D); memory, memory_pos: (B or 1, S, D) or None; allowed as in
        ``MultiHeadAttention``. Returns (B, Q, D)."""
        h = self.norm(x) if self.pre_norm else x
        if memory is None:
            memory, memory_pos = h, x_pos
        x = x + self.drop(self.attn(h + x_pos, memory + memory_pos, memory, allowed))
        return x if self.pre_norm else self.norm(x)


class _FFNBlock(nn.Module):
    """Residual 2-layer feed-forward sub-layer."""

    def __init__(self, *, dim: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, Q, D) -> (B, Q, D)."""
        h = self.norm(x) if self.pre_norm else x
        x = x + self.drop(self.linear2(self.drop(F.relu(self.linear1(h)))))
        return x if self.pre_norm else self.norm(x)


class DualQueryDecoder(nn.Module):
    """DQTD (see module docstring)."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        num_visual_queries: int,
        num_feature_levels: int,
        num_text_levels: int,
        pre_norm: bool,
        dropout: float,
        mask_head: nn.Module,
        in_channels: Optional[int] = None,
        text_queries_enabled: bool = True,
        checkpointing: bool = False,
    ):
        """
        Args:
            hidden_dim: D (DECODER.HIDDEN_DIM).
            num_heads: attention heads (DECODER.NUM_HEADS).
            ffn_dim: FFN hidden width (DECODER.FFN_DIM).
            num_layers: decoder layers (DECODER.NUM_LAYERS), >= 1.
            num_visual_queries: M (DECODER.NUM_VISUAL_QUERIES); 0 = text queries only.
            num_feature_levels: F, the number of multi-scale maps ``forward`` receives.
            num_text_levels: L (HSQG.NUM_LEVELS).
            pre_norm: pre-LayerNorm sub-layers (DECODER.PRE_NORM).
            dropout: dropout in attention and FFN (DECODER.DROPOUT).
            mask_head: a ``DynamicMaskHead`` (or any module with its ``forward``) predicting
                (logits, masks, query_proj) from the normalised queries.
            in_channels: channels of the multi-scale maps; a 1×1 projection to D is added
                when it differs from D (None = D).
            text_queries_enabled: False = visual queries only (DECODER.TEXT_QUERIES; the
                Mask2Former-style query set; classes are still scored against the text
                embeddings). Needs ``num_visual_queries`` >= 1.
            checkpointing: recompute each layer's attention and FFN in the backward instead
                of storing their activations (CHECKPOINTING.DECODER); the mask-head
                predictions, which the losses read, are kept.
        """
        super().__init__()
        for name, value, low in [
            ("DECODER.NUM_LAYERS", num_layers, 1),
            ("DECODER.NUM_VISUAL_QUERIES", num_visual_queries, 0),
            ("num_feature_levels", num_feature_levels, 1),
            ("HSQG.NUM_LEVELS", num_text_levels, 1),
        ]:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not text_queries_enabled and num_visual_queries == 0:
            raise ValueError(
                "DECODER.TEXT_QUERIES False needs visual queries, but "
                "DECODER.NUM_VISUAL_QUERIES is 0: the decoder would have no query at all"
            )
        self.text_queries_enabled = text_queries_enabled
        self.checkpointing = checkpointing
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_visual_queries = num_visual_queries
        self.num_feature_levels = num_feature_levels
        self.num_text_levels = num_text_levels

        in_channels = hidden_dim if in_channels is None else in_channels
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == hidden_dim else nn.Conv2d(in_channels, hidden_dim, 1)
            for _ in range(num_feature_levels)
        )
        self.memory_level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.text_level_embed = (
            nn.Embedding(num_text_levels, hidden_dim) if text_queries_enabled else None
        )
        if num_visual_queries > 0:
            self.visual_feat = nn.Embedding(num_visual_queries, hidden_dim)
            self.visual_pos = nn.Embedding(num_visual_queries, hidden_dim)
        else:
            # No empty parameters: they trip up DDP and optimiser bookkeeping.
            self.visual_feat = self.visual_pos = None

        block = {"dim": hidden_dim, "dropout": dropout, "pre_norm": pre_norm}
        self.cross_attn = nn.ModuleList(
            _AttentionBlock(num_heads=num_heads, **block) for _ in range(num_layers)
        )
        self.self_attn = nn.ModuleList(
            _AttentionBlock(num_heads=num_heads, **block) for _ in range(num_layers)
        )
        self.ffn = nn.ModuleList(_FFNBlock(ffn_dim=ffn_dim, **block) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_head = mask_head
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for layers in (self.cross_attn, self.self_attn, self.ffn):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def _layer(self, i, x, pos, cross_allowed, memory, memory_pos, self_allowed):
        """Decoder layer ``i`` on queries ``x`` (B, Q, D): masked cross-attention to
        ``memory``, self-attention, FFN."""
        x = self.cross_attn[i](x, pos, cross_allowed, memory, memory_pos)
        x = self.self_attn[i](x, pos, self_allowed)
        return self.ffn[i](x)

    def _predict(self, x, mask_features, class_embed, attn_size):
        """Mask-head prediction for queries ``x`` (B, Q, D), plus the cross-attention mask
        (B, 1, Q, S) bool (True = visible) for the next layer's feature level."""
        logits, masks, proj = self.mask_head(self.decoder_norm(x), mask_features, class_embed)
        with torch.no_grad():
            small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
            allowed = small.sigmoid().flatten(2) >= MASK_ATTENTION_THRESHOLD  # (B, Q, S)
            # A query whose mask is empty would attend to nothing: let it see everything.
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        pred = {"pred_logits": logits, "pred_masks": masks, "query_proj": proj}
        return pred, allowed.unsqueeze(1)

    def forward(
        self,
        text_queries: torch.Tensor,
        text_active: torch.Tensor,
        multi_scale_features: list,
        mask_features: torch.Tensor,
        class_embed: torch.Tensor,
        text_classes: Optional[torch.Tensor] = None,
    ) -> dict:
        """
        Args:
            text_queries: (B, L, K', D) aligned text queries from the pixel decoder.
            text_active: (B, K') bool, HSQG's active classes among them.
            multi_scale_features: F maps (B, in_channels, h_f, w_f), coarse → fine.
            mask_features: (B, E, h, w).
            class_embed: (K, C) text embeddings for the classifier (every class).
            text_classes: (K',) long, the class of each text-query column; None = all K
                classes in order (K' = K).

        Returns:
            dict with ``pred_logits`` (B, Q, K + 1), ``pred_masks`` (B, Q, h, w),
            ``query_proj`` (B, Q, C), ``aux_outputs`` (NUM_LAYERS dicts with the same three
            keys, earliest first), ``query_valid`` (B, Q) bool (False for inactive text
            queries), ``query_class`` (Q,) long (k for text queries, -1 for visual ones).
        """
        b, num_levels, k, d = text_queries.shape
        num_classes = class_embed.shape[0]
        if text_classes is None:
            if k != num_classes:
                raise ValueError(
                    f"class_embed has {num_classes} classes, queries have {k} (pass "
                    f"text_classes when the text queries cover a subset)"
                )
            text_classes = torch.arange(num_classes, device=text_queries.device)
        else:
            # Checked only when given: reading values back would break the static trace
            # of the export mode (which passes None).
            if text_classes.shape != (k,):
                raise ValueError(
                    f"text_classes must be ({k},) (one class per text-query column), got "
                    f"{tuple(text_classes.shape)}"
                )
            if k and not (0 <= int(text_classes.min()) and int(text_classes.max()) < num_classes):
                raise ValueError(f"text_classes must lie in [0, {num_classes}), got {text_classes}")
        if num_levels != self.num_text_levels or d != self.hidden_dim:
            raise ValueError(
                f"text_queries {tuple(text_queries.shape)} do not match the decoder "
                f"(L={self.num_text_levels}, D={self.hidden_dim})"
            )
        if text_active.shape != (b, k):
            raise ValueError(f"text_active must be {(b, k)}, got {tuple(text_active.shape)}")
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"got {len(multi_scale_features)} feature levels, the decoder was built for "
                f"{self.num_feature_levels}"
            )
        device, dtype = text_queries.device, text_queries.dtype

        memories, memory_pos, sizes = [], [], []
        for f, feat in enumerate(multi_scale_features):
            feat = self.input_proj[f](feat)
            h_f, w_f = feat.shape[-2:]
            sizes.append((h_f, w_f))
            memories.append(feat.flatten(2).transpose(1, 2) + self.memory_level_embed.weight[f])
            pos = sine_position_encoding(h_f, w_f, d, device=device, dtype=feat.dtype)
            memory_pos.append(pos.unsqueeze(0))

        if self.text_queries_enabled:
            x = text_queries.reshape(b, num_levels * k, d)  # level-major: index l·K' + j
            pos = self.text_level_embed.weight.repeat_interleave(k, dim=0)  # (L·K', D)
            valid = text_active.bool().repeat(1, num_levels)  # (B, L·K')
            query_class = text_classes.to(device=device, dtype=torch.long).repeat(num_levels)
        else:
            x = text_queries.new_zeros(b, 0, d)
            pos = text_queries.new_zeros(0, d)
            valid = text_active.new_zeros(b, 0, dtype=torch.bool)
            query_class = torch.zeros(0, dtype=torch.long, device=device)
        if self.visual_feat is not None:
            m = self.num_visual_queries
            x = torch.cat([x, self.visual_feat.weight.to(dtype).expand(b, m, d)], dim=1)
            pos = torch.cat([pos, self.visual_pos.weight], dim=0)
            valid = torch.cat([valid, valid.new_ones(b, m)], dim=1)
            query_class = torch.cat([query_class, query_class.new_full((m,), -1)])
        pos = pos.to(dtype).unsqueeze(0)

        # Inactive text queries are hidden as keys; an image with no valid key at all
        # (impossible with HSQG's MIN_ACTIVE >= 1) falls back to full attention.
        self_allowed = valid | ~valid.any(dim=1, keepdim=True)
        self_allowed = self_allowed[:, None, None, :]  # (B, 1, 1, Q)

        pred, cross_allowed = self._predict(x, mask_features, class_embed, sizes[0])
        predictions = [pred]
        for i in range(self.num_layers):
            f = i % self.num_feature_levels
            args = (i, x, pos, cross_allowed, memories[f], memory_pos[f], self_allowed)
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, *args, use_reentrant=False)
            else:
                x = self._layer(*args)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            pred, cross_allowed = self._predict(x, mask_features, class_embed, next_size)
            predictions.append(pred)

        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        out["query_valid"] = valid
        out["query_class"] = query_class
        return out
