#!/usr/bin/env bash
# Build glass_fast._C with its CUDA kernels in place on a GPU machine, then list the backends.
#   bash benchmarks/build_cuda.sh            (TORCH_CUDA_ARCH_LIST and MAX_JOBS may be overridden)
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
unset GLASS_FAST_NO_EXT GLASS_FAST_NO_CUDA
PY="${PYTHON:-python3}"
mkdir -p build
"$PY" -c "import torch; assert torch.version.cuda, 'this torch has no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# Builds glass_fast._C in place (glass_fast.kernels then loads from kernels/ of the checkout; after
# `pip install --no-build-isolation -e .` it is installed). A failed optional build only warns, so
# the log is kept and shown when the CUDA kernels are missing.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" setup.py build_ext --inplace > build/build_cuda.log 2>&1 || true
tail -n 3 build/build_cuda.log
{ "$PY" - <<'PY'
import torch
from glass_fast import ops
print("available backends:", ops.available_backends())
ok = torch._C._dispatch_has_kernel_for_dispatch_key("glass_fast::fused_step", "CUDA")
print("cuda kernels registered:", ok)
raise SystemExit(0 if ok else 1)
PY
} || { grep -n -i -E "error|failed" build/build_cuda.log | head -n 60; exit 1; }
