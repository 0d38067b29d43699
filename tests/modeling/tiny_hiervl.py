"""Tiny HierVL networks and objectives built directly from the plain-torch modules.

Shared by ``test_hiervl_model.py`` and ``test_objective.py``; no detectron2, so the
plain-torch suite (``.venv-modern``) can run them. Sizes are the smallest that keep every
part of the architecture: 3 pixel-decoder levels (res3..res5), L = 3 text levels, visual
queries, deep supervision over 2 decoder layers, 64×64 inputs (2×2 res5 map).
"""

from typing import Sequence

import torch

from hiervl.modeling.backbone.clip import build_clip_towers
from hiervl.modeling.criterion import SetCriterion
from hiervl.modeling.dual_query_decoder import DualQueryDecoder
from hiervl.modeling.hiervl_model import HierVLModel
from hiervl.modeling.hsqg import HSQG
from hiervl.modeling.mask_head import DynamicMaskHead
from hiervl.modeling.matcher import QueryMatcher
from hiervl.modeling.objective import HierVLObjective, LabeledBatch, UnlabeledBatch
from hiervl.modeling.pixel_decoder import CMSAMPixelDecoder
from hiervl.modeling.vl_losses import PromptProjector

CLASSES = ("background", "circle", "square", "triangle", "star", "stripes")
SIZE = 64  # input side: a multiple of size_divisibility (32)
WIDTH = 32  # CLIP tower width, C, D and mask-feature width
DECODER_LAYERS = 2

CLIP_SIZES = dict(
    embed_dim=WIDTH,
    image_size=SIZE,
    patch_size=16,
    vision_width=WIDTH,
    vision_layers=2,
    vision_heads=2,
    text_width=WIDTH,
    text_layers=1,
    text_heads=2,
    context_length=24,
)


def build_model(
    *,
    class_names: Sequence[str] = CLASSES,
    num_levels: int = 3,
    hsqg_enabled: bool = True,
    labeled_gate: str = "ground_truth",
    cmsam_enabled: bool = True,
    num_visual_queries: int = 4,
    seed: int = 0,
    checkpointing: bool = False,
    dropout: float = 0.0,
) -> HierVLModel:
    """A random-init tiny HierVL (train mode); every tapped ViT block feeds the pyramid.

    ``checkpointing`` turns on activation checkpointing in the image encoder, the pixel
    decoder and the decoder; ``dropout`` is the pixel decoder's, CMSAM's and the decoder's.
    """
    torch.manual_seed(seed)
    towers = build_clip_towers(
        model_name="custom",
        pretrained="",
        custom=CLIP_SIZES,
        out_indices=[1, 1, 2, 2],
        pyramid_channels=[WIDTH] * 4,
        prompt_length=4,
        template="a photo of a {}.",
        class_names=list(class_names),
    )
    towers.backbone.set_grad_checkpointing(checkpointing)
    hsqg = HSQG(
        clip_dim=WIDTH,
        hidden_dim=WIDTH,
        num_levels=num_levels,
        relevance_threshold=0.5,
        min_active=1,
        init_scale=10.0,
        init_bias=-2.5,
        enabled=hsqg_enabled,
        labeled_gate=labeled_gate,
    )
    pixel_decoder = CMSAMPixelDecoder(
        input_shape=towers.backbone.output_shape(),
        transformer_in_features=["res3", "res4", "res5"],
        conv_dim=WIDTH,
        mask_dim=WIDTH,
        num_encoder_layers=1,
        num_heads=2,
        num_points=2,
        ffn_dim=2 * WIDTH,
        dropout=dropout,
        common_stride=4,
        cmsam_enabled=cmsam_enabled,
        cmsam_heads=2,
        cmsam_ffn_dim=2 * WIDTH,
        cmsam_dropout=dropout,
        num_text_levels=num_levels,
        mask_padding=True,
        norm_groups=8,
        checkpointing=checkpointing,
    )
    mask_head = DynamicMaskHead(
        hidden_dim=WIDTH,
        mask_dim=WIDTH,
        clip_dim=WIDTH,
        kernel_mlp_layers=3,
        logit_scale_init=50.0,
    )
    decoder = DualQueryDecoder(
        hidden_dim=WIDTH,
        num_heads=2,
        ffn_dim=2 * WIDTH,
        num_layers=DECODER_LAYERS,
        num_visual_queries=num_visual_queries,
        num_feature_levels=3,
        num_text_levels=num_levels,
        pre_norm=False,
        dropout=dropout,
        mask_head=mask_head,
        checkpointing=checkpointing,
    )
    return HierVLModel(
        backbone=towers.backbone,
        frozen_encoder=towers.frozen,
        text_encoder=towers.text,
        hsqg=hsqg,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        feature_dropout=0.5,
    )


