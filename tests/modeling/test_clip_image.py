"""CLIPImageBackbone (E_I^theta) on a tiny random open_clip ViT, checked against open_clip."""

import copy

import pytest
import torch
from open_clip.model import resize_pos_embed
from torch import nn

from hiervl.modeling.backbone import CLIPImageBackbone, FrozenCLIPImageEncoder, build_clip
from hiervl.modeling.backbone.clip_vit import interpolate_pos_embed

TINY = dict(
    EMBED_DIM=24,
    IMAGE_SIZE=64,
    PATCH_SIZE=16,
    VISION_WIDTH=32,
    VISION_LAYERS=4,
    VISION_HEADS=4,
    TEXT_WIDTH=48,
    TEXT_LAYERS=1,
    TEXT_HEADS=4,
    CONTEXT_LENGTH=16,
)
OUT_INDICES = (1, 2, 3, 4)
CHANNELS = (8, 16, 16, 32)


def _visual(seed=0, image_size=64):
    torch.manual_seed(seed)
    model, _ = build_clip(
        model_name="custom", pretrained="", custom={**TINY, "IMAGE_SIZE": image_size}
    )
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that every term matters
        for p in model.visual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.visual.eval()


def _backbone(visual):
    return CLIPImageBackbone(visual=visual, out_indices=OUT_INDICES, pyramid_channels=CHANNELS)


def _reference_at(visual, height, width):
    """open_clip's own tower, with the position embedding resampled for an H x W input."""
    ref = copy.deepcopy(visual)
    grid = (height // 16, width // 16)
    ref.positional_embedding = nn.Parameter(
        interpolate_pos_embed(visual.positional_embedding.detach(), visual.grid_size, grid)
    )
    return ref


def test_pos_embed_interpolation():
    torch.manual_seed(0)
    pos = torch.randn(1 + 4 * 4, 8)
    # Native grid: exactly the original.
    assert torch.equal(interpolate_pos_embed(pos, (4, 4), (4, 4)), pos)
    # Non-square target: class row kept, one row per token.
    out = interpolate_pos_embed(pos, (4, 4), (3, 5))
    assert out.shape == (1 + 15, 8) and torch.equal(out[0], pos[0])
    # A constant grid stays constant (bicubic weights sum to one).
    const = torch.cat([pos[:1], torch.ones(16, 8) * 0.7])
    torch.testing.assert_close(
        interpolate_pos_embed(const, (4, 4), (6, 10))[1:], torch.full((60, 8), 0.7)
    )
    # Agrees with open_clip's checkpoint resizing (square grids; plain bicubic as in
    # MaskCLIP/SemiVL, i.e. without the antialiasing kernel open_clip uses by default).
    target = _visual(image_size=128)
    state = {"visual.positional_embedding": pos.clone()}
    resize_pos_embed(state, type("M", (), {"visual": target})(), antialias=False)
    torch.testing.assert_close(
        interpolate_pos_embed(pos, (4, 4), (8, 8)), state["visual.positional_embedding"]
    )


def test_output_shapes_and_strides_for_non_square_input():
    backbone = _backbone(_visual())
    assert backbone.output_shape() == {
        "res2": (8, 4),
        "res3": (16, 8),
        "res4": (16, 16),
        "res5": (32, 32),
    }
    assert backbone.patch_size == 16 and backbone.size_divisibility == 32
    assert backbone.grid_size(64, 96) == (4, 6)
    out = backbone(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 8, 16, 24),
        "res3": (2, 16, 8, 12),
        "res4": (2, 16, 4, 6),
        "res5": (2, 32, 2, 3),
    }
    tokens = backbone.forward_tokens(torch.randn(2, 3, 32, 80))
    assert tokens.shape == (2, 2 * 5, 32) and backbone.to_clip_space(tokens).shape == (2, 10, 24)


