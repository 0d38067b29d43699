"""FrozenCLIPImageEncoder (E_I^0): open_clip's own outputs, MaskCLIP value path, frozenness."""

import copy

import pytest
import torch
from torch import nn

from hiervl.modeling.backbone import FrozenCLIPImageEncoder, build_clip
from hiervl.modeling.backbone.clip_vit import interpolate_pos_embed

TINY = dict(
    EMBED_DIM=24,
    IMAGE_SIZE=64,
    PATCH_SIZE=16,
    VISION_WIDTH=32,
    VISION_LAYERS=3,
    VISION_HEADS=4,
    TEXT_WIDTH=48,
    TEXT_LAYERS=1,
    TEXT_HEADS=4,
    CONTEXT_LENGTH=16,
)


def _model(seed=0):
    torch.manual_seed(seed)
    model, _ = build_clip(model_name="custom", pretrained="", custom=TINY)
    with torch.no_grad():  # non-trivial LayerNorms and biases (incl. the value bias)
        for p in model.visual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _reference_at(visual, height, width):
    """open_clip's own tower with the position embedding resampled for an H x W input."""
    ref = copy.deepcopy(visual)
    ref.positional_embedding = nn.Parameter(
        interpolate_pos_embed(
            visual.positional_embedding.detach(), visual.grid_size, (height // 16, width // 16)
        )
    )
    return ref


def test_global_embedding_equals_encode_image_at_native_size():
    model = _model()
    frozen = FrozenCLIPImageEncoder(visual=model.visual)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.encode_image(images)
    torch.testing.assert_close(frozen(images).global_embed, want)


@pytest.mark.parametrize(
    "size,resized", [((64, 64), (64, 64)), ((128, 128), (64, 64)), ((128, 208), (64, 112))]
)
def test_hsqg_global_embedding_is_clip_at_its_native_size(size, resized):
    """v = encode_image of the image resized so its shorter side is 64 (this tower's input
    size), aspect kept, sides rounded to the 16-px patch (208 * 0.5 = 104 -> 112)."""
    model = _model()
    frozen = FrozenCLIPImageEncoder(visual=model.visual)
    assert frozen.native_size == 64
    images = torch.randn(2, 3, *size)
    small = torch.nn.functional.interpolate(
        images, size=resized, mode="bilinear", align_corners=False, antialias=True
    )
    with torch.no_grad():
        want = _reference_at(model.visual, *resized)(small)
    torch.testing.assert_close(frozen.global_embedding(images), want)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_dense_outputs_match_open_clip_blocks(size):
    """dense_tokens = final-block tokens; dense_clip = last block run on every token as a
    length-1 sequence (attention to itself only == MaskCLIP's value path), ln_post, proj."""
    model = _model()
    frozen = FrozenCLIPImageEncoder(visual=model.visual)
    ref = _reference_at(model.visual, *size)
    images = torch.randn(2, 3, *size)
    height, width = size[0] // 16, size[1] // 16
    out = frozen(images)
    with torch.no_grad():
        before_last, last = ref.forward_intermediates(
            images, indices=[1, 2], output_fmt="NLC", intermediates_only=True
        )["image_intermediates"]
        batch, num, dim = before_last.shape
        alone = ref.transformer.resblocks[-1](before_last.reshape(batch * num, 1, dim))
        value_path = ref.ln_post(alone.reshape(batch, num, dim)) @ ref.proj
        global_embed = ref(images)
    torch.testing.assert_close(out.dense_tokens, last)
    assert out.dense_clip.shape == (2, 24, height, width)
    torch.testing.assert_close(out.dense_clip.flatten(2).transpose(1, 2), value_path)
    torch.testing.assert_close(out.global_embed, global_embed)
    # The value path really differs from the attention path.
    assert not torch.allclose(value_path, ref.ln_post(last) @ ref.proj, atol=1e-3)


def test_frozen_copy_is_independent_eval_and_gradient_free():
    model = _model()
    frozen = FrozenCLIPImageEncoder(visual=model.visual)
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    before = frozen(images)
    with torch.no_grad():  # "fine-tune" the source tower: the copy must not follow
        for p in model.visual.parameters():
            p.mul_(1.5)
    frozen.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())
    after = frozen(images)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
        assert not new.requires_grad and new.grad_fn is None
    assert all(not p.requires_grad for p in frozen.parameters())


def test_non_divisible_size_is_rejected():
    frozen = FrozenCLIPImageEncoder(visual=_model().visual)
    with pytest.raises(ValueError, match="64x70"):
        frozen(torch.randn(1, 3, 64, 70))
