"""Build and install glass_fast.

    pip install --no-build-isolation -e ".[dev]"

The compiled extension ``glass_fast._C`` is optional: every op has a plain-PyTorch reference, so a
missing or failed build only narrows the set of backends (see ``glass_fast.ops.available_backends``).

Environment variables read here:
    GLASS_FAST_NO_EXT=1     skip the C++/CUDA extension entirely (pure-Python install).
    GLASS_FAST_NO_CUDA=1    build only the CPU parts even where CUDA is available.
    GLASS_FAST_NO_AVX2=1    build the CPU kernels without AVX2 even where the build host has it.
    MAX_JOBS=N              parallel compile jobs (ninja), honoured by torch.utils.cpp_extension.
    TORCH_CUDA_ARCH_LIST    CUDA architectures to build for, e.g. "9.0" (needed where no GPU is visible,
                            else the CUDA parts are skipped).
"""
from __future__ import annotations

import glob
import os
import platform
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    # setuptools wants source paths relative to setup.py.
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _cpu_vector_flags() -> list[str]:
    """Compiler flags that let at::vec::Vectorized use AVX2 in the CPU kernels.

    The extension is built from source on the machine that runs it, so it uses AVX2/FMA/F16C when
    this x86-64 build host has them (GLASS_FAST_NO_AVX2=1 opts out, e.g. to build for older CPUs).
    Without them at::vec falls back to its generic (compiler auto-vectorised) implementation.
    """
    if os.name == "nt" or _flag("GLASS_FAST_NO_AVX2"):
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if not {"avx2", "fma", "f16c"} <= set(flags):
        return []
    # CPU_CAPABILITY names the inline namespace of at::vec (as in PyTorch's own AVX2 kernels).
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _extensions():
    """(ext_modules, cmdclass) for the optional extension, or ([], {}) when it is skipped."""
    if _flag("GLASS_FAST_NO_EXT"):
        print("glass_fast: GLASS_FAST_NO_EXT=1, skipping the C++/CUDA extension.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("glass_fast: torch is not importable at build time, skipping the C++/CUDA extension "
              "(install torch first and use pip install --no-build-isolation).")
        return [], {}

    cpu_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp"))
                       + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    cuda_home = cpp_extension.CUDA_HOME
    # Without a visible device the CUDA architectures must be named (torch cannot pick them).
    arch_known = bool(os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()) or torch.cuda.device_count() > 0
    with_cuda = (torch.version.cuda is not None and cuda_home is not None and os.path.isdir(cuda_home)
                 and arch_known and not _flag("GLASS_FAST_NO_CUDA"))
    if not with_cuda:
        why = ("GLASS_FAST_NO_CUDA=1" if _flag("GLASS_FAST_NO_CUDA") else
               "torch has no CUDA (torch.version.cuda is None)" if torch.version.cuda is None else
               "CUDA_HOME not found" if cuda_home is None or not os.path.isdir(cuda_home) else
               "no CUDA device is visible and TORCH_CUDA_ARCH_LIST is unset (set it, e.g. to \"9.0\", to build "
               "the CUDA kernels for a device)")
        print(f"glass_fast: {why}; CUDA parts skipped, building the CPU extension only.")

    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20).
    cxx = (["-O3"] if os.name != "nt" else ["/O2"]) + _cpu_vector_flags()
    link = []
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        # at::parallel_for expands to `#pragma omp parallel` in *our* code: without -fopenmp the
        # CPU kernels would silently run on one thread. libgomp.so.1 is the one torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = [("GLASS_FAST_WITH_CUDA", "1")] if with_cuda else []
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        # No --use_fast_math: resampling must round exp/log like the reference does.
        nvcc = ["-O3", "--expt-relaxed-constexpr",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = cpp_extension.CUDAExtension(
            "glass_fast._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension(
            "glass_fast._C", cpu_sources, include_dirs=include_dirs,
            define_macros=define_macros, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the extension with ninja; on failure warn and keep the pure-Python install."""

        failed: set = set()

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure is optional
                self.failed.add(extension.name)
                msg = (f"glass_fast: building {extension.name} failed ({type(exc).__name__}: {exc}); "
                       "installing without it, the reference backend stays available.")
                warnings.warn(msg)
                print(msg, file=sys.stderr)

        def _built_only(self, method, *args):
            # Later steps (in-place copy, output lists of wheels) must not look for a failed build.
            every = self.extensions
            self.extensions = [e for e in every if e.name not in self.failed]
            try:
                return method(*args)
            finally:
                self.extensions = every

        def copy_extensions_to_source(self):
            return self._built_only(super().copy_extensions_to_source)

        def get_outputs(self):
            return self._built_only(super().get_outputs)

        def get_output_mapping(self):
            return self._built_only(super().get_output_mapping)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="glass_fast",
    version="0.1.0",
    description="GLASS Flows transitions, ODE/SDE samplers and Feynman-Kac steering for flow models, "
                "with fused per-element kernels.",
    python_requires=">=3.10",
    packages=find_packages(include=["glass_fast", "glass_fast.*"]) + ["glass_fast.kernels"],
    package_dir={"glass_fast.kernels": "kernels"},
    package_data={"glass_fast": ["zoo/weights/*.safetensors"]},
    include_package_data=False,
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "matplotlib"],
    extras_require={
        "diffusers": ["diffusers>=0.30", "transformers>=4.40"],  # the pipeline classes import transformers
        "dev": ["pytest", "pytest-benchmark", "scipy", "ninja", "scikit-learn"],
    },
    entry_points={"console_scripts": ["glass-fast = glass_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
