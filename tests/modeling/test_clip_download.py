"""PRETRAINED tags offline: a one-line error before anything is built, none when the
weights are cached or the host answers (no network used: the probe is replaced)."""

import pytest

from hiervl.modeling.backbone import clip_download, clip_loader
from hiervl.modeling.backbone.clip_download import check_weights_source, require_tag_weights


class _Built(Exception):
    """Raised instead of building ViT-B-16: the check let the build start."""


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """Nothing cached, no host reachable; building a model raises _Built."""
    probes = []

    def unreachable(url, timeout=clip_download.PROBE_TIMEOUT_S):
        probes.append(url)
        return False

    def build(*args, **kwargs):
        raise _Built()

    monkeypatch.setattr(clip_download, "cached_weights", lambda tag_cfg: None)
    monkeypatch.setattr(clip_download, "host_reachable", unreachable)
    monkeypatch.setattr(clip_loader.open_clip, "create_model", build)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return probes


def test_offline_openai_tag_fails_in_one_line_before_building(offline):
    with pytest.raises(ValueError) as info:
        clip_loader.build_clip(model_name="ViT-B-16", pretrained="openai", custom=None)
    message = str(info.value)
    assert "\n" not in message and offline == ["https://huggingface.co"]
    assert "MODEL.HIERVL.CLIP.PRETRAINED 'openai'" in message
    # OpenAI's weights as a file need the QuickGELU architecture (clip_loader's docstring).
    assert "MODEL.HIERVL.CLIP.MODEL_NAME ViT-B-16-quickgelu MODEL.HIERVL.CLIP.PRETRAINED" in message
    assert "configs/custom/hiervl_custom_tiny.yaml" in message
    assert "https://huggingface.co/timm/vit_base_patch16_clip_224.openai" in message


def test_hf_offline_variable_needs_no_probe(offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot be reached"):
        require_tag_weights("ViT-B-16", "openai")
    assert offline == []


def test_cached_or_reachable_weights_go_on_to_the_build(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(clip_download, "cached_weights", lambda tag_cfg: str(tmp_path / "w.bin"))
    with pytest.raises(_Built):
        clip_loader.build_clip(model_name="ViT-B-16", pretrained="openai", custom=None)
    monkeypatch.setattr(clip_download, "cached_weights", lambda tag_cfg: None)
    monkeypatch.setattr(clip_download, "host_reachable", lambda url, timeout=3.0: True)
    with pytest.raises(_Built):
        clip_loader.build_clip(model_name="ViT-B-16", pretrained="openai", custom=None)


def test_weights_source_without_building(offline, tmp_path):
    check_weights_source("custom", "")  # random init: nothing needed
    check_weights_source("hf-hub:org/repo", "")
    with pytest.raises(ValueError, match="cannot be reached"):
        check_weights_source("ViT-B-16", "openai")
    checkpoint = tmp_path / "clip.pt"
    with pytest.raises(ValueError, match=f"'{checkpoint}' is neither an open_clip tag"):
        check_weights_source("ViT-B-16", str(checkpoint))
    checkpoint.write_bytes(b"")
    check_weights_source("ViT-B-16", str(checkpoint))


def test_url_cache_is_found(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_download, "_hub", lambda: None)  # no huggingface_hub: URL route
    monkeypatch.setenv("HOME", str(tmp_path))
    tag = {"url": "https://example.org/clip/abc/ViT-X.pt"}
    assert clip_download.cached_weights(tag) is None
    cached = tmp_path / ".cache" / "clip" / "ViT-X.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"w")
    assert clip_download.cached_weights(tag) == str(cached)
