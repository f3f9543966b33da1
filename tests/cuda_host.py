"""The CUDA kernels of csrc/cuda/kernels.cuh, run on the CPU.

tests/cpp/cuda_host/kernels_on_host.cpp compiles the kernels' own source for the host against a small
stand-in for the CUDA runtime (tests/cpp/cuda_host/cuda_host.h) and launches them with the grids of
csrc/cuda/launch.h, as ops.cu does. The wrappers here take CPU tensors and do what ops.cu's host code
does around each launch (contiguous inputs, coefficients in the accumulator's dtype), so the tests can
hold the device code to the reference on machines without a GPU. What this cannot show: the device
compiler's code generation and fast-math choices, memory-model effects across concurrent blocks, and
the launches themselves (streams, the grid's hardware limits).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_DIR = os.path.join(ROOT, "tests", "cpp", "cuda_host")
SOURCES = [os.path.join(HOST_DIR, name) for name in ("kernels_on_host.cpp", "cuda_host.h", "cuda_fp16.h",
                                                     "cuda_bf16.h")]
SOURCES += [os.path.join(ROOT, "csrc", "cuda", name) for name in ("kernels.cuh", "launch.h")]
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SCHEME_CODES = {"multinomial": 0, "stratified": 1, "systematic": 2, "residual": 3}


def compiler() -> str | None:
    """The host C++ compiler ($CXX, else g++ or c++ on PATH), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(out_dir: str) -> "HostKernels":
    """Compile the host build of the kernels into ``out_dir`` (reused while the sources are unchanged)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in SOURCES)).hexdigest()[:16]
    lib = os.path.join(out_dir, f"glass_fast_cuda_host_{digest}.so")
    if not os.path.exists(lib):
        cmd = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
               "-Wno-unknown-pragmas", f"-I{HOST_DIR}", f"-I{os.path.join(ROOT, 'csrc')}", SOURCES[0],
               "-o", lib + ".tmp"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the host kernels failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.replace(lib + ".tmp", lib)
    return HostKernels(ctypes.CDLL(lib))


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class HostKernels:
    """The four ops of ops.cu on CPU tensors, through the host build of the CUDA kernels."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        i64, u32, vp = ctypes.c_int64, ctypes.c_uint, ctypes.c_void_p
        lib.gf_host_fused_step.argtypes = [ctypes.c_int, ctypes.c_int] + [vp] * 7 + [i64, i64, u32]
        lib.gf_host_normalize_log_weights.argtypes = [ctypes.c_int, vp, vp, vp, i64, i64]
        lib.gf_host_resample_indices.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, vp, i64, i64, ctypes.c_int]
        lib.gf_host_gather.argtypes = [vp, vp, vp, i64, i64, i64, u32]

    def fused_step_into(self, base, out, coef, x_t, stage, new, y, grid: int = 0) -> int:
        """ops.cu ``fused_step_into``: writes ``new`` and ``y`` (contiguous, base's shape) and returns
        the elements per vector access the launcher chose (4 or 1). ``grid`` > 0 sets the block count."""
        assert new.is_contiguous() and y.is_contiguous() and new.shape == base.shape == y.shape
        if base.numel() == 0:
            return 0
        acc = torch.float64 if base.dtype == torch.float64 else torch.float32
        c = coef.to(acc).contiguous()
        rows = c.shape[0] if c.dim() == 2 else 1
        b, o = base.contiguous(), out.contiguous()
        xt = None if x_t is None else x_t.contiguous()
        st = None if stage is None else stage.contiguous()
        used = self.lib.gf_host_fused_step(DTYPE_CODES[base.dtype], DTYPE_CODES[out.dtype], _ptr(b), _ptr(o),
                                           _ptr(xt), _ptr(st), _ptr(c), _ptr(new), _ptr(y), base.numel(),
                                           rows, grid)
        assert used in (1, 4), used
        return used

    def fused_step(self, base, out, coef, x_t=None, stage=None, grid: int = 0):
        """The reference ``fused_step`` signature: (new in base's dtype, y_next in out's dtype)."""
        new = torch.empty(base.shape, dtype=base.dtype)
        y = torch.empty(base.shape, dtype=out.dtype)
        self.fused_step_into(base, out, coef, x_t, stage, new, y, grid)
        return new, y

    def normalize_log_weights(self, log_w):
        lw = log_w.contiguous()
        norm, ess = torch.empty_like(lw), torch.empty(lw.shape[0], dtype=lw.dtype)
        rc = self.lib.gf_host_normalize_log_weights(DTYPE_CODES[lw.dtype], _ptr(lw), _ptr(norm), _ptr(ess),
                                                    lw.shape[0], lw.shape[1])
        assert rc == 0, rc
        return norm, ess

    def resample_indices(self, log_w, uniforms, scheme: str):
        lw, u = log_w.contiguous(), uniforms.contiguous()
        anc = torch.empty(lw.shape, dtype=torch.int64)
        rc = self.lib.gf_host_resample_indices(DTYPE_CODES[lw.dtype], DTYPE_CODES[u.dtype], _ptr(lw), _ptr(u),
                                               _ptr(anc), lw.shape[0], lw.shape[1], SCHEME_CODES[scheme])
        assert rc == 0, rc
        return anc

    def gather_into(self, x, idx, res, grid: int = 0) -> int:
        """ops.cu ``gather_into``: res[b, k] = x[b, idx[b, k]]; returns the bytes per unit moved."""
        assert res.is_contiguous() and res.shape == x.shape and res.dtype == x.dtype
        xc, ic = x.contiguous(), idx.contiguous()
        b, k = x.shape[:2]
        row_bytes = (x.numel() // max(b * k, 1)) * x.element_size()
        return self.lib.gf_host_gather(_ptr(xc), _ptr(ic), _ptr(res), b, k, row_bytes, grid)

    def gather_particles(self, x, idx, grid: int = 0):
        res = torch.empty(x.shape, dtype=x.dtype)
        self.gather_into(x, idx, res, grid)
        return res
