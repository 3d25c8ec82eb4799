"""llmkern-bench audit: CPU timing repeats, an unwritable --out, the summary's MFU / TFLOP/s columns, strict JSON,
the PNG that matplotlib's absence leaves out."""
import json
import os
import tempfile
import time

import pytest
import torch

from llmkern.bench import cli, report
from llmkern.bench.registry import Result, Suite, load_all
from llmkern.bench.timing import time_fn


def test_cpu_timing_of_a_slow_call_is_a_median_of_several():
    """A call longer than min_run_time was timed ONCE on CPU (blocked_autorange stops after one block): every mfu
    and generate row was a single sample, and one slow call (another process, a GC pause) was the result."""
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.25 if len(calls) == 3 else 0.02)  # (call 3: the first timed one after warm-up and estimate)

    ms = time_fn(fn, "cpu", warmup=1, min_run_time=0.005, quick=False)
    assert ms < 100, ms
    assert len(calls) >= 1 + 5


def _unwritable_folder(tmp_path):
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return str(d)
    try:  # (root writes anywhere it may: a read-only sysfs folder instead)
        os.close(tempfile.mkstemp(dir="/sys/kernel")[0])
    except OSError:
        return "/sys/kernel" if os.path.isdir("/sys/kernel") else pytest.skip("no unwritable folder here")
    pytest.skip("no unwritable folder here")


def test_unwritable_out_folder_is_a_usage_error_before_timing(tmp_path, capsys, monkeypatch):
    """An existing --out without write permission passed makedirs: the first row was timed, then its record
    failed (PermissionError), the failure handler's record failed too, and the run ended in a traceback."""
    timed = []

    def fake(ctx):
        timed.append(1)
        yield Result(op="x", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0)

    suites = dict(load_all())
    suites["fake"] = Suite("fake", "", fake)
    monkeypatch.setattr(cli, "load_all", lambda: suites)
    out = _unwritable_folder(tmp_path)
    assert cli.main(["--suite", "fake", "--out", out, "--device", "cpu"]) == 2
    assert not timed and out in capsys.readouterr().err


def test_summary_shows_mfu_against_the_a100_and_tflops_of_token_rows(tmp_path):
    """The summary's MFU column held the detected card's only (empty on CPU and unknown cards); MFU against the
    A100 (extra["mfu_a100"]) and the mfu suite's TFLOP/s (its throughput is tok/s) were in the JSON only."""
    row = Result(op="gpt step", shape="B=1", ours_ms=2.0, baseline="torch", baseline_ms=3.0, throughput=512.0,
                 unit="tok/s", mfu=None, suite="mfu", extra={"mfu_a100": 0.4125, "tflops": 128.7})
    header, line = report.rows_as_text([row])
    cells = dict(zip(header, line))
    assert cells["MFU A100"] == "41.2%" and cells["MFU"] == ""
    assert cells["throughput"] == "512 tok/s, 128.7 TFLOP/s"
    report.write_outputs([row], str(tmp_path), torch.device("cpu"), plot=False)
    assert "41.2%" in (tmp_path / "results.md").read_text()
    assert report._pct(1.376e-5) == "0.0014%"  # (a CPU row against the A100: not 0.0%)


def test_moe_rows_carry_mfu_against_the_a100(monkeypatch):
    from llmkern.bench.registry import Context
    from llmkern.bench.suites import moe

    monkeypatch.setattr(moe, "time_fn", lambda fn, *a, **k: (fn(), 1.0)[1])  # (one call, "1 ms")
    rows = list(moe._rows(Context(device=torch.device("cpu")), "t", 16, 32, 32, 4, 2, torch.float32, modes=("fwd",)))
    assert rows and all(r.extra["mfu_a100"] == pytest.approx(r.throughput * 1e12 / 19.5e12) for r in rows)


