"""Checkpoints: atomic saves (a failed write leaves the previous checkpoint and
``last_checkpoint`` intact, no partial file) and strict, clearly-reported loading."""

import os

import pytest
import torch
from torch import nn

from hiervl.engine.checkpoint import HierVLCheckpointer, atomic_write_text


def _linear(seed: int, in_features: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, 2)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = _linear(0)
    checkpointer = HierVLCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000")
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.weight.add_(1.0)
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # bytes reach the file, then the "disk fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0001")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"
    fresh = _linear(1)
    HierVLCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def test_successful_save_replaces_and_tags(tmp_path):
    model = _linear(0)
    checkpointer = HierVLCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000")
    with torch.no_grad():
        model.weight.fill_(0.5)
    checkpointer.save("model_0001", iteration=1)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000.pth", "model_0001.pth"]
    fresh = _linear(1)
    extra = HierVLCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert torch.equal(fresh.weight, torch.full((2, 3), 0.5))


def test_failed_text_write_leaves_old_text(tmp_path, monkeypatch):
    path = tmp_path / "last_checkpoint"
    atomic_write_text("model_0000.pth", str(path))

    def fail(*args, **kwargs):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text("model_0001.pth", str(path))
    monkeypatch.undo()
    assert path.read_text() == "model_0000.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_checkpoint_of_another_shape_names_file_and_weight(tmp_path):
    HierVLCheckpointer(_linear(0, in_features=3), str(tmp_path)).save("small")
    path = str(tmp_path / "small.pth")
    with pytest.raises(ValueError, match="another shape") as err:
        HierVLCheckpointer(_linear(0, in_features=4), str(tmp_path)).load(path)
    assert path in str(err.value)
    assert "weight: checkpoint (2, 3) vs model (2, 4)" in str(err.value)


def test_checkpoint_missing_and_unknown_weights(tmp_path):
    torch.manual_seed(0)
    HierVLCheckpointer(nn.Sequential(nn.Linear(3, 3)), str(tmp_path)).save("one")
    HierVLCheckpointer(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), str(tmp_path)).save("two")
    two_layers = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"2 model weights missing \(e.g. 1.weight"):
        HierVLCheckpointer(two_layers, str(tmp_path)).load(str(tmp_path / "one.pth"))
    with pytest.raises(ValueError, match=r"2 unknown weights \(e.g. 1.weight"):
        HierVLCheckpointer(nn.Sequential(nn.Linear(3, 3)), str(tmp_path)).load(
            str(tmp_path / "two.pth")
        )


def test_missing_checkpoint_file_is_a_value_error(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    message = "cannot read MODEL.WEIGHTS checkpoint .*nowhere.pth: no such file"
    with pytest.raises(ValueError, match=message):
        HierVLCheckpointer(_linear(0), str(tmp_path)).load(missing)
