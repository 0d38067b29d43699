"""Checkpointing: atomic writes, one safe reader, strict and clearly-reported loading.

detectron2's checkpointer writes files in place (a crash mid-write leaves a truncated
``model_XXXX.pth`` that ``last_checkpoint`` may point to), unpickles what it reads (a
checkpoint could run code) and only *logs* weights that do not fit the model. HierVL
- writes to a temporary file in the same folder and renames it; the file gets the mode
  the process umask gives any new file (``tempfile.mkstemp`` would make it 0600), and a
  temporary left by a killed save (``.tmp-*.pth``, as large as a checkpoint) is removed
  at the next save;
- checks before saving that the checkpoint holds only tensors and plain containers, and
  reads every checkpoint with :func:`hiervl.checkpoint_io.read_checkpoint`
  (``weights_only`` or safetensors; pickled objects, ``.pkl`` files and TorchScript are
  refused, naming the file);
- refuses to continue from a checkpoint built for another architecture.
"""

import glob
import logging
import os
import uuid
from typing import Any, Callable, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from hiervl.checkpoint_io import (
    CheckpointError,
    check_checkpoint_file,
    check_plain,
    read_checkpoint,
)

logger = logging.getLogger(__name__)

# Temporaries of atomic_torch_save (and of its earlier mkstemp version).
STALE_TEMPORARY_PATTERN = ".tmp-*.pth"


def _atomic_write(path: str, write: Callable[[Any], None], mode: str, suffix: str) -> None:
    """``write(file)`` into a temporary next to ``path``, then rename it to ``path``.

    The temporary is created like any new file (0666 minus the umask), so the result has
    the permissions a plain ``open(path, "w")`` would give it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace``."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb", ".pth")


def atomic_write_text(text: str, path: str) -> None:
    """Write a small text file atomically (same permissions as a plain write)."""
    _atomic_write(path, lambda f: f.write(text), "w", ".txt")


def remove_stale_temporaries(folder: str) -> int:
    """Delete ``.tmp-*.pth`` files a killed save left in ``folder``; returns how many.

    Only the main process of a run saves into its OUTPUT_DIR, one checkpoint at a time,
    so when a save starts every such file there is a leftover.
    """
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(folder), STALE_TEMPORARY_PATTERN)):
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except FileNotFoundError:
            continue
        removed += 1
        logger.warning(
            "Removed %s (%.1f MB), left by an interrupted checkpoint save", path, size / 1e6
        )
    return removed


class HierVLCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and strict model loading.

    Args:
        strict: raise ``ValueError`` when the checkpoint misses model weights or has
            weights of another shape (a different architecture or vocabulary size).
            Extra keys in the checkpoint are reported the same way.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = True, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict
        self._loading_path = ""
        self._what: Optional[str] = None  # how the file being loaded is named in errors

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        # What is saved must load with weights_only (checked here, not at the resume).
        check_plain(data, where=f"checkpoint {basename}")
        save_file = os.path.join(self.save_dir, basename)
        remove_stale_temporaries(self.save_dir)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def get_checkpoint_file(self) -> str:
        path = super().get_checkpoint_file()
        if path and not os.path.exists(path):
            tag = os.path.join(self.save_dir, "last_checkpoint")
            raise CheckpointError(
                f"cannot resume: {tag} names {os.path.basename(path)}, which does not exist "
                f"in {self.save_dir} (restore it, or delete {tag} to start from scratch)"
            )
        return path

    def resume_or_load(self, path: str, *, resume: bool = True):
        what = "resume checkpoint" if resume and self.has_checkpoint() else None
        return self._labelled(what, super().resume_or_load, path, resume=resume)

    def load(self, path: str, *args, what: Optional[str] = None, **kwargs):
        """fvcore's ``load``; ``what`` names the file in errors (default "MODEL.WEIGHTS
        checkpoint")."""
        return self._labelled(what, self._load, path, *args, **kwargs)

    def _labelled(self, what: Optional[str], fn: Callable, *args, **kwargs):
        outer = self._what is None
        if outer:
            self._what = what or "MODEL.WEIGHTS checkpoint"
        try:
            return fn(*args, **kwargs)
        finally:
            if outer:
                self._what = None

    def _load(self, path: str, *args, **kwargs):
        if path and "://" not in path:
            check_checkpoint_file(path, what=self._what)
        self._loading_path = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        """The checkpoint as ``{"model": state_dict, ...}``, read without unpickling objects.

        A bare state dict (``torch.save(model.state_dict())``, a ``.safetensors`` file) is
        taken as the model's weights, as detectron2 does.
        """
        what = self._what or "checkpoint"
        loaded = read_checkpoint(filename, what=what)
        if not isinstance(loaded, dict):
            raise CheckpointError(
                f"cannot read {what} {filename}: it holds a {type(loaded).__name__}, "
                "not a dict of weights"
            )
        if "model" not in loaded:
            loaded = {"model": loaded}
        model = loaded["model"]
        if not isinstance(model, dict) or not all(
            isinstance(v, torch.Tensor) for v in model.values()
        ):
            raise CheckpointError(
                f"cannot read {what} {filename}: its 'model' entry is not a state dict of tensors"
            )
        return loaded

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        if not self.strict or incompatible is None:
            return incompatible
        problems = []
        if incompatible.incorrect_shapes:
            shapes = ", ".join(
                f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                for k, a, b in incompatible.incorrect_shapes[:5]
            )
            problems.append(
                f"{len(incompatible.incorrect_shapes)} weights of another shape ({shapes})"
            )
        if incompatible.missing_keys:
            problems.append(
                f"{len(incompatible.missing_keys)} model weights missing "
                f"(e.g. {', '.join(incompatible.missing_keys[:5])})"
            )
        if incompatible.unexpected_keys:
            problems.append(
                f"{len(incompatible.unexpected_keys)} unknown weights "
                f"(e.g. {', '.join(incompatible.unexpected_keys[:5])})"
            )
        if problems:
            raise ValueError(
                f"checkpoint {self._loading_path!r} does not fit this model's architecture: "
                + "; ".join(problems)
                + ". Check that --config-file matches the config the checkpoint was trained with."
            )
        return incompatible
