"""Loading of the compiled extension ``hiervl._C`` and reporting what it provides.

The extension is optional: when it is missing (not built, built against another torch, no
CUDA kernel for a GPU tensor) the op falls back to the PyTorch reference and says so once.
"""

import contextlib
import logging
import threading
from typing import Iterator, Optional, Set

import torch

logger = logging.getLogger(__name__)

_C = None
_LOAD_ERROR: Optional[str] = None
try:
    from hiervl import _C  # noqa: F811 - the compiled module replaces the None placeholder
except (ImportError, OSError) as e:  # OSError: a stale .so with unresolved libraries
    _LOAD_ERROR = f"{type(e).__name__}: {e}"

_warned: Set[str] = set()
_warn_lock = threading.Lock()
# Depth of nested ``reference_kernel()`` blocks (any thread: export and benchmarks are
# single-threaded, and a count keeps nesting right).
_reference_depth = 0


def compiled_module():
    """The loaded ``hiervl._C`` module, or None."""
    return _C


def compiled_available(device: Optional[torch.device] = None) -> bool:
    """Whether a compiled kernel exists for ``device`` (default: the CPU kernel).

    Args:
        device: a torch.device, a device string, or None for the CPU.
    """
    if _C is None:
        return False
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.with_cuda())
    return False


@contextlib.contextmanager
def reference_kernel() -> Iterator[None]:
    """Run MSDeformAttn on its PyTorch reference inside this block, kernel or not.

    For ONNX export (a traced graph cannot hold the compiled kernel; the reference is
    ``grid_sample``, which ONNX has) and for benchmarks comparing the two; no warning.
    """
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1


def reference_forced() -> bool:
    """Whether MSDeformAttn must use its reference now: inside :func:`reference_kernel`,
    or while torch traces or exports (the compiled kernel is no traceable op)."""
    if _reference_depth > 0 or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    # torch.export (the dynamo ONNX exporter of recent torch); absent on torch 2.3.
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def kernel_status() -> str:
    """One line saying which MSDeformAttn kernels are available, for logs and INSTALL.md."""
    if _C is None:
        return (
            f"hiervl._C not available ({_LOAD_ERROR}); MSDeformAttn uses the PyTorch "
            "reference. Build it with `make setup` or `pip install -e . --no-build-isolation`."
        )
    kernels = ["cpu"]
    if _C.with_cuda():
        kernels.append(f"cuda (compiled with CUDA {_C.cuda_version()})")
    gpu = "a GPU is visible" if torch.cuda.is_available() else "no GPU visible"
    return f"hiervl._C compiled kernels: {', '.join(kernels)}; torch {torch.__version__}, {gpu}"


def warn_fallback_once(device: torch.device) -> None:
    """Warn (once per device type) that the reference replaces a missing kernel."""
    with _warn_lock:
        if device.type in _warned:
            return
        _warned.add(device.type)
    if _C is None:
        reason = f"hiervl._C could not be imported ({_LOAD_ERROR})"
    else:
        reason = f"hiervl._C has no {device.type} kernel"
    message = (
        f"MSDeformAttn: {reason}; using the slower PyTorch reference on {device.type}. "
        "See INSTALL.md ('op not built')."
    )
    logger.warning(message)
