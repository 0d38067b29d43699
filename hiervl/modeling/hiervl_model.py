"""The whole HierVL network as one plain PyTorch module (DESIGN §1).

    images ─► E_I^θ (CLIPImageBackbone) ─► res2..res5 ─┐
    images ─► E_I^0 (frozen) ─► v ──► HSQG ◄── t_k ◄── E_T + prompt (CLIPTextEncoder)
                                        │ queries (B,L,K,D), active (B,K)
                                        ▼ classes no image keeps are dropped (K' ≤ K)
                     CMSAM pixel decoder ─► mask features, multi-scale maps, Q_aligned
                                        ▼
                     dual-query decoder + dynamic mask head ─► logits, masks, Φ(q)

Shape letters: B images, K classes, L hierarchy levels, Q queries, C CLIP width,
H×W the input, h×w the mask features (stride 4).

No detectron2 here: ``hiervl/meta_arch.py`` builds this module from the config and
adds pre/post-processing; the losses live in ``criterion.py`` / ``objective.py``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hiervl.modeling.inference import semantic_inference


def live_text_queries(
    queries: torch.Tensor, active: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Keep only the classes that some image of the batch keeps active.

    A class HSQG pruned in every image cannot influence any output (CMSAM and the decoder
    mask it as a key, leave it unchanged as a query, and its outputs are invalid), so not
    computing it is exact, and it is most of the text queries: the few classes present in
    an image out of K. Classes active in another image of the batch stay, masked for the
    images that pruned them.

    Args:
        queries: (B, L, K, D); active: (B, K) bool.
    Returns:
        queries (B, L, K', D), active (B, K'), and the kept class indices (K',) long, or
        None when every class is kept (K' = K).
    """
    live = active.any(dim=0)
    if bool(live.all()):
        return queries, active, None
    classes = live.nonzero().squeeze(1)
    return queries[:, :, classes], active[:, classes], classes


