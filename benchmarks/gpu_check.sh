#!/usr/bin/env bash
# One-shot validation on a GPU machine (H100/H200, torch preinstalled, no network):
# build the extension, run the GPU tests, run the benchmark harness. Writes at most 8 files:
#   OUTDIR/{env.txt, build.log, info.txt, pytest_gpu.log, bench.log, bench/results.{json,md,png}}
# Usage: benchmarks/gpu_check.sh OUTDIR        (at most about 10 minutes; typically less)
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

cap=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
start=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} LLMKERN_CUDA=1
timeout 240 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then  # e.g. a read-only site-packages: build in place and import from the checkout
  echo "pip install rc=$rc; building in place" | tee -a "$OUT/build.log"
  timeout 200 python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
  rc=$?
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "build rc=$rc in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.log"
python3 -m llmkern.info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

# Correctness first, the C++ sampler before the Triton kernels (those compile on first use); fixed
# configs for the correctness run (autotuning every test shape would eat the budget).
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 50 tests/test_sampling_gpu.py \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu (sampling) rc=$?"; tail -5 "$OUT/pytest_gpu.log"
LLMKERN_LORA_AUTOTUNE=0 LLMKERN_ATTN_AUTOTUNE=0 timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider \
  --timeout 100 --ignore=tests/test_sampling_gpu.py >> "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu (the rest) rc=$?"; tail -15 "$OUT/pytest_gpu.log"

# The harness prints and writes each suite's results as soon as that suite is done.
PYTHONUNBUFFERED=1 timeout 150 python3 -m llmkern.bench.cli --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "llmkern-bench rc=$?"; tail -60 "$OUT/bench.log"
