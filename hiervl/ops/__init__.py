"""Multi-scale deformable attention (compiled CPU/CUDA kernels + PyTorch reference).

Importing this package never fails when the extension ``hiervl._C`` is missing: the op then
uses the reference and warns once. ``kernel_status()`` says which kernels are in use.
"""

from hiervl.ops._ext import compiled_available, kernel_status, reference_kernel
from hiervl.ops.ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn
from hiervl.ops.ms_deform_attn_ref import ms_deform_attn_reference

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "compiled_available",
    "kernel_status",
    "reference_kernel",
]
