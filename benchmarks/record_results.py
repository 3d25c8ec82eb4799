"""Turn the output folder of `benchmarks/gpu_check.sh OUT` into one committed results page.

    python benchmarks/record_results.py OUT            # writes benchmarks/results/<card>-<date>.md
    python benchmarks/record_results.py OUT --print    # prints it instead

The page holds what the run measured, nothing else: the card and versions (env.txt), the build and
test outcome (build.log, pytest_gpu.log: the summary lines), and every harness row of every suite
(bench-SUITE/results.json), each with its notes (where a row checks an issue's target, its
verdict is in them).
Rows a suite did not reach (stopped by its time limit) are simply absent; the page says which
suites wrote nothing. A suite that raised (results.json "failed") is marked FAILED under its heading with
the error (its rows, if any, are the partial ones before it); a results.json that cannot be read is named
on the page instead of breaking it.
"""
import argparse
import datetime
import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
_KNOWN_SUITES = ("attention", "lora", "mfu", "sampling", "generate", "tp", "mfu-compiled", "cross_entropy", "moe",
                 "norm", "rope", "swiglu")  # (when gpu_check.sh cannot be read)


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def gpu_check_suites(script=os.path.join(HERE, "gpu_check.sh")):
    """The harness phases of gpu_check.sh's default plan (its `plan="..."` lines), in order: each writes
    bench-NAME/results.json (NAME-compiled included; diag-SECTION phases write no results.json)."""
    specs = " ".join(re.findall(r'^plan="(?:\$plan )?([^"$]*)"', _read(script), re.M)).split()
    names = tuple(dict.fromkeys(spec.split(":")[0] for spec in specs if not spec.startswith("diag-")))
    return names or _KNOWN_SUITES


SUITES = gpu_check_suites()


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
        out.append(f"| {r.get('op')} | {r.get('shape')} | {_fmt(r.get('ours_ms'))} | {r.get('baseline') or ''} | "
                   f"{_fmt(r.get('baseline_ms'))} | {_fmt(r.get('ratio'), 2)} | {thr} | {mfu} | "
                   f"{(r.get('notes') or '').replace('|', '/')} |")
    return out


def _load(path):
    """(the parsed results.json, None), or (None, why it could not be read): one unreadable file (e.g. cut
    short by a kill during its write) must not cost the page every other suite."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("results") or [], list):
        return None, "not a harness results object"
    return data, None


def _failures(data):
    """[(suite, error)] of a results.json's "failed" list (written by llmkern.bench.cli when a suite raises)."""
    out = []
    for f in data.get("failed") or []:
        if isinstance(f, dict):
            out.append((str(f.get("suite") or "?"), str(f.get("error") or "(no message)")))
        else:
            out.append(("?", str(f)))
    return out


def build_page(out_dir):
    env_text = _read(os.path.join(out_dir, "env.txt"))
    found = {s: os.path.join(out_dir, f"bench-{s}", "results.json") for s in SUITES}
    for path in sorted(glob.glob(os.path.join(out_dir, "bench-*", "results.json"))):
        found.setdefault(os.path.basename(os.path.dirname(path))[len("bench-"):], path)
    loaded, unreadable = {}, {}
    for suite, path in found.items():
        if os.path.exists(path):
            data, why = _load(path)
            if data is None:
                unreadable[suite] = why
            else:
                loaded[suite] = data
    card = card_name(env_text, list(loaded.values()))
    lines = [f"# GPU results: {card}", "",
             f"Recorded from `benchmarks/gpu_check.sh` output by `benchmarks/record_results.py` on "
             f"{datetime.date.today().isoformat()}. Every number below was measured in that run.", "",
             "## Machine", "", "```", env_text.strip() or "(env.txt missing)", "```", ""]
    build = _summary_lines(_read(os.path.join(out_dir, "build.log")), [r"build rc=", r"[Ee]rror", r"Successfully"])
    tests = _summary_lines(_read(os.path.join(out_dir, "pytest_gpu.log")),
                           [r"\d+ (passed|failed|skipped|error)", r"^FAILED", r"^ERROR", r"TMA kernels failed",
                            r"KeyboardInterrupt", r"^!+ .*[Ii]nterrupted", r"Timeout"])
    lines += ["## Build and GPU tests", "", "```"] + (build[-5:] or ["(no summary line in build.log)"])
    lines += tests or ["(no summary line in pytest_gpu.log)"]
    lines += ["```", ""]
    # (a phase stopped at its limit looks complete in its own log: rc 124, or 137 when the kill grace ran out too)
    stopped = [line.split("] ", 1)[-1] for line in _read(os.path.join(out_dir, "phases.txt")).splitlines()
               if re.search(r"rc=(124|137)\b|skipped: deadline", line)]
    if stopped:
        lines += ["**Stopped at their time limit or skipped at the deadline (partial: tests or rows after the cut "
                  "are missing):**", ""]
        lines += [f"- {p}" for p in stopped] + [""]
    missing, partial = [], []
    for suite in found:
        if suite in unreadable:
            lines += [f"## Suite `{suite}`: results.json UNREADABLE", "",
                      f"**`bench-{suite}/results.json` could not be read ({unreadable[suite]})**: no rows from "
                      f"it on this page; the rows the suite printed are the `[row]` lines of bench-{suite}.log.", ""]
            missing.append(f"{suite} (results.json unreadable)")
            continue
        if suite not in loaded:
            missing.append(suite)
            continue
        data = loaded[suite]
        rows = [r for r in data.get("results") or [] if isinstance(r, dict)]
        failures = _failures(data)
        if failures and not rows:
            lines += [f"## Suite `{suite}` (0 rows, FAILED before its first row)", ""]
            missing.append(f"{suite} (failed before its first row)")
        elif failures:
            lines += [f"## Suite `{suite}` ({len(rows)} rows, FAILED: partial)", ""]
            partial.append(suite)
        else:
            lines += [f"## Suite `{suite}` ({len(rows)} rows)", ""]
        for name, error in failures:
            what = "the rows below are the ones it measured before that" if rows else "no rows"
            lines += [f"**FAILED suite {name}: {error.replace('|', '/')}** ({what})", ""]
        if rows or not failures:
            lines += suite_table(rows) + [""]
    diag = _read(os.path.join(out_dir, "diag-host.log"))
    rows = [line.rstrip() for line in diag.splitlines() if "ms/call" in line or "near the 200 ms sleep" in line]
    if rows:
        lines += ["## Host time per call (`benchmarks/gpu_diag.py host`)", "", "```"] + rows + ["```", ""]
    mla = [line.rstrip() for line in _read(os.path.join(out_dir, "diag-mla.log")).splitlines()
           if " ms (" in line or re.search(r"[A-Za-z]+(Error|Exception)\b|OutOfResources|gpu_diag: FAILED", line)]  # (failed configs too)
    if mla:
        lines += ["## MLA decode tiles (`benchmarks/gpu_diag.py mla`)", "", "```"] + mla + ["```", ""]
    if partial:
        lines += [f"Suites that failed after some rows (their tables are partial): {', '.join(partial)}.", ""]
    if missing:
        lines += [f"Suites that wrote no results (not reached, failed before their first row, or an unreadable "
                  f"results.json): {', '.join(missing)}.", ""]
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
