"""``python -m hiervl.tools.pretrain_clip`` at a few steps: the contrastive loss falls, the
checkpoint loads through HierVL's CLIP loader (MODEL.HIERVL.CLIP.PRETRAINED), a second
call reuses the cache, and the zero-shot figures are computed as by hand."""

import json
import os

import numpy as np
import pytest
import torch

from hiervl.engine.launcher import setup_cfg
from hiervl.modeling.backbone.clip_loader import build_clip
from hiervl.tools import pretrain_clip, zero_shot
from hiervl.tools.pretrain_clip import PretrainSettings, clip_sizes, ensure_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "MODEL.HIERVL.CLIP.CUSTOM.EMBED_DIM", "32",
    "MODEL.HIERVL.CLIP.CUSTOM.IMAGE_SIZE", "32",
    "MODEL.HIERVL.CLIP.CUSTOM.PATCH_SIZE", "8",
    "MODEL.HIERVL.CLIP.CUSTOM.VISION_WIDTH", "32",
    "MODEL.HIERVL.CLIP.CUSTOM.VISION_LAYERS", "2",
    "MODEL.HIERVL.CLIP.CUSTOM.VISION_HEADS", "2",
    "MODEL.HIERVL.CLIP.CUSTOM.TEXT_WIDTH", "32",
    "MODEL.HIERVL.CLIP.CUSTOM.TEXT_LAYERS", "1",
    "MODEL.HIERVL.CLIP.CUSTOM.TEXT_HEADS", "2",
]  # fmt: skip
FEW = PretrainSettings(steps=30, batch_size=16, num_images=48, heldout_images=12, lr=2e-3)


def test_binary_auc_by_hand():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered.
    assert zero_shot.binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # A tie counts half; one class only is undefined.
    assert zero_shot.binary_auc(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])) == 0.75
    assert np.isnan(zero_shot.binary_auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_confusion_iou_by_hand():
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 2, 2]])
    iou = zero_shot.confusion_iou(labels, pred, num_classes=4)
    # class 0: 1 hit, union 2 (gt) + 2 (pred) - 1 = 3; class 1: 2 / (3 + 3 - 2); class 2:
    # 1 / 3;
    # class 3 absent from the ground truth (NaN, left out of the mean).
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 4, 1 / 3])
    assert np.isnan(iou[3])


def test_few_steps_lower_the_loss_and_load_through_the_loader(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(REPO)
    cfg = setup_cfg("configs/tiny/hiervl_quickstart.yaml", TINY)
    path, record = ensure_pretrained(cfg, str(tmp_path), FEW)
    losses = record["losses"]
    assert len(losses) == FEW.steps and not record["reused"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    # The checkpoint is a plain state dict of tensors in open_clip's format, and HierVL's
    # loader (weights_only) builds the config's architecture from it.
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "logit_scale" in state
    model, _ = build_clip(model_name="custom", pretrained=path, custom=clip_sizes(cfg))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    zs = record["zero_shot"]
    assert set(zs) == {"random_init", "pretrained"}
    assert 0.0 <= zs["pretrained"]["auc_mean"] <= 1.0
    assert 0.0 <= zs["pretrained"]["maskclip_mIoU"] <= 100.0
    with open(os.path.join(os.path.dirname(path), "pretrain.json")) as f:
        assert json.load(f)["settings"]["steps"] == FEW.steps
    # Same settings: reused without training; other settings: another folder.
    monkeypatch.setattr(pretrain_clip, "pretrain", pytest.fail)
    again, record = ensure_pretrained(cfg, str(tmp_path), FEW)
    assert again == path and record["reused"]
    assert pretrain_clip.settings_key(clip_sizes(cfg), FEW) != pretrain_clip.settings_key(
        clip_sizes(cfg), PretrainSettings(steps=31, batch_size=16, num_images=48)
    )
    assert "presence AUC, circle" in pretrain_clip.format_report(path, record)
    # Other drawing code (same GENERATOR_VERSION): another folder.
    key = pretrain_clip.settings_key(clip_sizes(cfg), FEW)
    monkeypatch.setattr(pretrain_clip, "generator_digest", lambda: "edited")
    assert pretrain_clip.settings_key(clip_sizes(cfg), FEW) != key


def test_bad_settings_and_configs_are_named():
    with pytest.raises(ValueError, match="steps must be positive"):
        PretrainSettings(steps=0)
    with pytest.raises(ValueError, match="batch_size 64 exceeds num_images 32"):
        PretrainSettings(batch_size=64, num_images=32)
    cfg = setup_cfg(os.path.join(REPO, "configs", "Base-HierVL.yaml"), [])
    with pytest.raises(ValueError, match="MODEL_NAME 'custom'"):
        clip_sizes(cfg)
