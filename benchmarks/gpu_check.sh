#!/usr/bin/env bash
# One-shot validation on a GPU machine (H100/H200, torch preinstalled, no network): build the extension, run
# the GPU tests, then the benchmark harness and gpu_diag sections, most valuable first, each with its own limit.
# Usage: benchmarks/gpu_check.sh OUTDIR
#
# The device tool brings back at most 8 files from OUTDIR, so the work goes to a scratch folder and OUTDIR
# gets: phases.txt (every phase's exit code and time, written as it ends; rc 124 = stopped by its limit),
# results-page.md (benchmarks/record_results.py: the page to commit under benchmarks/results/),
# pytest_gpu.log, bench-attention.log, diag-mla.log and all.tar.gz (everything: env.txt, build.log,
# info.txt, every bench-SUITE.log and bench-SUITE/results.{json,md}, every diag-SECTION.log), refreshed
# after each phase so that a run cut short still brings back what it measured.
# Knobs: GPU_CHECK_PLAN="attention:110 diag-mla:60 lora:60" (harness suites, mfu-compiled = the mfu suite with
#   LLMKERN_BENCH_COMPILE=reduce-overhead, i.e. its steps under torch.compile(mode="reduce-overhead"): only mfu
#   reads that knob, so any other NAME-compiled phase is skipped; and diag-SECTION = benchmarks/gpu_diag.py
#   SECTION, each with its limit in seconds, in order; a name without ":N" gets 60), GPU_CHECK_TESTS=0 (skip
#   the pytest phases),
#   GPU_CHECK_BUILD=0 (use an llmkern/_C*.so built on the same image and carried into the checkout with the
#   device tool's `carry`, instead of building; the script does not bring the .so back itself), GPU_CHECK_WORK (the scratch folder; default a new one under /tmp).
# Phases start only before GPU_CHECK_DEADLINE seconds (default 540) and get what is left of it (skipped when
# under 15 s remain); the results page (30 s at most) and the kill grace of the last phase can add about 35 s:
# the script ends by about 575 s, under the device tool's 600 s per command.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # (absolute: the script changes directory below)
W=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$W" && W=$(cd "$W" && pwd)
cd "$(dirname "$0")/.."
t0=$(date +%s); deadline=${GPU_CHECK_DEADLINE:-540}
limit() {  # limit WANT: WANT seconds, or what is left before the deadline (1: no time left)
  local left=$(( deadline - ($(date +%s) - t0) - 5 ))
  if [ "$left" -lt 15 ]; then echo 1; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
phase() {  # phase TEXT: one line, on stdout and in OUTDIR/phases.txt (and the scratch copy the results page
  # reads: a phase stopped by its limit, rc=124, is marked partial there), with the time since the start
  echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/phases.txt" "$W/phases.txt"
}
snapshot() {  # OUTDIR's files from the scratch folder (the device tool brings back 8 at most)
  for f in pytest_gpu.log bench-attention.log diag-mla.log; do
    [ -f "$W/$f" ] && cp "$W/$f" "$OUT/$f"
  done
  tar -C "$W" -czf "$OUT/all.tar.gz" . 2>/dev/null
}
: > "$OUT/phases.txt"; : > "$W/phases.txt"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

cap=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
start=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} LLMKERN_CUDA=1
if [ "${GPU_CHECK_BUILD:-1}" = 0 ]; then  # no build: import the carried module from the checkout
  ls -l llmkern/_C*.so > "$W/build.log" 2>&1; rc=$?
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  timeout "$(limit 240)" python3 -m pip install --no-build-isolation --no-deps -e . > "$W/build.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then  # e.g. a read-only site-packages: build in place, import from the
    # checkout (not after a timeout: pip's objects are in a temporary folder, the second build would start over)
    echo "pip install rc=$rc; building in place" | tee -a "$W/build.log"
    timeout "$(limit 200)" python3 setup.py build_ext --inplace >> "$W/build.log" 2>&1
    rc=$?
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
echo "build rc=$rc in $(( $(date +%s) - start )) s" >> "$W/build.log"; phase "build rc=$rc"; tail -3 "$W/build.log"
timeout 60 python3 -m llmkern.info > "$W/info.txt" 2>&1; cat "$W/info.txt"
snapshot

