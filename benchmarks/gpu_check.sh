#!/usr/bin/env bash
# One-shot validation on a GPU machine (H100/H200, torch preinstalled, no network):
# build the extension, run the GPU tests, run the benchmark harness suite by suite. Writes
#   OUTDIR/{env.txt, build.log, info.txt, pytest_gpu.log, bench-SUITE.log, bench-SUITE/results.*,
#   results-page.md (benchmarks/record_results.py: the page to commit under benchmarks/results/)}
# Usage: benchmarks/gpu_check.sh OUTDIR
# Knobs: GPU_CHECK_SUITES="sampling:45 attention:110" (suites and their limits in seconds; NAME-compiled
#   runs suite NAME under torch.compile(mode="reduce-overhead")),
#   GPU_CHECK_TESTS=0 (skip the pytest phases), GPU_CHECK_BUILD=0 (use an llmkern/_C*.so carried in
#   from an earlier run of this script on the same image instead of building), GPU_CHECK_DIAG="host:110"
#   (benchmarks/gpu_diag.py sections run before the harness, with their limits; "" for none).
# Every phase has its own limit and the whole script stops by GPU_CHECK_DEADLINE seconds (default
# 540, under the device tool's 600 s per command): later phases get what is left.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
t0=$(date +%s); deadline=${GPU_CHECK_DEADLINE:-540}
limit() {  # limit WANT: WANT seconds, or what is left before the deadline (1: no time left)
  local left=$(( deadline - ($(date +%s) - t0) - 5 ))
  if [ "$left" -lt 15 ]; then echo 1; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

cap=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
start=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} LLMKERN_CUDA=1
if [ "${GPU_CHECK_BUILD:-1}" = 0 ]; then  # no build: import the carried module from the checkout
  ls -l llmkern/_C*.so > "$OUT/build.log" 2>&1; rc=$?
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  timeout "$(limit 240)" python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then  # e.g. a read-only site-packages: build in place and import from the checkout
    echo "pip install rc=$rc; building in place" | tee -a "$OUT/build.log"
    timeout "$(limit 200)" python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
    rc=$?
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"; tail -3 "$OUT/build.log"
timeout 60 python3 -m llmkern.info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

# Correctness first, the C++ sampler before the Triton kernels (those compile on first use); fixed
# configs for the correctness run (autotuning every test shape would eat the budget). Both test runs
# spread over 8 processes when pytest-xdist is there: about 300 sampler cases (CPU references on
# 128k-wide rows), and some fifty Triton kernel variants to compile.
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
OMP_NUM_THREADS=2 timeout "$(limit 60)" python3 -m pytest -m gpu -q -p no:cacheprovider $xdist --timeout 50 \
  tests/test_sampling_gpu.py \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu (sampling, ${xdist:-1 process}) rc=$?"; tail -5 "$OUT/pytest_gpu.log"
LLMKERN_LORA_AUTOTUNE=0 LLMKERN_ATTN_AUTOTUNE=0 timeout "$(limit 150)" python3 -m pytest -m gpu -q -p no:cacheprovider $xdist \
  --timeout 120 --ignore=tests/test_sampling_gpu.py >> "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu (the rest, ${xdist:-1 process}) rc=$?"; tail -15 "$OUT/pytest_gpu.log"
fi

# Host time against device time per call (launch front on/off, TMA on/off, the small-LoRA dispatch):
# the eager rows below are bound by it. GPU_CHECK_DIAG="" skips it.
for sec in ${GPU_CHECK_DIAG-host:110}; do
  name=${sec%%:*}; lim=$(limit "${sec##*:}")
  [ "$lim" -gt 1 ] || { echo "gpu_diag $name skipped: deadline"; continue; }
  PYTHONUNBUFFERED=1 LLMKERN_LORA_AUTOTUNE=${LLMKERN_LORA_AUTOTUNE:-0} timeout -k 5 "$lim" \
    python3 benchmarks/gpu_diag.py "$name" > "$OUT/diag-$name.log" 2>&1
  echo "gpu_diag $name rc=$? (limit ${lim} s)"; grep -E "ms/call|Error" "$OUT/diag-$name.log" | tail -30
done

# The harness, one suite at a time with its own time limit (a slow suite cannot starve the
# others), fastest and most finished first. Every row is printed ("[row] ...") and written to
# bench-SUITE/results.{json,md} as soon as it is measured, so a suite stopped by its limit keeps
# what it measured. Autotuning is bounded: attention tries the first two candidates of each list,
# LoRA (its suite and the mfu LoRA step) its first, fixed config; each candidate costs a compile of seconds.
export LLMKERN_ATTN_TUNE_TOP=${LLMKERN_ATTN_TUNE_TOP:-2} TQDM_DISABLE=1
# "mfu-compiled" is the mfu suite again with both backends under torch.compile(mode="reduce-overhead")
# (Inductor + CUDA graphs: no host time per launch), written to bench-mfu-compiled.
for spec in ${GPU_CHECK_SUITES:-sampling:45 cross_entropy:30 attention:110 lora:70 mfu:70 tp:40 mfu-compiled:150 norm:25 rope:20 swiglu:20 moe:60}; do
  name=${spec%%:*}; suite=${name%-compiled}; lim=$(limit "${spec##*:}")
  [ "$lim" -gt 1 ] || { echo "llmkern-bench --suite $name skipped: deadline"; continue; }
  tune=""; case $suite in lora|mfu) tune="LLMKERN_LORA_AUTOTUNE=${LLMKERN_LORA_AUTOTUNE:-0}";; esac
  [ "$name" = "$suite" ] || tune="$tune LLMKERN_BENCH_COMPILE=reduce-overhead"
  env $tune PYTHONUNBUFFERED=1 timeout -k 5 "$lim" python3 -m llmkern.bench.cli --suite "$suite" \
    --out "$OUT/bench-$name" > "$OUT/bench-$name.log" 2>&1
  echo "llmkern-bench --suite $name rc=$? (limit ${lim} s)"
  grep -E "^\[row\]|failed|Error|TMA kernels failed" "$OUT/bench-$name.log" | tail -30
done

# One page with everything measured above, ready to commit as benchmarks/results/<card>-<date>.md.
timeout 30 python3 benchmarks/record_results.py "$OUT" --print > "$OUT/results-page.md" 2>&1
echo "results page: $OUT/results-page.md (rc=$?)"
