"""Build script for the compiled MSDeformAttn op (``hiervl._C``).

The package metadata lives in pyproject.toml; this file only declares the C++/CUDA
extension. The CUDA kernel is compiled when ``FORCE_CUDA=1`` or when torch sees a
GPU and ``CUDA_HOME`` is set; ``FORCE_CUDA=0`` builds the CPU kernel only. The target GPU
architectures come from ``TORCH_CUDA_ARCH_LIST`` (read by torch; e.g. "8.0;8.6;9.0").
See INSTALL.md.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("hiervl", "ops", "csrc")


def _openmp_flags():
    """(compile, link) flags for OpenMP, which at::parallel_for needs to run in parallel.

    Apple clang has no -fopenmp: there the CPU kernel builds single-threaded.
    """
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _check_cuda_home(cuda_home):
    if cuda_home is None:
        raise RuntimeError(
            "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit "
            "directory (the one holding bin/nvcc, e.g. /usr/local/cuda); see INSTALL.md"
        )
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc) and not os.path.exists(nvcc + ".exe"):
        raise RuntimeError(
            f"CUDA_HOME={cuda_home} has no bin/nvcc: set CUDA_HOME to the CUDA toolkit "
            "directory (e.g. /usr/local/cuda); see INSTALL.md"
        )
    # torch links against CUDA_HOME/lib64 (or lib): without CUDA_HOME it may guess /usr/local,
    # which can hold an nvcc symlink but no libcudart, and the link step fails much later.
    if sys.platform != "win32":
        runtimes = glob.glob(os.path.join(cuda_home, "lib64", "libcudart*"))
        runtimes += glob.glob(os.path.join(cuda_home, "lib", "libcudart*"))
        if not runtimes:
            raise RuntimeError(
                f"CUDA_HOME={cuda_home} has no lib64/libcudart*: set CUDA_HOME to the CUDA "
                "toolkit directory (e.g. /usr/local/cuda); see INSTALL.md"
            )


def _check_arch_list(torch):
    # Without a visible GPU torch cannot pick the architectures itself (and fails with an
    # IndexError deep inside cpp_extension).
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        raise RuntimeError(
            "FORCE_CUDA=1 without a visible GPU: set TORCH_CUDA_ARCH_LIST to the GPUs you "
            'target, e.g. TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"; see INSTALL.md'
        )


def _extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if not sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA", "")
    with_cuda = force == "1" or (force != "0" and torch.cuda.is_available() and CUDA_HOME)
    omp_compile, omp_link = _openmp_flags()
    optimise = ["/O2"] if sys.platform == "win32" else ["-O3"]
    extra = {"cxx": optimise + omp_compile}
    ext_cls, macros = CppExtension, []
    if with_cuda:
        _check_cuda_home(CUDA_HOME)
        _check_arch_list(torch)
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        ext_cls, macros = CUDAExtension, [("WITH_CUDA", None)]
        extra["nvcc"] = ["-O3", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__"]
    ext = ext_cls(
        "hiervl._C",
        sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=omp_link,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
