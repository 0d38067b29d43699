"""build_clip / load_clip_checkpoint / build_clip_towers on tiny random towers (no downloads)."""

import pytest
import torch

from hiervl.modeling.backbone import build_clip, build_clip_towers, custom_clip_config

# Distinct widths (vision 32, text 48, embedding 24) so that mixed-up dimensions fail.
TINY = dict(
    EMBED_DIM=24,
    IMAGE_SIZE=64,
    PATCH_SIZE=16,
    VISION_WIDTH=32,
    VISION_LAYERS=2,
    VISION_HEADS=4,
    TEXT_WIDTH=48,
    TEXT_LAYERS=2,
    TEXT_HEADS=4,
    CONTEXT_LENGTH=24,
)


def _tiny(seed, pretrained="", **overrides):
    torch.manual_seed(seed)
    return build_clip(model_name="custom", pretrained=pretrained, custom={**TINY, **overrides})


def _outputs(model, tokenizer):
    torch.manual_seed(123)
    images = torch.randn(2, 3, 64, 64)
    text = tokenizer(["a photo of a cat.", "a traffic light"])
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def test_custom_architecture_has_the_requested_sizes():
    model, tokenizer = _tiny(0)
    visual = model.visual
    assert visual.transformer.width == 32 and len(visual.transformer.resblocks) == 2
    assert visual.transformer.resblocks[0].attn.num_heads == 4
    assert visual.patch_size == (16, 16) and visual.grid_size == (4, 4)
    assert visual.positional_embedding.shape == (1 + 16, 32)
    assert visual.proj.shape == (32, 24)
    assert model.transformer.width == 48 and model.transformer.resblocks[0].attn.num_heads == 4
    assert model.positional_embedding.shape == (24, 48)
    assert model.text_projection.shape == (48, 24)
    assert tokenizer.context_length == 24
    # Lower-case keys are accepted too (plain dicts in tests, CfgNode keys in configs).
    lower = custom_clip_config({k.lower(): v for k, v in TINY.items()})
    assert lower["vision_cfg"].head_width == 8 and lower["text_cfg"].heads == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(VISION_HEADS=5), "VISION_WIDTH 32 is not divisible by VISION_HEADS 5"),
        (dict(TEXT_LAYERS=0), "TEXT_LAYERS must be a positive int"),
        (dict(IMAGE_SIZE=72), "IMAGE_SIZE 72 is not divisible by PATCH_SIZE 16"),
        (dict(DEPTH=3), "unknown keys ['depth']"),
    ],
)
def test_custom_architecture_errors_name_the_key(change, message):
    with pytest.raises(ValueError) as err:
        custom_clip_config({**TINY, **change})
    assert message in str(err.value)


def test_custom_missing_key_is_named():
    sizes = dict(TINY)
    del sizes["CONTEXT_LENGTH"]
    with pytest.raises(ValueError, match="missing keys \\['context_length'\\]"):
        build_clip(model_name="custom", pretrained="", custom=sizes)


def test_unknown_architecture_and_tag_are_clear_errors():
    with pytest.raises(ValueError, match="'ViT-Q-99' is neither an open_clip architecture"):
        build_clip(model_name="ViT-Q-99", pretrained="", custom=None)
    # Checked before the (large) ViT-B-16 is built: fast, and lists the known tags.
    with pytest.raises(ValueError, match="not_a_tag.*openai"):
        build_clip(model_name="ViT-B-16", pretrained="not_a_tag", custom=None)
    with pytest.raises(ValueError, match="PRETRAINED must be empty"):
        build_clip(model_name="hf-hub:org/repo", pretrained="openai", custom=None)


def test_missing_checkpoint_path_is_named(tmp_path):
    missing = str(tmp_path / "nope" / "clip.pt")
    with pytest.raises(ValueError) as err:
        _tiny(0, pretrained=missing)
    assert missing in str(err.value)
    with pytest.raises(ValueError) as err:
        build_clip(model_name="ViT-B-16", pretrained=missing, custom=None)
    assert missing in str(err.value)


def test_state_dict_roundtrip_by_path_restores_outputs(tmp_path):
    source, tokenizer = _tiny(0)
    path = str(tmp_path / "tiny_clip.pt")
    torch.save(source.state_dict(), path)

    loaded, _ = _tiny(1, pretrained=path)
    fresh, _ = _tiny(1)
    want_image, want_text = _outputs(source, tokenizer)
    got_image, got_text = _outputs(loaded, tokenizer)
    torch.testing.assert_close(got_image, want_image, rtol=0, atol=0)
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=0)
    # Without the checkpoint the seed-1 model really is different.
    assert not torch.allclose(_outputs(fresh, tokenizer)[0], want_image)


def test_wrapped_and_prefixed_state_dicts_load(tmp_path):
    source, tokenizer = _tiny(0)
    path = str(tmp_path / "ddp.pth")
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    # A scalar logit_scale saved as (1,) must still load.
    wrapped["module.logit_scale"] = wrapped["module.logit_scale"].reshape(1)
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    loaded, _ = _tiny(1, pretrained=path)
    torch.testing.assert_close(_outputs(loaded, tokenizer)[0], _outputs(source, tokenizer)[0])


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    other, _ = _tiny(0, VISION_WIDTH=64)
    path = str(tmp_path / "wide.pt")
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError) as err:
        _tiny(0, pretrained=path)
    message = str(err.value)
    assert path in message and "does not match the architecture 'custom'" in message
    assert "visual.conv1.weight: checkpoint (64, 3, 16, 16) vs model (32, 3, 16, 16)" in message

    deeper, _ = _tiny(0, VISION_LAYERS=3)
    torch.save(deeper.state_dict(), path)
    with pytest.raises(ValueError, match="unexpected keys \\[visual.transformer.resblocks.2"):
        _tiny(0, pretrained=path)


def test_unreadable_checkpoints_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(ValueError, match="cannot read CLIP checkpoint") as err:
            _tiny(0, pretrained=str(path))
        assert str(path) in str(err.value)
    not_a_state = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_state)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        _tiny(0, pretrained=str(not_a_state))


def test_build_clip_towers_splits_one_model():
    torch.manual_seed(0)
    backbone, frozen, text = build_clip_towers(
        model_name="custom",
        pretrained="",
        custom=TINY,
        out_indices=[1, 1, 2, 2],
        pyramid_channels=[8, 16, 16, 32],
        prompt_length=4,
        template="a photo of a {}.",
        class_names=["cat", "dog"],
    )
    assert backbone.embed_dim == frozen.embed_dim == text.embed_dim == 24
    assert backbone.width == frozen.width == 32
    # E_I^0 starts as an exact, independent copy of E_I^theta.
    for (name, p), (name0, p0) in zip(
        backbone.visual.named_parameters(), frozen.visual.named_parameters()
    ):
        assert name == name0 and torch.equal(p, p0) and p.data_ptr() != p0.data_ptr()
        assert p.requires_grad and not p0.requires_grad
    trainable_text = [n for n, p in text.named_parameters() if p.requires_grad]
    assert trainable_text == ["prompt"]
    assert text().shape == (2, 24)
