"""Result tables: printed text, JSON, markdown and a PNG chart of the speed-ups."""
import json
import math
import os
import platform

import torch

COLUMNS = ("suite", "op", "shape", "baseline", "baseline ms", "ours ms", "ratio", "throughput", "MFU",
           "MFU A100")


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _pct(v):
    """A utilisation in percent: 0.1 % and above to one decimal, below that two significant digits (a CPU row
    against the A100's peak read 0.0%)."""
    if v is None:
        return ""
    return f"{100 * v:.1f}%" if 100 * v >= 0.1 else f"{100 * v:.2g}%"


def _throughput(r):
    """The row's throughput, and its TFLOP/s (extra["tflops"]) where the unit is another (the mfu suite's tok/s)."""
    if r.throughput is None:
        return ""
    tflops = (r.extra or {}).get("tflops")
    more = f", {tflops:.4g} TFLOP/s" if tflops is not None and r.unit != "TFLOP/s" else ""
    return f"{r.throughput:.4g} {r.unit}{more}"


def rows_as_text(results):
    """MFU: against the detected device's dense peak (none on CPU or an unknown card); MFU A100: against the
    A100's (extra["mfu_a100"]), the two utilisations the summary reports."""
    rows = [COLUMNS]
    for r in results:
        rows.append((r.suite, r.op, r.shape, r.baseline, _fmt(r.baseline_ms, ".3f"), _fmt(r.ours_ms, ".3f"),
                     (_fmt(r.ratio, ".2f") + "x") if r.ratio is not None else "", _throughput(r), _pct(r.mfu),
                     _pct((r.extra or {}).get("mfu_a100"))))
    return rows


def format_table(results):
    rows = rows_as_text(results)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device):
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "machine": platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        try:  # (written on the failure path too: a broken device must not lose the record)
            env["gpu"] = torch.cuda.get_device_name(device)
        except Exception as exc:  # noqa: BLE001
            env["gpu"] = f"unavailable: {type(exc).__name__}: {exc}"
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


RATIO_LEGEND = "ratio = baseline time / our time (> 1: llmkern is faster)"


def failed_lines(failed):
    """One line per failed suite ({suite: error}); its rows, if any, are the ones it yielded first."""
    return [f"FAILED suite {n}: {e} (its rows above, if any, are partial)" for n, e in (failed or {}).items()]


def _write_atomic(path, text):
    """Writes `text` to a temporary file in `path`'s folder, then renames it over `path`: a reader (or a run
    killed mid-write by a time limit) sees the old file or the new one, never a truncated one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")  # (open's usual mode)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _finite(v):
    """v with NaN and infinities as None (JSON null): json.dumps wrote them as NaN / Infinity, which strict JSON
    readers (jq, JavaScript's JSON.parse, json.loads with parse_constant) refuse (the tp suite's exposed-communication
    fraction is NaN when communication cost nothing)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_outputs(results, out_dir, device, name="results", plot=True, failed=None, run=None):
    """Writes <name>.json, <name>.md and (with matplotlib and plot) <name>.png; returns the paths.
    `failed` ({suite: error message}) is recorded in both files ("failed" in the JSON); `run` (the CLI's
    {"mode": "quick" | "full", "suites": [...]}) too, in the environment."""
    os.makedirs(out_dir, exist_ok=True)
    env = {**environment(device), **(run or {})}
    paths = {}
    paths["json"] = os.path.join(out_dir, f"{name}.json")
    _write_atomic(paths["json"], json.dumps(_finite(
        {"environment": env, "results": [r.as_dict() for r in results],
         "failed": [{"suite": n, "error": e} for n, e in (failed or {}).items()]}), indent=2, allow_nan=False))
    paths["md"] = os.path.join(out_dir, f"{name}.md")
    rows = rows_as_text(results)
    md = ["# llmkern-bench results\n\n", ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n",
          RATIO_LEGEND + "\n\n", "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"]
    md += ["| " + " | ".join(str(c) for c in row) + " |\n" for row in rows[1:]]
    md += [f"\n**{line}**\n" for line in failed_lines(failed)]
    _write_atomic(paths["md"], "".join(md))
    png = _plot(results, os.path.join(out_dir, f"{name}.png"), env) if plot else None
    if png:
        paths["png"] = png
    elif plot and os.path.exists(os.path.join(out_dir, f"{name}.png")):  # an earlier run's chart, not this one's
        os.unlink(os.path.join(out_dir, f"{name}.png"))
    return paths


def _plot(results, path, env):
    """Horizontal bar chart of the speed-up over each row's baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results if r.ratio is not None]
    if not rows:
        return None
    labels = [f"{r.suite}: {r.op} [{r.shape}] vs {r.baseline}" for r in rows]
    ratios = [r.ratio for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
    ax.barh(range(len(rows)), ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over baseline (log scale, > 1 is faster)")
    ax.set_title(f"llmkern-bench on {env.get('gpu') or env.get('cpu')} (torch {env['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
