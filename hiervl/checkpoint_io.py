"""The one checkpoint reader: weights and resume state, never code (plain PyTorch).

Every checkpoint HierVL opens (``MODEL.WEIGHTS``, ``--resume`` state, a local
``MODEL.HIERVL.CLIP.PRETRAINED`` file, the demo's and the quickstart's weights) goes through
:func:`read_checkpoint`. It tells the format from the file's first bytes, not its name:

* a PyTorch file (zip, or the legacy pickle format): ``torch.load(weights_only=True)``,
  which rebuilds only tensors, plain containers (dict, list, tuple), strings and numbers;
  any other pickled object (a ``__reduce__`` payload, a numpy array, a custom class) is
  refused, naming it;
* a ``.safetensors`` file: a flat dict of tensors (the format holds nothing else);
* everything else is refused with the reason: a plain Python pickle (detectron2/Caffe2
  model-zoo ``.pkl`` backbones: unpickling them can run code), a TorchScript archive (it
  holds code), a zip of something else, an empty, truncated or text file, a folder.

Every refusal is a :class:`CheckpointError` (``ValueError``) whose one-line message names
the file. What HierVL writes must be readable by this reader: :func:`check_plain` finds the
first entry of an object that ``weights_only`` would refuse (the checkpointer runs it
before every save).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import stat
import zipfile
from collections import OrderedDict
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "SAFETENSORS_MAGIC_LIMIT",
    "check_checkpoint_file",
    "check_plain",
    "read_checkpoint",
]

# safetensors files start with the header length (u64, little-endian), then "{".
SAFETENSORS_MAGIC_LIMIT = 100_000_000  # the format's own bound on the header length
_HEAD_BYTES = 64
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# torch.save's legacy (non-zip) format starts with its magic number pickled; the protocol
# is torch.save's argument (2 by default).
_LEGACY_HEADS = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)[:-1] for p in range(2, 6)
)
_WEIGHTS_ONLY_PREFIX = "WeightsUnpickler error: "
# The refused global in torch's message ("Unsupported class posix.system" on torch 2.3,
# "Unsupported global: GLOBAL posix.system was not ..." later).
_REFUSED_GLOBAL = re.compile(r"Unsupported (?:class|global: GLOBAL)\s+([\w.]+)")
_HELP = "see INSTALL.md, 'What HierVL loads'"
_PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint file HierVL refuses to read (the message names the file and why)."""


def _fail(what: str, path: str, reason: str) -> CheckpointError:
    return CheckpointError(f"cannot read {what} {path}: {reason}")


def check_checkpoint_file(path: str, what: str = "checkpoint") -> int:
    """The size of ``path``; CheckpointError unless it is a non-empty regular file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _fail(what, path, "no such file") from None
    except OSError as e:
        reason = "a symbolic link loop" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise _fail(what, path, reason) from None
    if stat.S_ISDIR(info.st_mode):
        raise _fail(what, path, "it is a folder, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(what, path, "not a regular file")
    if info.st_size == 0:
        raise _fail(what, path, "the file is empty (0 bytes: an interrupted download or save?)")
    return info.st_size


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


def read_checkpoint(path: str, *, what: str = "checkpoint") -> Any:
    """Read a checkpoint without running any code from it.

    Args:
        path: a local file.
        what: how the file is named in errors ("checkpoint", "CLIP checkpoint", ...).
    Returns:
        What the file holds: for PyTorch files the saved object (tensors on the CPU), for
        safetensors files a ``{name: tensor}`` dict.
    Raises:
        CheckpointError: see the module docstring; the message names ``path``.
    """
    size = check_checkpoint_file(path, what)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith(_ZIP_MAGICS):
        _check_torch_zip(path, what)
        return _torch_load(path, what)
    if head.startswith(_LEGACY_HEADS):
        return _torch_load(path, what)
    header_length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if head[8:9] == b"{" and 0 < header_length < SAFETENSORS_MAGIC_LIMIT:
        if header_length > size - 8:
            raise _fail(what, path, "truncated safetensors file (an interrupted download?)")
        return _safetensors_load(path, what)
    if head[:1] == b"\x80":
        raise _fail(
            what,
            path,
            "a Python pickle, not a PyTorch or safetensors checkpoint; unpickling can run "
            "arbitrary code, so HierVL does not read pickles (detectron2/Caffe2 model-zoo "
            f".pkl backbones are such files; {_HELP})",
        )
    if _looks_like_text(head):
        start = head.decode("utf-8", errors="replace").splitlines()[0][:40]
        raise _fail(what, path, f"a text file, not a checkpoint (it starts with {start!r})")
    raise _fail(
        what, path, f"not a PyTorch (.pth) or safetensors checkpoint (it starts with {head[:8]!r})"
    )


def _check_torch_zip(path: str, what: str) -> None:
    """Refuse zips that are not PyTorch checkpoints before torch opens them: torch.load hands
    TorchScript archives to torch.jit.load even with weights_only=True (torch 2.3)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _fail(
            what, path, f"truncated or corrupt (an interrupted download or save?): {e}"
        ) from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise _fail(
            what,
            path,
            "a TorchScript archive, which holds code; HierVL loads only weights: save its "
            f"state_dict() as a .pth or .safetensors file first ({_HELP})",
        )
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise _fail(what, path, f"a zip archive, not a PyTorch checkpoint (it holds {shown})")


def _torch_load(path: str, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if _WEIGHTS_ONLY_PREFIX in message:
            match = _REFUSED_GLOBAL.search(message)
            rest = message.split(_WEIGHTS_ONLY_PREFIX, 1)[1]
            detail = match.group(1).rstrip(".") if match else rest.splitlines()[0][:120]
            raise _fail(
                what,
                path,
                f"it holds a pickled Python object ({detail}) that is not a tensor or plain "
                "container; such objects can run code when loaded, so HierVL refuses the "
                f"file ({_HELP})",
            ) from None
        raise _fail(what, path, f"corrupt pickle data ({message})") from None
    except Exception as e:
        # A damaged file fails in many ways (RuntimeError from the zip reader, EOFError,
        # KeyError, ...); none of them names the file.
        detail = " ".join(str(e).split())[:200]
        raise _fail(what, path, f"truncated or corrupt ({type(e).__name__}: {detail})") from None


def _safetensors_load(path: str, what: str) -> Any:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise _fail(what, path, "a safetensors file, but safetensors is not installed") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError and the errors of a damaged header
        detail = " ".join(str(e).split())[:200]
        raise _fail(what, path, f"truncated or corrupt safetensors file ({detail})") from None


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of ``obj`` that is not a tensor, a plain
    container (dict, list, tuple) with plain keys, a string, a number, a bool or None.

    ``torch.load(weights_only=True)`` rebuilds exactly these; anything else (numpy arrays,
    RNG state objects, dtypes, custom classes) makes a checkpoint :func:`read_checkpoint`
    refuses, so it must be converted (e.g. ``torch.as_tensor``) before saving.
    """
    stack = [(where, obj)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor) or type(value) in _PLAIN_SCALARS:
            continue
        if type(value) in (list, tuple, torch.Size):
            stack += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif type(value) in (dict, OrderedDict):
            for key, v in value.items():
                if type(key) not in _PLAIN_SCALARS:
                    raise TypeError(f"{name} has a key of type {type(key).__name__}: {key!r}")
                stack.append((f"{name}.{key}", v))
        else:
            raise TypeError(
                f"{name} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints "
                "hold only tensors, dicts, lists, tuples, strings and numbers (convert it in "
                "its state_dict, e.g. with torch.as_tensor)"
            )
