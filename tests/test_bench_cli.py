"""llmkern-bench's command line: one suite on CPU, rows printed and written as they come."""
import json
import os

import pytest
import torch

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


@pytest.mark.parametrize("bad", [["--device", "gpu"], ["--device", "meta"], ["--out", "FILE"]])
def test_bad_device_or_out_is_a_usage_error_before_timing(tmp_path, capsys, bad):
    """(--device gpu was a traceback, meta ran every suite to a failure; an --out that is a file came out as
    a failed suite and a traceback, after the first row was timed)"""
    (tmp_path / "FILE").write_text("")
    bad = [str(tmp_path / a) if a == "FILE" else a for a in bad]
    assert cli.main(["--suite", "swiglu", "--quick", "--out", str(tmp_path / "out")] + bad) == 2
    err = capsys.readouterr()
    assert bad[0] in err.err and "[row]" not in err.out and "Traceback" not in err.err


def test_unusable_cuda_device_is_an_error_and_the_record_survives_a_broken_device(tmp_path, monkeypatch):
    """--device cuda without a usable GPU (or cuda:N past the count) crashed in the failure handler, whose record
    asked the device for its name: no file was written and the other suites never ran."""
    import torch

    from llmkern.bench import report

    assert cli.main(["--suite", "rope", "--device", "cuda:99", "--out", str(tmp_path)]) == 2

    def broken(device=None):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "get_device_name", broken)
    assert report.environment(torch.device("cuda"))["gpu"].startswith("unavailable: RuntimeError")


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


def _tiny_gpt(**kw):
    from llmkern.models import get_config

    return get_config("gpt-tiny", **{**dict(n_layer=1, n_embd=128, n_head=4, block_size=32, vocab_size=64), **kw})


def test_mfu_plans_have_a_qlora_row_next_to_the_lora_one(monkeypatch):
    import torch
    from llmkern.bench.suites.mfu import _plan

    monkeypatch.delenv("LLMKERN_BENCH_MFU_ROWS", raising=False)
    for device in ("cpu", "cuda"):
        kinds = [r[4] for r in _plan(torch.device(device), quick=True)]
        assert kinds.index("qlora") == kinds.index("lora") + 1, (device, kinds)
        rows = {r[4]: r for r in _plan(torch.device(device), quick=False)}
        assert rows["qlora"][:4] == rows["lora"][:4]  # the same model, batch and length as the LoRA row


