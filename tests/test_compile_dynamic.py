"""Python scalars that change between calls under torch.compile: traced as symbols, they must neither break the
graph (fullgraph) nor pin the graph to one value (a recompile per decode step)."""
import pytest
import torch

import llmkern


def _compiles(fn, calls, **compile_kw):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, **compile_kw)
    outs = [compiled(*args) for args in calls]
    return counter.frame_count, outs


def test_changing_float_arguments_trace():
    """math.isfinite on a traced float (a SymFloat) broke fullgraph: eps, softcap, scale."""
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    n, outs = _compiles(lambda x, eps: llmkern.rms_norm(x, w, eps=eps), [(x, 1e-6), (x, 1e-5), (x, 1e-4)])
    assert n <= 2
    torch.testing.assert_close(outs[1], llmkern.rms_norm(x, w, eps=1e-5))
    q = torch.randn(1, 2, 8, 16)
    n, outs = _compiles(lambda q, c, s: llmkern.attention(q, q, q, causal=True, softcap=c, scale=s),
                        [(q, 30.0, 0.25), (q, 50.0, 0.125), (q, 20.0, 0.5)])
    assert n <= 2
    torch.testing.assert_close(outs[2], llmkern.attention(q, q, q, causal=True, softcap=20.0, scale=0.5))
    n, _ = _compiles(lambda x, eps: llmkern.rms_norm(x, w, eps=eps), [(x, 1e-6), (x[:3], 1e-5)], dynamic=True)
    assert n == 1


@pytest.mark.parametrize("fn", ["sample", "filter"])
def test_changing_positions_and_seeds_do_not_recompile(fn):
    """float(value).is_integer() on a traced int pinned it: a compiled decode step recompiled for every position
    (and failed at the recompile limit under fullgraph)."""
    logits = torch.randn(2, 50)
    if fn == "sample":
        calls = [(logits, pos, 100 + pos) for pos in range(6)]
        n, outs = _compiles(lambda lg, pos, seed: llmkern.sample(lg, top_p=0.9, seed=seed, position=pos), calls)
        for (lg, pos, seed), out in zip(calls, outs):
            assert torch.equal(out, llmkern.sample(lg, top_p=0.9, seed=seed, position=pos))
    else:
        calls = [(logits, k) for k in range(1, 7)]
        n, outs = _compiles(lambda lg, k: llmkern.top_k_top_p_filter(lg, top_k=k), calls)
        for (lg, k), out in zip(calls, outs):
            assert torch.equal(out, llmkern.top_k_top_p_filter(lg, top_k=k))
    assert n <= 2


@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_zoo_model_with_attention_mask_compiles_fullgraph(backend):
    """The zoo dropped an all-ones mask by reading it (bool(kpm.all())): a data-dependent branch that broke
    fullgraph for every padded training batch and prompt."""
    from llmkern.models import Llama

    torch.manual_seed(0)
    model = Llama("llama-tiny", backend=backend)
    ids = torch.randint(0, 100, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :3] = 0
    labels = ids.masked_fill(am == 0, -100)
    want = model(ids, labels, attention_mask=am)[1]
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, labels, attention_mask=am)[1]
    torch.testing.assert_close(got, want)


def test_varlen_attention_compiles_fullgraph_on_cpu():
    """The CPU path of attention_varlen looped over sequences read from cu_seqlens on the host (.tolist()):
    a graph break, so fullgraph failed. Under compile it is one block-diagonal masked attention; eager keeps the
    loop. Values and gradients equal the eager op for causal / window / ALiBi / sinks, GQA, an empty sequence."""
    torch.manual_seed(0)
    lq, lk = [3, 0, 5, 1], [4, 2, 5, 3]
    cu_q = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11, 14], dtype=torch.int32)
    q = torch.randn(sum(lq), 4, 8, requires_grad=True)
    k, v = (torch.randn(sum(lk), 2, 8, requires_grad=True) for _ in range(2))
    slopes, sinks = torch.rand(4, 4), torch.randn(4)
    for kw in (dict(causal=True), dict(window=(1, 1), alibi_slopes=slopes), dict(causal=True, sinks=sinks)):
        def fn(q, k, v, cu_q, cu_k, kw=kw):
            return llmkern.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)

        n, [(out, lse)] = _compiles(fn, [(q, k, v, cu_q, cu_k)])
        ref_out, ref_lse = fn(q, k, v, cu_q, cu_k)
        assert n == 1
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        for a, b in zip(grads, torch.autograd.grad(ref_out, (q, k, v), g)):
            torch.testing.assert_close(a, b)


def test_first_compiled_call_of_a_process_compiles_once(monkeypatch):
    """triton_available() filled a lazy module-level cache while Dynamo traced: the guard on the (empty) cache failed
    at the next call, so a process whose first use of an op was compiled compiled everything twice."""
    from llmkern import _backend

    monkeypatch.setattr(_backend, "_TRITON", [])  # as in a fresh process
    x, w = torch.randn(4, 32), torch.rand(32)
    n, _ = _compiles(lambda x: llmkern.rms_norm(x, w), [(x,), (x,), (x,)])
    assert n == 1


def test_zoo_model_compiled_first_in_a_fresh_process_compiles_once():
    """The zoo's attention ops were imported lazily on the first forward: traced, that fill was a guard the call
    itself broke, so a fresh process's first compiled forward (and backward) compiled twice."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch._dynamo.testing import CompileCounter\n"
        "from llmkern.models import build\n"
        "model = build('llama-tiny', backend='llmkern')\n"
        "counter = CompileCounter()\n"
        "step = torch.compile(lambda ids: model(ids, ids)[1], backend=counter, fullgraph=True, dynamic=True)\n"
        "for T in (9, 13, 17):\n"
        "    step(torch.randint(0, 100, (2, T))).backward()\n"
        "print('frames', counter.frame_count)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "frames 1", out.stdout
