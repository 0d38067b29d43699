"""Checkpoint files: weights load, nothing else does, and every refusal names the file.

Finding 2 of issue 10: ``MODEL.WEIGHTS``, ``--resume`` and the demo loaded checkpoints with
full unpickling, so a real checkpoint with a ``__reduce__`` payload added ran it. Finding 6:
truncated/text checkpoints gave raw tracebacks; a killed save left ``.tmp-*.pth`` files;
checkpoints were written 0600.
"""

import os
import pickle
import re
import stat
import zipfile

import numpy as np
import pytest
import torch
from robustness_helpers import Payload, digest
from torch import nn

from hiervl.checkpoint_io import CheckpointError, check_plain, read_checkpoint
from hiervl.engine.checkpoint import HierVLCheckpointer, atomic_write_text
from hiervl.modeling.backbone.clip_loader import build_clip

HELP = "see INSTALL.md, 'What HierVL loads'"


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused(path, reason, what="checkpoint"):
    """read_checkpoint and the checkpointer both refuse ``path`` with the exact message."""
    before = digest(path) if os.path.isfile(path) and not os.path.islink(path) else None
    message = f"cannot read {what} {path}: {reason}"
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(path), what=what)
    assert str(err.value) == message
    if what == "checkpoint":  # the same file as MODEL.WEIGHTS
        model = _model(1)
        kept = _weights(model)
        with pytest.raises(CheckpointError) as err:
            HierVLCheckpointer(model).load(str(path))
        assert str(err.value) == f"cannot read MODEL.WEIGHTS checkpoint {path}: {reason}"
        assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
    if before is not None:
        assert digest(path) == before


def test_finding2_payload_in_a_real_checkpoint_never_runs(tmp_path, marker):
    source = _model(0)
    checkpointer = HierVLCheckpointer(source, str(tmp_path))
    checkpointer.save("model_final")
    path = tmp_path / "model_final.pth"
    data = torch.load(path, weights_only=True)
    data["extra"] = Payload(str(marker))  # the attacker's addition
    torch.save(data, path)
    _refused(
        path,
        "it holds a pickled Python object (io.open) that is not a tensor or plain container; "
        f"such objects can run code when loaded, so HierVL refuses the file ({HELP})",
    )


def test_payload_through_resume(tmp_path, marker):
    HierVLCheckpointer(_model(0), str(tmp_path)).save("model_0000009")
    path = tmp_path / "model_0000009.pth"
    torch.save({"model": _model(0).state_dict(), "iteration": Payload(str(marker))}, path)
    resumed = f"cannot read resume checkpoint {path}: it holds a pickled Python object (io.open)"
    with pytest.raises(CheckpointError, match=re.escape(resumed)):
        HierVLCheckpointer(_model(1), str(tmp_path)).resume_or_load("", resume=True)