@pytest.mark.parametrize("with_bnb", [True, False])
def test_mfu_qlora_row_models_compute_the_same_finetune(monkeypatch, with_bnb):
    """QLoRA row: llmkern's quantize_nf4 + inject_lora against plain LoRA over bitsandbytes 4-bit layers
    (without bitsandbytes: over llmkern's NF4Linear): the same 4-bit layers, trainable parameters and loss."""
    import torch
    from torch import nn

    from llmkern import peft as lp
    from llmkern.bench.suites import mfu
    from llmkern.models import build

    if with_bnb:
        kind = pytest.importorskip("bitsandbytes").nn.Linear4bit
    else:
        monkeypatch.setattr(mfu, "_bnb", lambda: None)
        kind = lp.NF4Linear
    cfg, models = _tiny_gpt(tie_embeddings=False), {}
    for backend in ("llmkern", "torch"):
        torch.manual_seed(0)
        models[backend], note = mfu._qlora(build(cfg, backend=backend), backend, torch.float32)
        assert ("bitsandbytes not importable" in note) == (backend == "torch" and not with_bnb)
    ours, theirs = models["llmkern"], models["torch"]
    q, k = ours.h[0].attn.q_proj, ours.h[0].attn.k_proj
    assert isinstance(q, lp.LoRALinear) and q.quantized and q.r == 16 and not q.base_layer.double_quant
    assert isinstance(k, lp.NF4Linear) and type(ours.lm_head) is nn.Linear and type(theirs.lm_head) is nn.Linear
    tq, tk = theirs.h[0].attn.q_proj, theirs.h[0].attn.k_proj
    assert isinstance(tq, mfu._TorchLoRA) and isinstance(tq.base, kind) and isinstance(tk, kind)
    assert isinstance(theirs.h[0].attn.v_proj, mfu._TorchLoRA) and isinstance(theirs.h[0].mlp.down_proj, kind)
    codes = tk.weight.data if with_bnb else tk.packed
    assert torch.equal(codes.reshape(-1), k.packed)  # the same NF4 codes
    trainable = [sorted(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1] and len(trainable[0]) == 4 * cfg.n_layer
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0 at init: both are the 4-bit base model
        torch.testing.assert_close(ours(ids, labels=ids)[1], theirs(ids, labels=ids)[1], atol=1e-4, rtol=1e-4)


def test_mfu_suite_writes_the_qlora_row(tmp_path, capsys, monkeypatch):
    """The QLoRA row goes through the harness like the LoRA row: same FLOP convention, the peak memory left
    empty on CPU, the JSON schema unchanged."""
    from llmkern.bench.suites import mfu

    cfg = _tiny_gpt()
    rows = [("tiny", cfg, 1, 16, "lora"), ("tiny", cfg, 1, 16, "qlora")]
    monkeypatch.setattr(mfu, "_rows", lambda device, quick: rows)
    monkeypatch.setattr(mfu, "time_fn", lambda step, **kw: step() or 2.0)  # one step per backend, "2 ms"
    out = tmp_path / "bench"
    assert cli.main(["--suite", "mfu", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    assert "[row] mfu: tiny QLoRA finetune step" in capsys.readouterr().out
    lora, qlora = json.loads((out / "results.json").read_text())["results"]
    assert (lora["op"], qlora["op"]) == ("tiny LoRA finetune step", "tiny QLoRA finetune step")
    assert qlora["baseline"] == mfu.qlora_baseline()[0] and qlora["throughput"] == 16 / 2e-3
    assert "NF4 base" in qlora["notes"] and "frozen base" in qlora["notes"] and qlora["mfu"] is None
    for key in ("flops_per_token", "lora_params", "mfu_a100"):
        assert qlora["extra"][key] == lora["extra"][key] and qlora["extra"][key] > 0, key
    assert qlora["extra"]["peak_mem_bytes"] is None and qlora["extra"]["torch_peak_mem_bytes"] is None
    assert set(qlora) == set(lora) and "QLoRA finetune" in (out / "results.md").read_text()


def test_mfu_peak_memory_is_one_steady_state_step_on_cuda_only(monkeypatch):
    """On CUDA the peak is read after a warm step, over one more step, apart from the timing; on CPU there is
    none (None: not measured, never a made-up number)."""
    import torch
    from llmkern.bench.suites import mfu

    log = []
    monkeypatch.setattr(mfu, "_step_fn", lambda *a: (lambda: log.append("step"), 7, "n"))
    monkeypatch.setattr(mfu, "time_fn", lambda step, **kw: log.append("time") or 1.5)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: log.append("peak") or 3 << 29)
    args = (None, "llmkern", 1, 16, "qlora")
    assert mfu._measure(*args, torch.device("cuda"), None, None, True) == (1.5, 7, "n", 3 << 29)
    assert log == ["step", "reset", "step", "peak", "time"]
    log.clear()
    assert mfu._measure(*args, torch.device("cpu"), None, None, True) == (1.5, 7, "n", None)
    assert log == ["time"]
    notes = mfu._finetune_notes("qlora", {"llmkern": 3 << 29, "torch": 1 << 31})
    assert notes[-1] == "peak memory of a step 1.50 GiB vs 2.00 GiB baseline"
    assert not any("peak" in n for n in mfu._finetune_notes("lora", {"llmkern": None, "torch": None}))


def mfu_torchrun_worker(rank, p, out):
    """The mfu suite as torchrun runs it (WORLD_SIZE > 1, a process group up): tiny rows, one timed step."""
    from llmkern.bench.suites import mfu

    saved = os.environ.get("WORLD_SIZE"), mfu._rows, mfu.time_fn
    try:  # (the ranks serve the whole session: put back what this run changes in them)
        return _mfu_torchrun_run(rank, p, out)
    finally:
        if saved[0] is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved[0]
        mfu._rows, mfu.time_fn = saved[1:]


def _mfu_torchrun_run(rank, p, out):
    import torch

    from llmkern.bench.suites import mfu
    from llmkern.models import get_config

    os.environ["WORLD_SIZE"] = str(p)
    tiny = get_config("gpt-tiny", n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=128)
    moe = get_config("mixtral-tiny", n_layer=1, n_embd=64, n_head=2, n_kv_head=2, intermediate_size=32,
                     block_size=32, vocab_size=128, n_experts=2 * p, n_experts_per_tok=2)
    mfu._rows = lambda device, quick: [("tiny", tiny, 2, 16, False), ("moe", moe, 2, 16, False)]
    mfu.time_fn = lambda step, **kw: (step(), step(), 2.0)[-1]  # two steps: the optimizer's state, then one
    torch.manual_seed(rank)  # (each rank's own data under dp / ep)
    assert cli.main(["--suite", "mfu", "--quick", "--out", f"{out}/{rank}", "--device", "cpu"]) == 0
    return {r["op"]: r["notes"] for r in json.loads(open(f"{out}/{rank}/results.json").read())["results"]}


def test_mfu_suite_under_torchrun_runs_tp_and_ep_rows(ranks, tmp_path):
    """With 2 gloo ranks the suite adds FSDP2's data-parallel, llmkern's tensor- and pipeline-parallel rows of its
    first model and the expert-parallel row of its first MoE model, each measured (a failed parallel step would
    leave its row out)."""
    for rows in ranks(2).run(mfu_torchrun_worker, (str(tmp_path),), timeout=120):
        ops = set(rows)
        assert "tiny train step (FSDP2 dp=2, per GPU)" in ops, rows
        assert "tiny train step (llmkern TP tp=2, per GPU)" in ops, rows
        assert "moe train step (llmkern EP ep=2, per GPU)" in ops, rows
        assert "tiny train step (llmkern PP pp=2, per GPU)" in ops, rows
        assert "1F1B over 2 micro-batches" in rows["tiny train step (llmkern PP pp=2, per GPU)"]
        assert "moe train step" in ops and "tiny train step" in ops


def test_cuda_timing_times_several_calls_of_a_slow_step(monkeypatch):
    """triton's do_bench times rep / estimate calls: a 41.6 ms step with rep=40 was ONE timed call. The rep now
    grows with the step's own time (MIN_CUDA_RUNS calls at least), in quick and full mode."""
    triton_testing = pytest.importorskip("triton.testing")
    from llmkern.bench import timing

    seen = []

    def do_bench(fn, warmup, rep, return_mode):  # the calls do_bench times: rep over its estimate, which holds
        seen.append(rep)                         # the call and an L2 clear (0.1 ms), truncated
        calls.append(int(rep / (41.6 + 0.1)))
        return 41.6

    calls = []
    monkeypatch.setattr(timing, "_once_ms", lambda fn: 41.6)
    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    for quick in (True, False):
        assert timing._time_cuda(lambda: None, quick) == 41.6
        assert calls[-1] >= timing.MIN_CUDA_RUNS[quick]  # (rep = MIN * 41.6 timed MIN - 1 calls)
    monkeypatch.setattr(timing, "_once_ms", lambda fn: 0.01)  # fast kernels keep the usual budget
    timing._time_cuda(lambda: None, True)
    assert seen[-1] == 40


def test_attention_mfu_counts_model_flops():
    """The attention suite's TFLOP/s use FlashAttention's backward factor 2.5 (it recomputes Q K^T); its MFU column
    counts model FLOPs (backward 2x the forward), as llmkern.flops does."""
    from llmkern.bench.suites import attention

    f = attention._flops(1, 1, 128, 64, True, "fwd")
    for mode, model in (("fwd", 1.0), ("bwd", 2.0), ("fwd+bwd", 3.0)):
        tflops = attention._flops(1, 1, 128, 64, True, mode) / 1e-3 / 1e12  # the row's TFLOP/s at 1 ms
        assert attention._mfu(tflops, 1e15, mode) == pytest.approx(model * f / 1e-3 / 1e15)
    assert attention._mfu(1.0, None) is None


def test_pipeline_row_microbatches():
    """The pp row's micro-batch count: the most (up to 4 per stage) that divide the batch with m >= p for 1F1B."""
    from llmkern.bench.suites.mfu import pp_microbatches

    assert [pp_microbatches(b, 2) for b in (1, 2, 3, 8, 12, 16)] == [None, 2, 3, 8, 6, 8]
    assert pp_microbatches(3, 4) is None and pp_microbatches(6, 4) == 6 and pp_microbatches(16, 4) == 16


def test_missing_extension_is_named_as_not_built(monkeypatch):
    """Without llmkern._C the reason says it is not built (Python's own wording, from inside llmkern's
    __init__, was "partially initialized module ... circular import")."""
    import sys

    from llmkern import _backend

    import llmkern

    monkeypatch.setitem(sys.modules, "llmkern._C", None)  # (import llmkern._C then raises ImportError)
    monkeypatch.delattr(llmkern, "_C", raising=False)
    for files in ([], ["_C.so"]):  # no library: "not built"; a library that does not load: its own error
        monkeypatch.setattr(_backend, "_ext", None)
        monkeypatch.setattr(_backend, "_ext_error", None)
        monkeypatch.setattr("glob.glob", lambda pattern, _f=files: list(_f))
        assert _backend.extension() is None
        assert ("llmkern._C is not built" in _backend.extension_error()) == (not files)
        assert files == [] or "llmkern._C does not load" in _backend.extension_error()


def test_generate_suite_rows(tmp_path, capsys, monkeypatch):
    """The generate suite times llmkern.generate on both backends, an fp8 cache and sampling: three rows."""
    from llmkern.bench import cli
    from llmkern.bench.suites import generate

    monkeypatch.setattr(generate, "_plan", lambda device, quick: [("llama-tiny", 1, 8, 2, torch.float32)])
    out = tmp_path / "gen"
    assert cli.main(["--suite", "generate", "--out", str(out), "--device", "cpu", "--quick"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["op"] for r in rows] == ["generate greedy", "generate greedy, fp8 kv-cache",
                                       "generate sample (top-k 50, top-p 0.9)"]
    assert all(r["throughput"] > 0 and r["baseline_ms"] > 0 for r in rows)


def test_generate_yields_each_row_when_its_timings_are_done(monkeypatch):
    """The generate suite yields each row as soon as the timings it needs are taken (a run stopped by its
    limit keeps the finished rows); the timings are the same, in the same order."""
    import types

    import torch

    from llmkern.bench.registry import Context
    from llmkern.bench.suites import generate

    calls = []

    def fake_time(fn, device, quick):
        calls.append(fn)
        return float(len(calls))

    monkeypatch.setattr(generate, "time_fn", fake_time)
    monkeypatch.setattr(generate, "_model", lambda name, backend, *a: types.SimpleNamespace(backend=backend,
                                                                                           kv_cache_dtype=None))
    ctx = Context(device=torch.device("cpu"), quick=True, progress=lambda it, **kw: it, out_dir=None)
    seen = []
    for row in generate.run(ctx):
        seen.append((row.op, len(calls), row.ours_ms, row.baseline_ms))
    # timings 1..5: llmkern greedy, prefill, torch backend, fp8 cache, sampling
    assert seen == [("generate greedy", 3, 1.0, 3.0), ("generate greedy, fp8 kv-cache", 4, 4.0, 1.0),
                    ("generate sample (top-k 50, top-p 0.9)", 5, 5.0, 1.0)]
