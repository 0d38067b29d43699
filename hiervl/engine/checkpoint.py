"""Checkpointing: atomic writes and strict, clearly-reported loading.

detectron2's checkpointer writes files in place (a crash mid-write leaves a truncated
``model_XXXX.pth`` that ``last_checkpoint`` may point to) and only *logs* weights that
do not fit the model. HierVL writes to a temporary file in the same folder and renames
it, and refuses to continue from a checkpoint built for another architecture.
"""

import os
import tempfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write a small text file atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def load(self, path: str, *args, **kwargs):
        if path and not os.path.isfile(path) and "://" not in path:
            raise ValueError(f"checkpoint not found: MODEL.WEIGHTS / resume path {path!r}")
        self._loading_path = path
        return super().load(path, *args, **kwargs)

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
