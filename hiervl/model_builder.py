"""Config → modules for :class:`hiervl.meta_arch.HierVL`.

This file and ``meta_arch.py`` are the only places that read ``MODEL.HIERVL.*``: every
module under ``hiervl/modeling`` takes explicit keyword arguments.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hiervl.modeling.backbone.clip import build_clip_towers
from hiervl.modeling.backbone.clip_download import check_weights_source
from hiervl.modeling.criterion import SetCriterion
from hiervl.modeling.dual_query_decoder import DualQueryDecoder
from hiervl.modeling.hiervl_model import HierVLModel
from hiervl.modeling.hsqg import HSQG
from hiervl.modeling.mask_head import DynamicMaskHead
from hiervl.modeling.matcher import QueryMatcher
from hiervl.modeling.objective import HierVLObjective
from hiervl.modeling.pixel_decoder import CMSAMPixelDecoder
from hiervl.modeling.vl_losses import PromptProjector


def _custom_clip_sizes(c) -> Optional[dict]:
    """MODEL.HIERVL.CLIP.CUSTOM as keyword sizes (None unless MODEL_NAME is "custom")."""
    if c.MODEL_NAME != "custom":
        return None
    return {
        "embed_dim": c.CUSTOM.EMBED_DIM,
        "image_size": c.CUSTOM.IMAGE_SIZE,
        "patch_size": c.CUSTOM.PATCH_SIZE,
        "vision_width": c.CUSTOM.VISION_WIDTH,
        "vision_layers": c.CUSTOM.VISION_LAYERS,
        "vision_heads": c.CUSTOM.VISION_HEADS,
        "text_width": c.CUSTOM.TEXT_WIDTH,
        "text_layers": c.CUSTOM.TEXT_LAYERS,
        "text_heads": c.CUSTOM.TEXT_HEADS,
        "context_length": c.CUSTOM.CONTEXT_LENGTH,
    }


def check_clip_weights(cfg) -> None:
    """Raise a one-line ValueError when the CLIP weights of ``cfg`` cannot be had here (a
    tag not cached and its host unreachable, a missing checkpoint file)."""
    check_weights_source(cfg.MODEL.HIERVL.CLIP.MODEL_NAME, cfg.MODEL.HIERVL.CLIP.PRETRAINED)


def build_hiervl_model(cfg, class_names: Sequence[str]) -> HierVLModel:
    """The network of DESIGN §1 with the vocabulary ``class_names``."""
    h = cfg.MODEL.HIERVL
    towers = build_clip_towers(
        model_name=h.CLIP.MODEL_NAME,
        pretrained=h.CLIP.PRETRAINED,
        custom=_custom_clip_sizes(h.CLIP),
        out_indices=h.CLIP.OUT_INDICES,
        pyramid_channels=h.CLIP.PYRAMID_CHANNELS,
        prompt_length=h.CLIP.PROMPT_LENGTH,
        template=h.CLIP.TEMPLATE,
        class_names=class_names,
    )
    towers.backbone.set_grad_checkpointing(h.CHECKPOINTING.IMAGE_ENCODER)
    clip_dim = towers.backbone.embed_dim
    if h.PIXEL_DECODER.CONV_DIM != h.DECODER.HIDDEN_DIM:
        raise ValueError(
            "MODEL.HIERVL.PIXEL_DECODER.CONV_DIM must equal MODEL.HIERVL.DECODER.HIDDEN_DIM "
            f"(text queries flow from CMSAM into the decoder), got {h.PIXEL_DECODER.CONV_DIM} and "
            f"{h.DECODER.HIDDEN_DIM}"
        )
    hsqg = HSQG(
        clip_dim=clip_dim,
        hidden_dim=h.PIXEL_DECODER.CONV_DIM,
        num_levels=h.HSQG.NUM_LEVELS,
        relevance_threshold=h.HSQG.RELEVANCE_THRESHOLD,
        min_active=h.HSQG.MIN_ACTIVE,
        init_scale=h.HSQG.INIT_SCALE,
        init_bias=h.HSQG.INIT_BIAS,
        enabled=h.HSQG.ENABLED,
        labeled_gate=h.HSQG.LABELED_GATE,
    )
    pixel_decoder = CMSAMPixelDecoder(
        input_shape=towers.backbone.output_shape(),
        transformer_in_features=list(h.PIXEL_DECODER.IN_FEATURES),
        conv_dim=h.PIXEL_DECODER.CONV_DIM,
        mask_dim=h.PIXEL_DECODER.MASK_DIM,
        num_encoder_layers=h.PIXEL_DECODER.NUM_ENCODER_LAYERS,
        num_heads=h.PIXEL_DECODER.NUM_HEADS,
        num_points=h.PIXEL_DECODER.NUM_POINTS,
        ffn_dim=h.PIXEL_DECODER.FFN_DIM,
        dropout=h.PIXEL_DECODER.DROPOUT,
        common_stride=h.PIXEL_DECODER.COMMON_STRIDE,
        cmsam_enabled=h.CMSAM.ENABLED,
        cmsam_heads=h.CMSAM.NUM_HEADS,
        cmsam_ffn_dim=h.CMSAM.FFN_DIM,
        cmsam_dropout=h.CMSAM.DROPOUT,
        num_text_levels=h.HSQG.NUM_LEVELS,
        mask_padding=h.PIXEL_DECODER.MASK_PADDING,
        norm_groups=min(32, h.PIXEL_DECODER.CONV_DIM),
        checkpointing=h.CHECKPOINTING.PIXEL_DECODER,
    )
    mask_head = DynamicMaskHead(
        hidden_dim=h.DECODER.HIDDEN_DIM,
        mask_dim=h.PIXEL_DECODER.MASK_DIM,
        clip_dim=clip_dim,
        kernel_mlp_layers=h.MASK_HEAD.KERNEL_MLP_LAYERS,
        logit_scale_init=h.MASK_HEAD.LOGIT_SCALE_INIT,
    )
    decoder = DualQueryDecoder(
        hidden_dim=h.DECODER.HIDDEN_DIM,
        num_heads=h.DECODER.NUM_HEADS,
        ffn_dim=h.DECODER.FFN_DIM,
        num_layers=h.DECODER.NUM_LAYERS,
        num_visual_queries=h.DECODER.NUM_VISUAL_QUERIES,
        num_feature_levels=len(h.PIXEL_DECODER.IN_FEATURES),
        num_text_levels=h.HSQG.NUM_LEVELS,
        pre_norm=h.DECODER.PRE_NORM,
        dropout=h.DECODER.DROPOUT,
        mask_head=mask_head,
        in_channels=h.PIXEL_DECODER.CONV_DIM,
        text_queries_enabled=h.DECODER.TEXT_QUERIES,
        checkpointing=h.CHECKPOINTING.DECODER,
    )
    return HierVLModel(
        backbone=towers.backbone,
        frozen_encoder=towers.frozen,
        text_encoder=towers.text,
        hsqg=hsqg,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        feature_dropout=h.SSL.FP_DROPOUT,
    )


def build_objective(cfg, clip_dim: int) -> HierVLObjective:
    """Supervised criterion + semi-supervised and vision-language losses (DESIGN §2-3).

    ``clip_dim``: C, the CLIP embedding width of the built model (for Φ_p).
    """
    h = cfg.MODEL.HIERVL
    matcher = QueryMatcher(
        cost_class=h.LOSS.CLASS_WEIGHT,
        cost_mask=h.LOSS.MASK_WEIGHT,
        cost_dice=h.LOSS.DICE_WEIGHT,
        num_points=h.LOSS.TRAIN_NUM_POINTS,
    )
    criterion = SetCriterion(
        matcher=matcher,
        class_weight=h.LOSS.CLASS_WEIGHT,
        mask_weight=h.LOSS.MASK_WEIGHT,
        dice_weight=h.LOSS.DICE_WEIGHT,
        no_object_weight=h.LOSS.NO_OBJECT_WEIGHT,
        deep_supervision=h.LOSS.DEEP_SUPERVISION,
        num_points=h.LOSS.TRAIN_NUM_POINTS,
        oversample_ratio=h.LOSS.OVERSAMPLE_RATIO,
        importance_sample_ratio=h.LOSS.IMPORTANCE_SAMPLE_RATIO,
        rel_weight=h.LOSS.REL_WEIGHT if h.HSQG.ENABLED else 0.0,
        qt_weight=h.LOSS.QT_WEIGHT,
    )
    return HierVLObjective(
        criterion=criterion,
        semi_supervised=h.SSL.ENABLED,
        consistency_weight=h.SSL.CONSISTENCY_WEIGHT,
        conf_threshold=h.SSL.CONF_THRESHOLD,
        consistency_mode=h.SSL.CONSISTENCY_MODE,
        entropy_weight=h.SSL.ENTROPY_WEIGHT if h.SSL.ENTROPY_ENABLED else 0.0,
        maskclip_weight=h.SSL.MASKCLIP_WEIGHT if h.SSL.MASKCLIP_ENABLED else 0.0,
        maskclip_certainty=h.SSL.MASKCLIP_CERTAINTY,
        maskclip_logit_scale=h.SSL.MASKCLIP_LOGIT_SCALE,
        prompt_projector=PromptProjector(dim=clip_dim) if h.VL.PROMPT_ENABLED else None,
        prompt_weight=h.VL.PROMPT_WEIGHT if h.VL.PROMPT_ENABLED else 0.0,
        anchor_lambda=h.VL.ANCHOR_LAMBDA,
        anchor_repulsion=h.VL.ANCHOR_REPULSION,
        mask_weight=h.VL.MASK_WEIGHT if h.VL.MASK_ENABLED else 0.0,
        mask_on_unlabeled=h.VL.MASK_ON_UNLABELED,
        pt_weight=h.VL.PT_WEIGHT if h.VL.PT_ENABLED else 0.0,
        pt_temperature=h.VL.PT_TEMPERATURE,
    )