def build_criterion(*, num_points: int = 256) -> SetCriterion:
    """The supervised criterion with the paper's weights and few sampled points."""
    return SetCriterion(
        matcher=QueryMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points),
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        deep_supervision=True,
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        rel_weight=1.0,
        qt_weight=0.05,
    )


def build_objective(**overrides) -> HierVLObjective:
    """The objective with the paper's defaults (every term on); ``overrides`` replace them."""
    kwargs = dict(
        criterion=build_criterion(),
        semi_supervised=True,
        consistency_weight=1.0,
        conf_threshold=0.95,
        consistency_mode="pixel",
        entropy_weight=0.01,
        maskclip_weight=0.1,
        maskclip_certainty=0.9,
        maskclip_logit_scale=100.0,
        prompt_projector=PromptProjector(dim=WIDTH),
        prompt_weight=0.05,
        anchor_lambda=0.1,
        anchor_repulsion="mean",
        mask_weight=0.5,
        mask_on_unlabeled=False,
        pt_weight=0.1,
        pt_temperature=0.07,
    )
    kwargs.update(overrides)
    return HierVLObjective(**kwargs)


def block_labels(batch: int, *, num_classes: int = len(CLASSES), seed: int = 0) -> torch.Tensor:
    """(B,SIZE,SIZE) label maps made of 16×16 patch-aligned blocks (so L_mask/L_pt have
    whole tokens of one class), a few classes per image, with an ignored stripe."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, min(3, num_classes), (batch, SIZE // 16, SIZE // 16), generator=gen)
    labels = cells.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    labels[:, :, -3:] = 255
    return labels


def labeled_batch(batch: int = 2, *, seed: int = 0) -> LabeledBatch:
    gen = torch.Generator().manual_seed(seed)
    return LabeledBatch(
        images=torch.randn(batch, 3, SIZE, SIZE, generator=gen),
        labels=block_labels(batch, seed=seed),
    )


def box(batch: int, top: int, left: int, side: int) -> torch.Tensor:
    """(B,SIZE,SIZE) bool CutMix box, True inside the square."""
    mask = torch.zeros(batch, SIZE, SIZE, dtype=torch.bool)
    mask[:, top : top + side, left : left + side] = True
    return mask


def unlabeled_batch(batch: int = 2, *, seed: int = 1) -> UnlabeledBatch:
    """Random views with two different CutMix boxes; the images are padded at the bottom,
    the partners in a column stripe that crosses both boxes."""
    gen = torch.Generator().manual_seed(seed)

    def views():
        return torch.randn(batch, 3, SIZE, SIZE, generator=gen)

    ignore = torch.zeros(batch, SIZE, SIZE, dtype=torch.bool)
    ignore[:, -4:] = True
    mix_ignore = torch.zeros_like(ignore)
    mix_ignore[:, :, 24:28] = True
    return UnlabeledBatch(
        weak=views(),
        strong1=views(),
        strong2=views(),
        box1=box(batch, 8, 8, 24),
        box2=box(batch, 30, 20, 30),
        ignore=ignore,
        mix_weak=views(),
        mix_strong1=views(),
        mix_strong2=views(),
        mix_ignore=mix_ignore,
    )