# Correctness first, the C++ sampler before the Triton kernels (those compile on first use); fixed configs for
# the correctness run (autotuning every test shape would eat the budget). Both runs spread over 8 processes
# when pytest-xdist is there. SIGINT at the limit (then SIGKILL 10 s later) lets pytest print its summary of
# the failures so far; -rfE lists every failed test.
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
  to50=""; to120=""  # per-test limits only with pytest-timeout (an unknown --timeout would fail pytest at once)
  python3 -c "import pytest_timeout" 2>/dev/null && { to50="--timeout 50"; to120="--timeout 120"; }
  lim=$(limit 60)
  if [ "$lim" -gt 1 ]; then
    OMP_NUM_THREADS=2 timeout -s INT -k 10 "$lim" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider $xdist \
      $to50 tests/test_sampling_gpu.py > "$W/pytest_gpu.log" 2>&1
    phase "pytest -m gpu (sampling, ${xdist:-1 process}) rc=$?"; tail -5 "$W/pytest_gpu.log"
  else phase "pytest -m gpu (sampling) skipped: deadline"; fi
  lim=$(limit 120)
  if [ "$lim" -gt 1 ]; then
    LLMKERN_LORA_AUTOTUNE=0 LLMKERN_ATTN_AUTOTUNE=0 timeout -s INT -k 10 "$lim" python3 -m pytest -m gpu -q -rfE \
      -p no:cacheprovider $xdist $to120 --ignore=tests/test_sampling_gpu.py >> "$W/pytest_gpu.log" 2>&1
    phase "pytest -m gpu (the rest, ${xdist:-1 process}) rc=$?"; tail -15 "$W/pytest_gpu.log"
  else phase "pytest -m gpu (the rest) skipped: deadline"; fi
  snapshot
fi

# The harness, one suite at a time with its own limit (a slow suite cannot starve the others), and gpu_diag
# sections, in the order of what the open issues and benchmarks/NOTES-gpu.md most need measured. Every row is
# printed ("[row] ...") and written to bench-SUITE/results.{json,md} as soon as it is measured, so a suite
# stopped by its limit keeps what it measured. Autotuning is bounded: attention tries the first two candidates
# of each list, LoRA (its suite and the mfu LoRA step) its first, fixed config. "mfu-compiled" is the mfu suite
# under torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs: no host time per launch).
export LLMKERN_ATTN_TUNE_TOP=${LLMKERN_ATTN_TUNE_TOP:-2} TQDM_DISABLE=1
# (NOTES-gpu's first questions, the host time and the MLA tiles, early: at the 2026-11-26 timings the plan's
# phases start at about 210 s and the deadline cuts the tail)
plan="attention:90 diag-host:60 lora:50 diag-mla:50 mfu:70 sampling:30 generate:50 tp:40 mfu-compiled:120"
plan="$plan cross_entropy:30"
plan="$plan moe:60 norm:25 rope:20 swiglu:20"
for spec in ${GPU_CHECK_PLAN:-$plan}; do
  name=${spec%%:*}; want=${spec#"$name"}; want=${want#:}; lim=$(limit "${want:-60}")
  [ "$lim" -gt 1 ] || { phase "$name skipped: deadline"; continue; }
  case $name in
    diag-*)
      sec=${name#diag-}
      PYTHONUNBUFFERED=1 LLMKERN_LORA_AUTOTUNE=${LLMKERN_LORA_AUTOTUNE:-0} timeout -k 5 "$lim" \
        python3 benchmarks/gpu_diag.py "$sec" > "$W/$name.log" 2>&1
      phase "gpu_diag $sec rc=$? (limit ${lim} s)"; grep -E "ms/call|ms \(|Error" "$W/$name.log" | tail -30;;
    *)
      suite=${name%-compiled}
      if [ "$name" != "$suite" ] && [ "$suite" != mfu ]; then  # (LLMKERN_BENCH_COMPILE: read by the mfu suite only)
        phase "$name skipped: only mfu has a compiled mode"; continue
      fi
      tune=""; case $suite in lora|mfu) tune="LLMKERN_LORA_AUTOTUNE=${LLMKERN_LORA_AUTOTUNE:-0}";; esac
      [ "$name" = "$suite" ] || tune="$tune LLMKERN_BENCH_COMPILE=reduce-overhead"
      env $tune PYTHONUNBUFFERED=1 timeout -k 5 "$lim" python3 -m llmkern.bench.cli --suite "$suite" \
        --out "$W/bench-$name" > "$W/bench-$name.log" 2>&1
      phase "llmkern-bench --suite $name rc=$? (limit ${lim} s)"
      grep -E "^\[row\]|failed|Error|TMA kernels failed" "$W/bench-$name.log" | tail -30;;
  esac
  snapshot
done

# One page with everything measured above, ready to commit as benchmarks/results/<card>-<date>.md.
timeout 30 python3 benchmarks/record_results.py "$W" --print > "$OUT/results-page.md" 2>&1
phase "results page: $OUT/results-page.md (rc=$?); everything: $OUT/all.tar.gz (from $W)"
snapshot
