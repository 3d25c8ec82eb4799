"""benchmarks/record_results.py: gpu_check.sh's output folder -> one results page."""
import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _module():
    spec = importlib.util.spec_from_file_location("record_results",
                                                  os.path.join(HERE, "..", "benchmarks", "record_results.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_from_a_gpu_check_folder(tmp_path):
    (tmp_path / "env.txt").write_text("name, memory.total [MiB], driver_version\n"
                                      "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
    (tmp_path / "build.log").write_text("...\nbuild rc=0 in 80 s\n")
    (tmp_path / "pytest_gpu.log").write_text("..F\nFAILED tests/test_a.py::t - boom\n1 failed, 2 passed in 3s\n")
    (tmp_path / "bench-attention").mkdir()
    row = dict(op="attention fwd", shape="B=4 H=16 T=4096 D=128 causal=True bf16", ours_ms=0.7,
               baseline="sdpa-flash", baseline_ms=0.8, ratio=0.8 / 0.7, throughput=392.0, unit="TFLOP/s",
               mfu=0.396, notes="TMA kernels; pointer kernels 350 TFLOP/s", suite="attention", extra={})
    (tmp_path / "bench-attention" / "results.json").write_text(json.dumps({"environment": {}, "results": [row]}))
    (tmp_path / "diag-host.log").write_text("# section host\n  attention fwd  front : host    0.210 ms/call, "
                                            "device    0.190 ms/call\nnoise\n")
    card, page = _module().build_page(str(tmp_path))
    assert card == "nvidia-h100-80gb-hbm3"
    assert "## Host time per call" in page and "host    0.210 ms/call" in page and "noise" not in page
    assert "NVIDIA H100 80GB HBM3" in page and "build rc=0" in page
    assert "FAILED tests/test_a.py::t" in page and "1 failed, 2 passed" in page
    assert "| attention fwd | B=4 H=16 T=4096 D=128 causal=True bf16 | 0.700 | sdpa-flash | 0.800 | 1.14 |" in page
    assert "39.6%" in page and "pointer kernels 350 TFLOP/s" in page
    assert "Suites that wrote no results" in page and "sampling" in page.split("wrote no results")[1]


def _row(op, suite):
    return dict(op=op, shape="s", ours_ms=0.7, baseline="b", baseline_ms=0.8, ratio=0.8 / 0.7, throughput=1.0,
                unit="TFLOP/s", mfu=None, notes="", suite=suite, extra={})


def _write(tmp_path, suite, obj_or_text):
    (tmp_path / f"bench-{suite}").mkdir()
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text, indent=2)
    (tmp_path / f"bench-{suite}" / "results.json").write_text(text)


def test_failed_suites_are_marked_and_counted(tmp_path):
    """results.json's "failed" list (llmkern.bench.cli): a suite that failed after some rows is marked FAILED
    with its error under its heading (the table is partial); one that failed before its first row is named
    with its error and counted among the suites that wrote no results."""
    _write(tmp_path, "attention", {"environment": {}, "results": [_row("attention fwd", "attention")],
                                   "failed": [{"suite": "attention", "error": "ValueError: bad DECODE_CONFIG"}]})
    _write(tmp_path, "mfu", {"environment": {}, "results": [],
                             "failed": [{"suite": "mfu", "error": "ValueError: LLMKERN_BENCH_COMPILE must be"}]})
    _write(tmp_path, "lora", {"environment": {}, "results": [_row("lora fwd", "lora")], "failed": []})
    _, page = _module().build_page(str(tmp_path))
    att = page.split("## Suite `attention`")[1].split("## ")[0]
    assert att.startswith(" (1 rows, FAILED: partial)")
    assert "**FAILED suite attention: ValueError: bad DECODE_CONFIG**" in att and "| attention fwd |" in att
    mfu = page.split("## Suite `mfu`")[1].split("## ")[0]
    assert mfu.startswith(" (0 rows, FAILED before its first row)")
    assert "FAILED suite mfu: ValueError: LLMKERN_BENCH_COMPILE must be" in mfu and "| op |" not in mfu
    lora = page.split("## Suite `lora`")[1].split("## ")[0]
    assert lora.startswith(" (1 rows)") and "FAILED" not in lora
    missing = page.split("Suites that wrote no results")[1]
    assert "mfu (failed before its first row)" in missing and "lora" not in missing
    assert "attention" not in missing and "generate" in missing
    assert "failed after some rows (their tables are partial): attention." in page


def test_unreadable_results_json_does_not_break_the_page(tmp_path):
    """A results.json cut short (or otherwise unparsable) is named on the page; every other suite's rows stay."""
    text = json.dumps({"environment": {}, "results": [_row("lora fwd", "lora")], "failed": []}, indent=2)
    _write(tmp_path, "lora", text[:len(text) // 2])
    _write(tmp_path, "attention", {"environment": {}, "results": [_row("attention fwd", "attention")],
                                   "failed": []})
    _write(tmp_path, "norm", "[1, 2]")  # valid JSON, not a results object
    _, page = _module().build_page(str(tmp_path))
    assert "| attention fwd |" in page and "lora fwd" not in page
    assert "## Suite `lora`: results.json UNREADABLE" in page and "JSONDecodeError" in page
    assert "## Suite `norm`: results.json UNREADABLE" in page
    missing = page.split("Suites that wrote no results")[1]
    assert "lora (results.json unreadable)" in missing and "norm (results.json unreadable)" in missing


def test_suites_are_the_harness_phases_of_gpu_check():
    """The suites the page expects are gpu_check.sh's harness phases (bench-NAME folders), generate and
    mfu-compiled included; diag-SECTION phases write no results.json."""
    mod = _module()
    assert {"generate", "mfu-compiled", "attention", "swiglu"} <= set(mod.SUITES)
    assert not any(s.startswith("diag-") for s in mod.SUITES)


def test_results_json_is_replaced_atomically(tmp_path, monkeypatch):
    """write_outputs writes a temporary file and renames it over results.json / results.md: a run killed
    during a write leaves the previous complete file, never a truncated one (nor a stray temporary file)."""
    import torch

    from llmkern.bench import report
    from llmkern.bench.registry import Result

    rows = [Result(op="first", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0, suite="x")]
    report.write_outputs(rows, str(tmp_path), torch.device("cpu"), plot=False)
    before = (tmp_path / "results.json").read_text()

    def killed(src, dst):
        raise KeyboardInterrupt  # (a kill between the write and the rename)

    monkeypatch.setattr(report.os, "replace", killed)
    more = rows + [Result(op="second", shape="s", ours_ms=1.0, baseline="b", baseline_ms=2.0, suite="x")]
    try:
        report.write_outputs(more, str(tmp_path), torch.device("cpu"), plot=False)
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "results.json").read_text() == before
    assert [r["op"] for r in json.loads(before)["results"]] == ["first"]
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]
    monkeypatch.undo()
    report.write_outputs(more, str(tmp_path), torch.device("cpu"), plot=False)
    assert [r["op"] for r in json.loads((tmp_path / "results.json").read_text())["results"]] == ["first", "second"]
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_phases_stopped_at_their_limit_are_marked_partial(tmp_path):
    """A pytest run stopped by `timeout -s INT` prints an ordinary "N passed" line after its KeyboardInterrupt,
    and a suite stopped at its limit keeps the rows it measured: the page showed both as complete. The phases
    with rc=124 are listed as partial, the interruption is kept, and failed MLA configs stay on the page."""
    (tmp_path / "phases.txt").write_text("[40 s] build rc=0\n[100 s] pytest -m gpu (the rest, -n 8) rc=124\n"
                                         "[300 s] llmkern-bench --suite mfu rc=124 (limit 70 s)\n"
                                         "[310 s] pytest -m gpu (sampling, -n 8) rc=137\n"
                                         "[530 s] moe skipped: deadline\n[531 s] rope rc=1240\n")
    (tmp_path / "diag-host.log").write_text("  (host time 190 ms over 1 calls, near the 200 ms sleep: an upper bound)\n"
                                            "  gpt2 step  front : host  190.0 ms/call, device   95.0 ms/call\n")
    (tmp_path / "pytest_gpu.log").write_text("....\n!!!!!!! KeyboardInterrupt !!!!!!!\n7 passed in 3.88s\n")
    (tmp_path / "diag-mla.log").write_text("  tile 64x64: 0.100 ms (1.0 TB/s)\n  tile 128x128: "
                                           "OutOfResources: shared memory\n")
    _, page = _module().build_page(str(tmp_path))
    assert "Stopped at their time limit" in page
    assert "pytest -m gpu (the rest, -n 8) rc=124" in page and "llmkern-bench --suite mfu rc=124" in page
    assert "KeyboardInterrupt" in page and "7 passed" in page
    assert "OutOfResources: shared memory" in page and "0.100 ms" in page
    assert "sampling, -n 8) rc=137" in page and "moe skipped: deadline" in page and "rope rc=1240" not in page
    assert "near the 200 ms sleep" in page