def test_results_json_is_strict_json(tmp_path):
    """NaN (the tp suite's exposed fraction when communication cost nothing) was written as a bare NaN, which
    strict JSON readers refuse; it is null now."""
    row = Result(op="tp", shape="s", ours_ms=1.0, baseline="b", baseline_ms=1.0, extra={"exposed": float("nan")})
    report.write_outputs([row], str(tmp_path), torch.device("cpu"), plot=False)

    def refuse(name):
        raise ValueError(name)

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert data["results"][0]["extra"]["exposed"] is None


def test_missing_png_is_said(tmp_path, capsys, monkeypatch):
    """README promises JSON / markdown / PNG in --out; without matplotlib the PNG was silently not written, and
    an earlier run's results.png was left beside the new JSON."""
    def fake(ctx):
        yield Result(op="x", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0)

    suites = dict(load_all())
    suites["fake"] = Suite("fake", "", fake)
    monkeypatch.setattr(cli, "load_all", lambda: suites)
    monkeypatch.setattr(report, "_plot", lambda *a, **k: None)  # (as without matplotlib)
    (tmp_path / "results.png").write_bytes(b"an earlier run's chart")
    assert cli.main(["--suite", "fake", "--out", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "not written" in printed and "results.png" in printed and "matplotlib" in printed
    assert not (tmp_path / "results.png").exists()  # (it stayed: a chart of other numbers than the JSON's)


def test_repeated_suite_runs_once_and_suites_are_counted(tmp_path, capsys, monkeypatch):
    """--suite x --suite x ran x twice (every row twice in the table and the JSON); the header of each suite
    says which of how many it is (the run's progress where a suite has no bar of its own); the record says
    whether the numbers are quick or full mode, and of which suites (it did not)."""
    def fake(ctx):
        yield Result(op="x", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0)

    suites = dict(load_all())
    suites["fake"] = Suite("fake", "", fake)
    monkeypatch.setattr(cli, "load_all", lambda: suites)
    assert cli.main(["--suite", "fake", "--suite", "fake", "--out", str(tmp_path), "--device", "cpu"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == 1
    assert data["environment"]["mode"] == "quick" and data["environment"]["suites"] == ["fake"]
    assert "mode: quick" in (tmp_path / "results.md").read_text()
    assert "suite fake (1/1)" in capsys.readouterr().err


def test_torchrun_rank_measures_its_own_gpu(monkeypatch, tmp_path):
    """Under torchrun every rank set cuda:0 (only the mfu and tp suites re-picked LOCAL_RANK's device): the other
    suites' ranks all timed one GPU. `--device cuda` now means the rank's own."""
    class Stop(Exception):
        pass

    def context(**kw):
        raise Stop(kw["device"])

    picked = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(cli, "Context", context)
    with pytest.raises(Stop) as stop:
        cli.main(["--device", "cuda", "--suite", "rope", "--out", str(tmp_path)])
    assert stop.value.args[0] == torch.device("cuda", 1) and picked == [1]


def test_torchrun_ranks_other_than_0_run_the_suites_but_report_nothing(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank printed every row and table and wrote the same --out files (the last rank's
    numbers won). The ranks other than 0 still run the suites (parallel rows need their collectives) and say only
    their failures."""
    ran = []

    def fake(ctx):
        ran.append(1)
        yield Result(op="x", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0)

    def broken(ctx):
        raise RuntimeError("boom")
        yield

    suites = {"fake": Suite("fake", "", fake), "broken": Suite("broken", "", broken)}
    monkeypatch.setattr(cli, "load_all", lambda: suites)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["--suite", "fake", "--out", str(tmp_path / "r1"), "--device", "cpu"]) == 0
    assert ran == [1] and capsys.readouterr().out == ""
    assert not (tmp_path / "r1" / "results.json").exists()
    assert cli.main(["--suite", "broken", "--out", str(tmp_path / "r1"), "--device", "cpu"]) == 1
    assert "rank 1: suite broken failed: RuntimeError: boom" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["--suite", "fake", "--out", str(tmp_path / "r0"), "--device", "cpu"]) == 0
    assert ran == [1, 1] and "x" in capsys.readouterr().out and (tmp_path / "r0" / "results.json").exists()