def test_sizes_not_divisible_by_the_patch_are_rejected():
    backbone = _backbone(_visual())
    with pytest.raises(
        ValueError, match="image size 65x96 is not divisible by the CLIP patch size 16"
    ):
        backbone(torch.randn(1, 3, 65, 96))
    with pytest.raises(ValueError, match="80x40"):
        backbone.forward_tokens(torch.randn(1, 3, 80, 40))


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_tokens_match_open_clip(size):
    """Taps after blocks 1..4, final tokens and CLIP-space tokens equal open_clip's, at the
    native size and (with the resampled position embedding) at a non-square size."""
    visual = _visual()
    backbone = _backbone(visual).eval()
    ref = _reference_at(visual, *size)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref.forward_intermediates(
            images, indices=[i - 1 for i in OUT_INDICES], output_fmt="NLC", intermediates_only=True
        )["image_intermediates"]
        for got, expected in zip(backbone.tap_tokens(images), want):
            torch.testing.assert_close(got, expected)
        final = backbone.forward_tokens(images)
        torch.testing.assert_close(final, want[-1])
        ref.output_tokens = True
        _, ln_tokens = ref(images)  # ln_post(tokens), without the projection
        torch.testing.assert_close(backbone.to_clip_space(final), ln_tokens @ ref.proj)


def test_each_level_uses_its_own_block():
    """res2 comes from block 1, so blocks 2..4 get no gradient from it; res5 reaches all."""
    backbone = _backbone(_visual())
    backbone(torch.randn(1, 3, 64, 64))["res2"].square().sum().backward()
    blocks = backbone.visual.transformer.resblocks
    assert blocks[0].mlp.c_fc.weight.grad is not None
    assert all(p.grad is None for b in blocks[1:] for p in b.parameters())
    backbone.zero_grad(set_to_none=True)
    backbone(torch.randn(1, 3, 64, 64))["res5"].square().sum().backward()
    assert all(p.grad is not None for b in blocks for p in b.parameters())


def test_gradients_reach_the_backbone_not_the_frozen_copy():
    visual = _visual()
    frozen = FrozenCLIPImageEncoder(visual=visual)
    backbone = _backbone(visual).train()
    images = torch.randn(2, 3, 64, 96)
    out = backbone(images)
    loss = sum(v.square().mean() for v in out.values())
    loss = loss + backbone.to_clip_space(backbone.forward_tokens(images)).square().mean()
    loss = loss + frozen(images).global_embed.sum()  # no graph: adds a constant
    loss.backward()
    no_grad = [
        n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum()
    ]
    assert no_grad == []
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())


def test_batched_equals_single_image():
    # GroupNorm: per-image statistics even in training. float64 because GroupNorm over a
    # 1x2 stride-32 map amplifies float32 rounding.
    backbone = _backbone(_visual()).double().train()
    images = torch.randn(3, 3, 32, 64, dtype=torch.float64)
    batched = backbone(images)
    for i in range(3):
        single = backbone(images[i : i + 1])
        for name, value in single.items():
            torch.testing.assert_close(value[0], batched[name][i])


def test_configuration_errors():
    visual = _visual()
    with pytest.raises(ValueError, match="\\[0\\] outside 1..4"):
        CLIPImageBackbone(visual=visual, out_indices=(0, 2, 3, 4), pyramid_channels=CHANNELS)
    with pytest.raises(ValueError, match="OUT_INDICES needs 4 block indices"):
        CLIPImageBackbone(visual=visual, out_indices=(2, 4), pyramid_channels=CHANNELS)
    with pytest.raises(ValueError, match="PYRAMID_CHANNELS needs 4 values"):
        CLIPImageBackbone(visual=visual, out_indices=OUT_INDICES, pyramid_channels=(8,))
    with pytest.raises(ValueError, match="VisionTransformer"):
        CLIPImageBackbone(
            visual=nn.Linear(2, 2), out_indices=OUT_INDICES, pyramid_channels=CHANNELS
        )
