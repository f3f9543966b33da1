#!/usr/bin/env bash
# Build glass_fast._C with its CUDA kernels in place on a GPU machine, then list the backends.
#   bash benchmarks/build_cuda.sh            (TORCH_CUDA_ARCH_LIST and MAX_JOBS may be overridden)
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
unset GLASS_FAST_NO_EXT GLASS_FAST_NO_CUDA
python -c "import torch; assert torch.version.cuda, 'this torch has no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python setup.py build_ext --inplace
python - <<'PY'
import torch
from glass_fast import ops
print("available backends:", ops.available_backends())
print("cuda kernels registered:",
      torch._C._dispatch_has_kernel_for_dispatch_key("glass_fast::fused_step", "CUDA"))
PY
