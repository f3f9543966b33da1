#!/usr/bin/env bash
# One GPU check: build the CUDA extension, run the GPU tests, print the timing tables.
# Usage on a CUDA machine, from the repository root:  bash benchmarks/gpu_check.sh [LOG_DIR]
# Optional wheels in .whl/ (e.g. diffusers) are installed into /tmp/site first.
set -uo pipefail
LOG_DIR="${1:-${OUT:-/tmp}}"
export PYTHONUNBUFFERED=1
PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
step() { echo; echo "=== $1 ($(date +%T))"; }

step "build"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
# In-place build (no editable install needed): the package is used from the tree, with kernels/ visible as
# glass_fast.kernels through a link, as the installed package_dir mapping does.
timeout 200 $PY setup.py build_ext --inplace > "$LOG_DIR/build.log" 2>&1 || tail -30 "$LOG_DIR/build.log"
grep -E "^glass_fast:|error" "$LOG_DIR/build.log" | head -5
[ -e glass_fast/kernels ] || ln -s ../kernels glass_fast/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, glass_fast.ops as o; print('torch', torch.__version__, 'backends', o.available_backends())"

step "GPU tests"
timeout 200 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_ops.py tests/test_ops_particles.py \
  tests/test_ops_backend.py tests/test_capture.py 2>&1 | tail -12
timeout 120 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_review_ops.py \
  tests/test_review_capture.py::test_cuda_graph_with_shared_and_per_sample_rows_in_one_grid_equals_eager \
  tests/test_review_best_of_n.py::test_cuda_timings_need_asking_and_the_reward_must_stay_on_the_device 2>&1 | tail -8

step "op bandwidth"
[ -f benchmarks/gpu_ops.py ] && timeout 100 $PY benchmarks/gpu_ops.py --json "$LOG_DIR/gpu_ops.json"

step "sampler overhead"
timeout 100 $PY benchmarks/gpu_capture.py

# Diagnostics last: the measurements above come first if the machine's time runs short.
step "launch-configuration sweep"
timeout 150 $PY benchmarks/gpu_launch_sweep.py 2>&1 | grep -v -i warn

if [ "${GPU_CHECK_DIFFUSERS:-0}" = 1 ]; then
  step "diffusers"
  timeout 90 $PY benchmarks/gpu_diffusers.py
fi
echo; echo "=== done ($(date +%T))"
