"""`llmkern-bench`: run the registered benchmark suites and report speed against baselines.

  llmkern-bench                    every suite, quick mode, on the best device found
  llmkern-bench --suite sampling   one suite (repeatable); --full for the complete sweep
  llmkern-bench --list             the suites
Writes results.json, results.md and (with matplotlib: the bench extra) results.png to --out (default
./bench-out).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from llmkern.bench.registry import Context, load_all
from llmkern.bench.report import RATIO_LEGEND, failed_lines, format_table, write_outputs


def _progress(iterable, desc="", total=None):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


def _row_line(r):
    base = f"{r.baseline} {r.baseline_ms:.3f} ms" if r.baseline_ms is not None else "no baseline"
    return f"{r.suite}: {r.op} [{r.shape}] ours {r.ours_ms:.3f} ms, {base}" + (f"; {r.notes}" if r.notes else "")


def _check_out(out):
    """Creates the folder `out` and writes a file there: an existing folder without write permission (or on a
    read-only file system) passed makedirs and failed at the first row's record, a traceback after timing it."""
    os.makedirs(out, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=out, prefix=".llmkern-bench-probe-")
    os.close(fd)
    os.unlink(path)


def _reporting_rank():
    """False on torchrun's ranks other than 0: every rank runs the suites (the parallel rows' collectives need them
    all), rank 0 prints and writes --out. (Each rank printed every row and table, and all wrote the same files,
    the last one's numbers winning.)"""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="llmkern-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", default=None, help="suite to run (repeatable); default: all")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sweep (the default)")
    mode.add_argument("--full", action="store_true", help="the complete sweep of each suite")
    p.add_argument("--out", default="bench-out", help="output folder for JSON / markdown / PNG")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available; under "
                   "torchrun cuda is the LOCAL_RANK GPU)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    suites = load_all()
    if args.list:
        for name, s in sorted(suites.items()):
            print(f"{name:12s} {s.description}")
        return 0
    names = list(dict.fromkeys(args.suite)) if args.suite else sorted(suites)  # (--suite x --suite x: once)
    unknown = [n for n in names if n not in suites]
    if unknown:
        print(f"llmkern-bench: unknown suite(s) {unknown}; available: {sorted(suites)}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        print(f"llmkern-bench: --device must be cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
        return 2
    try:  # (created and written to before anything is timed: a bad --out is not a failed suite)
        _check_out(args.out)
    except OSError as exc:
        print(f"llmkern-bench: --out {args.out!r} is not a usable folder: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # (under torchrun: each rank its own GPU)
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (device.index is not None and device.index >= n):
            print(f"llmkern-bench: --device {device}: {n} usable CUDA device(s) here", file=sys.stderr)
            return 2
        # the timing's CUDA events and synchronisations are the current device's: make it the measured one
        torch.cuda.set_device(device.index or 0)
    if not _reporting_rank():
        return _run_silently(suites, names, device, args)
    ctx = Context(device=device, quick=not args.full, progress=_progress, out_dir=args.out)
    results, failed = [], {}
    run = {"mode": "quick" if ctx.quick else "full", "suites": names}  # (the record says what was run)
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        print(f"[llmkern-bench] suite {name} ({i}/{len(names)}) on {device} ({'quick' if ctx.quick else 'full'})",
              file=sys.stderr)
        mine = []
        try:
            for r in suites[name].fn(ctx) or ():
                r.suite = r.suite or name
                mine.append(r)
                # each row as soon as it is measured: a run stopped by a time limit keeps it
                print(f"[row] {_row_line(r)}", flush=True)
                write_outputs(results + mine, args.out, device, plot=False, failed=failed, run=run)
        except Exception as exc:  # one broken suite must not hide the others' numbers
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"[llmkern-bench] suite {name} failed: {failed[name]}", file=sys.stderr)
            write_outputs(results + mine, args.out, device, plot=False, failed=failed, run=run)  # on record at once
        print(f"[llmkern-bench] suite {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        results += mine
        if len(names) > 1 and mine:  # each suite's table as soon as it is done (a run cut short keeps them)
            print(format_table(mine), flush=True)
            write_outputs(results, args.out, device, failed=failed, run=run)
    if len(names) > 1:
        print("\n[llmkern-bench] all suites:")
    print(format_table(results))
    print(RATIO_LEGEND)
    for line in failed_lines(failed):
        print(line)
    paths = write_outputs(results, args.out, device, failed=failed, run=run)
    print("\nwritten: " + ", ".join(paths.values()))
    if "png" not in paths and any(r.ratio is not None for r in results):
        print(f"not written: {os.path.join(args.out, 'results.png')} (the chart needs matplotlib: "
              "pip install 'llmkern[bench]')")
    return 1 if failed else 0


def _run_silently(suites, names, device, args):
    """A torchrun rank other than 0: the same suites, nothing printed but failures, nothing written."""
    ctx = Context(device=device, quick=not args.full, progress=lambda it, desc="", total=None: it,
                  out_dir=args.out)
    failed = 0
    for name in names:
        try:
            for _ in suites[name].fn(ctx) or ():
                pass
        except Exception as exc:
            failed += 1
            print(f"[llmkern-bench] rank {os.environ.get('RANK')}: suite {name} failed: {type(exc).__name__}: "
                  f"{exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
