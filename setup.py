"""Build script for the compiled MSDeformAttn op (``hiervl._C``).

The package metadata lives in pyproject.toml; this file only declares the C++/CUDA
extension. The CUDA kernel is compiled when ``FORCE_CUDA=1`` or when torch sees a
GPU and ``CUDA_HOME`` is set; otherwise only the CPU kernel is built.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("hiervl", "ops", "csrc")


def _extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if not sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA", "")
    with_cuda = force == "1" or (force != "0" and torch.cuda.is_available() and CUDA_HOME)
    extra = {"cxx": ["-O3", "-fopenmp"]}
    ext_cls, macros = CppExtension, []
    if with_cuda:
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but CUDA_HOME is not set; see INSTALL.md")
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        ext_cls, macros = CUDAExtension, [("WITH_CUDA", None)]
        extra["nvcc"] = ["-O3", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__"]
    ext = ext_cls(
        "hiervl._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
