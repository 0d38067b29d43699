"""Multi-scale deformable attention (compiled CPU/CUDA kernels + PyTorch reference)."""


def kernel_status() -> str:
    """One line saying which MSDeformAttn kernels are available."""
    try:
        from hiervl import _C  # noqa: F401
    except ImportError as e:
        return f"compiled op not available ({e}); using the PyTorch reference"
    return "compiled op available"