class HierVLModel(nn.Module):
    """CLIP towers → HSQG → CMSAM pixel decoder → dual-query decoder → mask head."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        frozen_encoder: nn.Module,
        text_encoder: nn.Module,
        hsqg: nn.Module,
        pixel_decoder: nn.Module,
        decoder: nn.Module,
        feature_dropout: float,
    ):
        """
        Args:
            backbone: fine-tuned image encoder E_I^θ (``CLIPImageBackbone``).
            frozen_encoder: frozen copy E_I^0 (``FrozenCLIPImageEncoder``).
            text_encoder: frozen text tower with the learnable prompt (``CLIPTextEncoder``).
            hsqg: ``HSQG``.
            pixel_decoder: ``CMSAMPixelDecoder``.
            decoder: ``DualQueryDecoder`` (owns the dynamic mask head).
            feature_dropout: Dropout2d rate on the backbone features of the
                feature-perturbed view (UniMatch's L_fp; SSL.FP_DROPOUT).
        """
        super().__init__()
        self.backbone = backbone
        self.frozen_encoder = frozen_encoder
        self.text_encoder = text_encoder
        self.hsqg = hsqg
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.feature_dropout = feature_dropout

    @property
    def size_divisibility(self) -> int:
        """Input sides must be multiples of this (patch size × 2, for exact stride-32 maps)."""
        return int(self.backbone.size_divisibility)

    @property
    def class_names(self) -> List[str]:
        return list(self.text_encoder.class_names)

    def set_vocabulary(self, class_names: Sequence[str], *, source: str = "vocabulary") -> None:
        """Replace the class list (open vocabulary); text embeddings are recomputed.
        ValueError naming ``source`` for an empty list or names that are one text query."""
        self.text_encoder.set_vocabulary(list(class_names), source=source)

    def class_embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t, t_clip): prompt-tuned (K,C, with grad to the prompt) and frozen-template (K,C)."""
        return self.text_encoder(), self.text_encoder.template_embeddings()

    def forward(
        self,
        images: torch.Tensor,
        *,
        presence: Optional[torch.Tensor] = None,
        labeled: Optional[torch.Tensor] = None,
        perturb_features: bool = False,
        text: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        with_frozen: bool = False,
        static_shapes: bool = False,
        padding: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """Predict masks and classes for a batch.

        Args:
            images: (B,3,H,W) CLIP-normalised, H and W multiples of ``size_divisibility``.
            presence: (B,K) bool ground-truth class presence (labelled images) or None.
            labeled: (B,) bool, which rows of ``presence`` are real ground truth.
            perturb_features: apply Dropout2d(``feature_dropout``) to the backbone features.
            text: precomputed ``class_embeddings()`` (computed here when None).
            with_frozen: also run E_I^0 at full resolution (``frozen`` in the output; the
                losses that read its dense features ask for it). HSQG's v always comes
                from E_I^0's pass at CLIP's native size (``global_embedding``).
            static_shapes: export mode (ONNX, ``hiervl.tools.export``): no tensor size
                depends on the data. Every class keeps its text queries (pruned ones
                masked, not removed: Q = L·K + M) and HSQG's resize runs as constant
                matrices; the valid queries' outputs equal the default path's.
            padding: (B,H,W) bool, True on padded pixels (crop or batch padding), which the
                pixel decoder's attention then ignores; None = no padding.
        Returns:
            The decoder's dict (``pred_logits`` (B,Q,K+1), ``pred_masks`` (B,Q,h,w),
            Q = L·K' + M with K' the classes active in at least one image,
            ``query_proj`` (B,Q,C), ``aux_outputs``, ``query_valid`` (B,Q),
            ``query_class`` (Q,)) plus ``relevance`` / ``gate`` / ``active`` (B,K) from
            HSQG (``relevance`` None when HSQG is disabled), ``frozen`` (E_I^0's
            full-resolution features, None unless ``with_frozen``) and ``text`` (t, t_clip).
        """
        t, t_clip = self.class_embeddings() if text is None else text
        frozen = self.frozen_encoder(images) if with_frozen else None
        features = self.backbone(images)
        if perturb_features:
            features = {
                k: F.dropout2d(v, p=self.feature_dropout, training=True)
                for k, v in features.items()
            }
        image_embed = None
        if self.hsqg.enabled:
            image_embed = self.frozen_encoder.global_embedding(images, static_shapes=static_shapes)
        gen = self.hsqg(t, image_embed, presence, labeled, num_images=images.shape[0])
        if static_shapes:
            queries, active, classes = gen.queries, gen.active, None
        else:
            queries, active, classes = live_text_queries(gen.queries, gen.active)
        pix = self.pixel_decoder(features, queries, active, padding)
        out = self.decoder(
            pix.text_queries,
            active,
            pix.multi_scale_features,
            pix.mask_features,
            t,
            text_classes=classes,
        )
        out.update(
            relevance=gen.relevance,
            gate=gen.gate,
            active=gen.active,
            frozen=frozen,
            text=(t, t_clip),
        )
        return out

    @staticmethod
    def semantic_scores(outputs: Dict[str, object], size: Tuple[int, int]) -> torch.Tensor:
        """Semantic scores S (B,K,H,W) for training-time probability maps.

        S is combined at the mask-feature resolution and then resized (K maps instead of
        Q mask logits), which keeps the per-pixel maps of the semi-supervised losses
        affordable; inference (:meth:`predict_scores`) resizes the mask logits first.
        """
        scores = semantic_inference(
            outputs["pred_logits"], outputs["pred_masks"], outputs["query_valid"]
        )
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        return scores

    @staticmethod
    def semantic_probs(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """P = S normalised over classes (B,K,H,W); S ≥ 0 so this is a distribution."""
        scores = scores.clamp_min(0)
        return scores / scores.sum(dim=1, keepdim=True).clamp_min(eps)

    @torch.no_grad()
    def class_relevance(
        self, images: torch.Tensor, text: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """HSQG's predicted relevance s_k (B,K) of every class for each image (any size)."""
        t = self.class_embeddings()[0] if text is None else text[0]
        div = self.size_divisibility
        pad_h, pad_w = (-images.shape[-2]) % div, (-images.shape[-1]) % div
        images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.hsqg.relevance(t, self.frozen_encoder.global_embedding(images))

    def predict_scores(
        self,
        images: torch.Tensor,
        text: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        *,
        static_shapes: bool = False,
        prune_classes: bool = False,
    ) -> torch.Tensor:
        """Inference on one window: (B,3,H,W) any size → scores S (B,K,H,W).

        The window is zero-padded at the bottom/right to a multiple of the patch size (the
        pixel decoder is told which pixels are padding) and the padding is cropped from
        the scores. ``text``: cached ``class_embeddings()``.
        ``static_shapes``: export mode (see :meth:`forward`), the same scores.
        ``prune_classes`` (TEST.PRUNE_CLASSES): zero the scores of the classes HSQG pruned
        for the image, so that the visual queries (which may vote for any class) cannot
        label a pixel with one of them (DESIGN §1.4).
        """
        h, w = images.shape[-2:]
        div = self.size_divisibility
        pad_h, pad_w = (-h) % div, (-w) % div
        padding = None
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            padding = torch.ones(images.shape[:1] + images.shape[2:], dtype=torch.bool)
            padding[:, :h, :w] = False
            padding = padding.to(images.device)
        out = self(images, text=text, static_shapes=static_shapes, padding=padding)
        # Mask2Former's order: resize the mask logits, then combine (sharper boundaries
        # than combining at stride 4 and resizing the class scores).
        masks = F.interpolate(
            out["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        scores = semantic_inference(out["pred_logits"], masks, out["query_valid"])
        if prune_classes:
            scores = scores * out["active"][:, :, None, None].to(scores.dtype)
        return scores[:, :, :h, :w]
