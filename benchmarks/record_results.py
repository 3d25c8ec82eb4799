"""Turn the output folder of `benchmarks/gpu_check.sh OUT` into one committed results page.

    python benchmarks/record_results.py OUT            # writes benchmarks/results/<card>-<date>.md
    python benchmarks/record_results.py OUT --print    # prints it instead

The page holds what the run measured, nothing else: the card and versions (env.txt), the build and
test outcome (build.log, pytest_gpu.log: the summary lines), and every harness row of every suite
(bench-SUITE/results.json), each with its notes (where a row checks an issue's target, its
verdict is in them).
Rows a suite did not reach (stopped by its time limit) are simply absent; the page says which
suites wrote nothing.
"""
import argparse
import datetime
import glob
import json
import os
import re

SUITES = ("sampling", "cross_entropy", "attention", "lora", "mfu", "tp", "norm", "rope", "swiglu", "moe")


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def card_name(env_text, results):
    """The GPU's name from nvidia-smi's CSV (env.txt) or the harness environment, as a file stem."""
    m = re.search(r"^(NVIDIA [^,\n]+),", env_text, re.M)
    name = m.group(1) if m else next((r["environment"].get("gpu") for r in results if r.get("environment")), None)
    name = name or "unknown-device"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _summary_lines(text, patterns):
    return [line.strip() for line in text.splitlines() if any(re.search(p, line) for p in patterns)]


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def suite_table(rows):
    out = ["| op | shape | ours ms | baseline | baseline ms | ratio | throughput | MFU | notes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thr = f"{_fmt(r.get('throughput'))} {r.get('unit') or ''}".strip()
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        out.append(f"| {r['op']} | {r['shape']} | {_fmt(r['ours_ms'])} | {r.get('baseline') or ''} | "
                   f"{_fmt(r.get('baseline_ms'))} | {_fmt(r.get('ratio'), 2)} | {thr} | {mfu} | "
                   f"{(r.get('notes') or '').replace('|', '/')} |")
    return out


def build_page(out_dir):
    env_text = _read(os.path.join(out_dir, "env.txt"))
    loaded = {}
    for suite in SUITES:
        path = os.path.join(out_dir, f"bench-{suite}", "results.json")
        if os.path.exists(path):
            with open(path) as f:
                loaded[suite] = json.load(f)
    for path in sorted(glob.glob(os.path.join(out_dir, "bench-*", "results.json"))):
        suite = os.path.basename(os.path.dirname(path))[len("bench-"):]
        if suite not in loaded:
            with open(path) as f:
                loaded[suite] = json.load(f)
    card = card_name(env_text, list(loaded.values()))
    lines = [f"# GPU results: {card}", "",
             f"Recorded from `benchmarks/gpu_check.sh` output by `benchmarks/record_results.py` on "
             f"{datetime.date.today().isoformat()}. Every number below was measured in that run.", "",
             "## Machine", "", "```", env_text.strip() or "(env.txt missing)", "```", ""]
    build = _summary_lines(_read(os.path.join(out_dir, "build.log")), [r"build rc=", r"[Ee]rror", r"Successfully"])
    tests = _summary_lines(_read(os.path.join(out_dir, "pytest_gpu.log")),
                           [r"\d+ (passed|failed|skipped|error)", r"^FAILED", r"^ERROR", r"TMA kernels failed"])
    lines += ["## Build and GPU tests", "", "```"] + (build[-5:] or ["(no summary line in build.log)"])
    lines += tests or ["(no summary line in pytest_gpu.log)"]
    lines += ["```", ""]
    for suite, data in loaded.items():
        rows = data.get("results", [])
        lines += [f"## Suite `{suite}` ({len(rows)} rows)", ""] + suite_table(rows) + [""]
    diag = _read(os.path.join(out_dir, "diag-host.log"))
    rows = [line.rstrip() for line in diag.splitlines() if "ms/call" in line]
    if rows:
        lines += ["## Host time per call (`benchmarks/gpu_diag.py host`)", "", "```"] + rows + ["```", ""]
    mla = [line.rstrip() for line in _read(os.path.join(out_dir, "diag-mla.log")).splitlines() if " ms (" in line]
    if mla:
        lines += ["## MLA decode tiles (`benchmarks/gpu_diag.py mla`)", "", "```"] + mla + ["```", ""]
    missing = [s for s in SUITES if s not in loaded]
    if missing:
        lines += [f"Suites that wrote no results (not reached, or failed before their first row): "
                  f"{', '.join(missing)}.", ""]
    return card, "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--print", action="store_true", help="print the page instead of writing it")
    args = ap.parse_args(argv)
    card, page = build_page(args.out_dir)
    if args.print:
        print(page)
        return 0
    dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{card}-{datetime.date.today().isoformat()}.md")
    with open(dest, "w") as f:
        f.write(page + "\n")
    print(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
