"""Export a :class:`~hiervl.modeling.static_window.StaticWindow` to ONNX, with metadata.

Plain torch + onnx (no detectron2): ``hiervl.tools.export`` builds the model from a
config and calls :func:`export_onnx`; the tests call it on tiny modules directly.

Exporter: TorchScript tracing (``dynamo=False``) at opset 17 (GridSample needs 16,
LayerNormalization 17). It works on both pinned stacks (torch 2.3.1 has no other; torch
2.14 still ships it, deprecated). torch 2.14's default dynamo exporter (torch.export)
refuses the model: MSDeformAttn's interface carries the level shapes as a tensor
(Deformable-DETR's), and reading them back (``.tolist()``) is a data-dependent value
to torch.export. Tracing sees concrete values, which is right here: every size is fixed.

Shape letters: K classes, H×W the window.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import subprocess
import tempfile
import warnings
from typing import Iterator, Tuple

import numpy as np
import onnx
import torch

from hiervl.modeling.static_window import StaticWindow
from hiervl.ops import reference_kernel
from hiervl.tools.onnx_metadata import INPUT_NAME, OUTPUT_NAME, DeployMetadata

logger = logging.getLogger(__name__)

__all__ = ["OPSET", "export_onnx", "git_commit", "score_agreement"]

OPSET = 17


def git_commit(repo: str) -> str:
    """``git rev-parse HEAD`` of ``repo`` (+ "-dirty" with uncommitted changes to tracked
    files), or "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


@contextlib.contextmanager
def _traceable() -> Iterator[None]:
    """What tracing for ONNX needs, restored afterwards: MSDeformAttn on its reference,
    and nn.MultiheadAttention (open_clip's blocks) off its fused fast path, which has no
    ONNX symbolic (``aten::_native_multi_head_attention``)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with reference_kernel(), torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python int/bool read from a tensor; each one is a
            # size or a constant of this fixed-size graph, which is what we want.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(window: StaticWindow, path: str, metadata: DeployMetadata) -> None:
    """Trace ``window`` at its size (batch 1) into ``path`` with ``metadata`` attached.

    Input ``images`` (1, 3, H, W) float32 normalised; output ``scores`` (1, K, H, W).
    Written to a temporary file first, then renamed: a failed export leaves no file.
    """
    if tuple(metadata.input_size) != (window.height, window.width):
        raise ValueError(
            f"metadata input_size {list(metadata.input_size)} != window "
            f"{window.height}x{window.width}"
        )
    if list(metadata.class_names) != window.class_names:
        raise ValueError("metadata class_names differ from the model's vocabulary")
    images = torch.zeros(1, 3, window.height, window.width)
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # see the module docstring
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with _traceable():
            torch.onnx.export(
                window.eval(),
                (images,),
                tmp,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                do_constant_folding=True,
                **kwargs,
            )
        model = onnx.load(tmp)
        del model.metadata_props[:]
        for key, value in metadata.to_props().items():
            model.metadata_props.add(key=key, value=value)
        model.doc_string = (
            f"HierVL semantic segmentation, one {window.height}x{window.width} window, "
            f"{len(metadata.class_names)} classes; see hiervl/tools/onnx_metadata.py"
        )
        onnx.save(model, tmp)
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("wrote %s (%.1f MiB)", path, os.path.getsize(path) / 2**20)


def score_agreement(reference: np.ndarray, candidate: np.ndarray) -> Tuple[float, float]:
    """(max |Δscore|, fraction of pixels whose argmax class agrees) of (B,K,H,W) scores."""
    if reference.shape != candidate.shape:
        raise ValueError(f"score shapes differ: {reference.shape} vs {candidate.shape}")
    delta = float(np.abs(reference.astype(np.float64) - candidate).max())
    agree = float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean())
    return delta, agree
