"""llmkern-bench's command line: one suite on CPU, rows printed and written as they come."""
import json
import os

from llmkern.bench import cli


def test_one_suite_prints_rows_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["--suite", "cross_entropy", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("[row] cross_entropy:")]
    assert rows, printed
    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == len(rows)
    assert all(r["ours_ms"] > 0 for r in data["results"])
    assert os.path.exists(out / "results.md")


def test_unknown_suite_is_an_error(tmp_path):
    assert cli.main(["--suite", "nope", "--out", str(tmp_path)]) == 2


def test_info_reports_versions_ops_and_tma(monkeypatch):
    from llmkern import info

    got = info.collect()
    assert got["torch"] and "device" in got
    for op in ("sample", "attention", "lora_linear", "cross_entropy"):
        assert f"op {op}" in got and not str(got[f"op {op}"]).startswith("error"), got
    if not __import__("torch").cuda.is_available():
        assert got["TMA kernels (attention, LoRA)"].startswith("off")


def test_mfu_compile_mode_knob(monkeypatch):
    """LLMKERN_BENCH_COMPILE picks the torch.compile mode of the mfu steps; unknown values are errors."""
    import pytest
    import torch
    from llmkern.bench.suites.mfu import compile_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LLMKERN_BENCH_COMPILE", raising=False)
    assert compile_mode(cuda, quick=False) == "default" and compile_mode(cuda, quick=True) is None
    assert compile_mode(cpu, quick=False) is None
    for value, want in (("0", None), ("1", "default"), ("reduce-overhead", "reduce-overhead")):
        monkeypatch.setenv("LLMKERN_BENCH_COMPILE", value)
        assert compile_mode(cpu, quick=True) == want
    monkeypatch.setenv("LLMKERN_BENCH_COMPILE", "fast")
    with pytest.raises(ValueError, match="LLMKERN_BENCH_COMPILE"):
        compile_mode(cpu, quick=True)


def test_mfu_rows_knob(monkeypatch):
    """LLMKERN_BENCH_MFU_ROWS picks mfu rows by model label across quick and full lists."""
    import pytest
    import torch
    from llmkern.bench.suites.mfu import _plan

    monkeypatch.setenv("LLMKERN_BENCH_MFU_ROWS", "gpt3-1.3b")
    rows = _plan(torch.device("cuda"), quick=True)
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [("gpt3-1.3b", 4, 1024, False)]
    monkeypatch.setenv("LLMKERN_BENCH_MFU_ROWS", "gpt-9")
    with pytest.raises(ValueError, match="LLMKERN_BENCH_MFU_ROWS"):
        _plan(torch.device("cpu"), quick=True)


def test_failed_suite_is_recorded_in_outputs(tmp_path, capsys, monkeypatch):
    """A suite that raises is listed as failed in results.json / results.md and the printout, with the
    rows it yielded before; the exit code is 1."""
    from llmkern.bench.registry import Result, Suite, load_all

    def broken(ctx):
        yield Result(op="first", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0)
        raise RuntimeError("boom")

    suites = dict(load_all())
    suites["broken"] = Suite("broken", "", broken)
    monkeypatch.setattr(cli, "load_all", lambda: suites)
    out = tmp_path / "bench"
    assert cli.main(["--suite", "broken", "--out", str(out), "--device", "cpu"]) == 1
    data = json.loads((out / "results.json").read_text())
    assert data["failed"] == [{"suite": "broken", "error": "RuntimeError: boom"}]
    assert [r["op"] for r in data["results"]] == ["first"] and data["results"][0]["ratio"] == 2.0
    assert "FAILED suite broken: RuntimeError: boom" in (out / "results.md").read_text()
    printed = capsys.readouterr().out
    assert "FAILED suite broken" in printed and "ratio = baseline time / our time" in printed