def test_payload_in_a_clip_checkpoint(tmp_path, marker):
    path = tmp_path / "clip.pt"
    torch.save({"visual.proj": torch.zeros(2), "x": Payload(str(marker))}, path)
    custom = dict(
        embed_dim=8, image_size=32, patch_size=16, vision_width=32, vision_layers=1,
        vision_heads=2, text_width=32, text_layers=1, text_heads=2, context_length=16,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        build_clip(model_name="custom", pretrained=str(path), custom=custom)
    assert str(err.value).startswith(
        f"cannot read CLIP checkpoint {path}: it holds a pickled Python object (io.open)"
    )


def test_numpy_arrays_are_refused_naming_the_class(tmp_path):
    path = tmp_path / "numpy.pth"
    torch.save({"model": {"w": np.zeros(3)}}, path)
    _refused(
        path,
        "it holds a pickled Python object (numpy.core.multiarray._reconstruct) that is not a "
        f"tensor or plain container; such objects can run code when loaded, so HierVL refuses "
        f"the file ({HELP})",
    )


def test_detectron2_pkl_backbone_is_refused(tmp_path, marker):
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:  # detectron2/Caffe2 model zoo layout
        pickle.dump({"model": {"conv1.weight": np.zeros(3)}, "__author__": "x"}, f)
    _refused(
        path,
        "a Python pickle, not a PyTorch or safetensors checkpoint; unpickling can run arbitrary "
        "code, so HierVL does not read pickles (detectron2/Caffe2 model-zoo .pkl backbones are "
        f"such files; {HELP})",
    )
    with open(path, "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(CheckpointError, match="a Python pickle"):
        read_checkpoint(str(path))


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    _refused(
        path,
        "a TorchScript archive, which holds code; HierVL loads only weights: save its "
        f"state_dict() as a .pth or .safetensors file first ({HELP})",
    )


def test_truncated_text_empty_folder_and_loop(tmp_path):
    HierVLCheckpointer(_model(0), str(tmp_path)).save("full")
    full = (tmp_path / "full.pth").read_bytes()
    half = tmp_path / "half.pth"
    half.write_bytes(full[: len(full) // 2])
    _refused(
        half,
        "truncated or corrupt (an interrupted download or save?): File is not a zip file",
    )
    text = tmp_path / "notes.pth"
    text.write_text("MODEL:\n  WEIGHTS: model.pth\n")
    _refused(text, "a text file, not a checkpoint (it starts with 'MODEL:')")
    html = tmp_path / "download.pth"
    html.write_text("<!DOCTYPE html><html>404</html>")
    _refused(
        html, "a text file, not a checkpoint (it starts with '<!DOCTYPE html><html>404</html>')"
    )
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    _refused(empty, "the file is empty (0 bytes: an interrupted download or save?)")
    _refused(tmp_path, "it is a folder, not a checkpoint file")
    loop = tmp_path / "loop.pth"
    os.symlink(loop, loop)
    _refused(loop, "a symbolic link loop")
    _refused(tmp_path / "missing.pth", "no such file")
    binary = tmp_path / "random.pth"
    binary.write_bytes(bytes(range(0xF0, 0x100)) * 4)
    _refused(
        binary,
        "not a PyTorch (.pth) or safetensors checkpoint (it starts with "
        f"{bytes(range(0xF0, 0xF8))!r})",
    )


def test_zip_of_something_else_is_refused(tmp_path):
    path = tmp_path / "photos.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
            archive.writestr(name, b"not a tensor")
    _refused(path, "a zip archive, not a PyTorch checkpoint (it holds a.jpg, b.jpg, c.jpg, ...)")


def test_safetensors_and_legacy_files_load(tmp_path, marker):
    from safetensors.torch import save_file

    source = _model(0)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": source.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    for path in (st, legacy):
        model = _model(1)
        HierVLCheckpointer(model).load(str(path))
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({"x": Payload(str(marker))}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy.pth: it holds a pickled Python object"):
        read_checkpoint(str(legacy))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-7])
    _refused(
        cut,
        "truncated or corrupt safetensors file (Error while deserializing header: incomplete "
        "metadata, file not fully covered)",
    )
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(st.read_bytes()[:20])
    _refused(header_only, "truncated safetensors file (an interrupted download?)")


def test_saves_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        checkpointer = HierVLCheckpointer(_model(0), str(tmp_path))
        checkpointer.save("model_0000000")
        atomic_write_text("{}\n", str(tmp_path / "metrics.json"))
    finally:
        os.umask(previous)
    for name in ("model_0000000.pth", "last_checkpoint", "metrics.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_stale_temporaries_are_removed_at_the_next_save(tmp_path, caplog):
    stale = tmp_path / ".tmp-model_0000009.pth-1234abcd.pth"
    stale.write_bytes(b"x" * 1000)
    old_style = tmp_path / ".tmp-k2j3h4.pth"  # the earlier mkstemp name
    old_style.write_bytes(b"x")
    keep = {"notes.txt": b"mine", ".tmp-other": b"not ours"}
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    with caplog.at_level("WARNING"):
        HierVLCheckpointer(_model(0), str(tmp_path)).save("model_0000010")
    assert sorted(os.listdir(tmp_path)) == sorted(["last_checkpoint", "model_0000010.pth", *keep])
    assert f"Removed {stale} (0.0 MB), left by an interrupted checkpoint save" in caplog.text


def test_what_is_saved_must_be_plain(tmp_path):
    checkpointer = HierVLCheckpointer(_model(0), str(tmp_path))
    with pytest.raises(TypeError) as err:
        checkpointer.save(
            "model_final",
            rng=np.random.default_rng(0).bit_generator.state["state"],
            extra=np.zeros(2),
        )
    assert str(err.value) == (
        "checkpoint model_final.pth.extra is a numpy.ndarray; checkpoints hold only tensors, "
        "dicts, lists, tuples, strings and numbers (convert it in its state_dict, e.g. with "
        "torch.as_tensor)"
    )
    assert os.listdir(tmp_path) == []
    check_plain({"a": [torch.zeros(1), (1, 2.0, "x", None, True)], "b": {"c": torch.Size([2])}})
    with pytest.raises(TypeError, match=r"^x.a has a key of type tuple: \(1, 2\)$"):
        check_plain({"a": {(1, 2): 3}}, where="x")


def test_resume_names_a_missing_last_checkpoint(tmp_path):
    atomic_write_text("model_0000099.pth", str(tmp_path / "last_checkpoint"))
    with pytest.raises(CheckpointError) as err:
        HierVLCheckpointer(_model(0), str(tmp_path)).resume_or_load("", resume=True)
    tag = tmp_path / "last_checkpoint"
    assert str(err.value) == (
        f"cannot resume: {tag} names model_0000099.pth, which does not exist in {tmp_path} "
        f"(restore it, or delete {tag} to start from scratch)"
    )
