"""llmkern.top_logprobs (serving-style logprobs) against torch.log_softmax in float64, and
generate(top_logprobs=...). Runs the compiled CPU kernel and the torch-ops path (the reference,
which CUDA uses) on the same cases."""
import pytest
import torch

import llmkern
from llmkern.ops import sampling as ops
from llmkern.reference import sampling as ref

NEG_INF = float("-inf")
BACKENDS = ["op", "reference"]


def run(backend, logits, n, tokens=None, temperature=1.0):
    if backend == "op":
        return llmkern.top_logprobs(logits, n, tokens=tokens, temperature=temperature)
    B = logits.shape[0]
    t = ops._row_param("temperature", temperature, B, logits.device, torch.float32, 0.0, float("inf"),
                       lo_open=True, hi_open=True)
    ids, lps, tlp, rk = ref.top_logprobs(logits, n, t, None if tokens is None else tokens.long(),
                                         chunk_elements=3 * logits.shape[1])  # several chunks
    return ops.TopLogprobs(ids, lps, tlp if tokens is not None else None, rk if tokens is not None else None)


def expected(logits, n, tokens=None, temperature=1.0):
    """float64 oracle: log_softmax, a stable sort (value descending, id ascending), explicit ranks."""
    x = logits.double()
    x = torch.where(x.isnan(), torch.full_like(x, NEG_INF), x)
    t = temperature.double()[:, None] if torch.is_tensor(temperature) else float(temperature)
    pinf = torch.isposinf(x)  # +inf logits share the row's mass: the limit of large equal logits
    y = torch.where(pinf.any(-1, keepdim=True), torch.where(pinf, 0.0, NEG_INF), x / t)
    lp = torch.log_softmax(y, -1)
    finite_rows = (x > NEG_INF).any(-1, keepdim=True)
    lp = torch.where(finite_rows, lp, torch.full_like(lp, NEG_INF))
    order = torch.sort(x + 0.0, dim=-1, descending=True, stable=True).indices[:, :n]
    out = dict(ids=order, logprobs=lp.gather(1, order))
    if tokens is not None:
        tok = tokens.long()[:, None]
        out["token_logprobs"] = lp.gather(1, tok)[:, 0]
        out["token_ranks"] = (x > x.gather(1, tok)).sum(-1) + 1
    return out


def check(got, want, atol=2e-5):
    assert got.ids.dtype == torch.int64 and got.logprobs.dtype == torch.float32
    assert torch.equal(got.ids, want["ids"])
    torch.testing.assert_close(got.logprobs.double(), want["logprobs"], atol=atol, rtol=1e-5)
    if "token_logprobs" in want:
        torch.testing.assert_close(got.token_logprobs.double(), want["token_logprobs"], atol=atol, rtol=1e-5)
        assert got.token_ranks.dtype == torch.int64
        assert torch.equal(got.token_ranks, want["token_ranks"])
    else:
        assert got.token_logprobs is None and got.token_ranks is None


def test_cpu_kernel_is_built():
    assert ops._LOGPROBS_COMPILED, "llmkern._C lacks top_logprobs: rebuild the extension"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,V,n", [(3, 1000, 5), (2, 4099, 20), (5, 37, 37), (1, 70000, 50), (4, 300, 0)])
def test_against_log_softmax(backend, dtype, B, V, n):
    g = torch.Generator().manual_seed(B * V + n)
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, V, (B,), generator=g)
    temperature = torch.rand(B, generator=g) + 0.3  # per row
    got = run(backend, logits, n, tokens, temperature)
    check(got, expected(logits, n, tokens, temperature))
    check(run(backend, logits, n), expected(logits, n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_ranks(backend):
    # few distinct values: ties everywhere, inside the top-n and across its boundary
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (6, 3000), generator=g).float()
    logits[1] = 0.0                      # one big tie: ids 0..n-1, rank 1
    logits[2, ::2] = -0.0                # -0 and +0 are the same logit
    tokens = torch.tensor([5, 7, 2, 0, 2999, 1234])
    for n in (1, 7, 3000):
        check(run(backend, logits, n, tokens), expected(logits, n, tokens))
    # a tied token shares its group's rank: 1 + the count strictly above it
    r = run(backend, logits, 3, tokens)
    top_group = logits == logits.amax(-1, keepdim=True)
    assert torch.equal(r.token_ranks[top_group.gather(1, tokens[:, None])[:, 0]],
                       torch.ones_like(r.token_ranks[top_group.gather(1, tokens[:, None])[:, 0]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inf_and_nan_rows(backend, dtype):
    logits = torch.randn(5, 500).to(dtype)
    logits[0] = NEG_INF                   # nothing finite
    logits[1] = float("nan")              # NaN counts as -inf: the same
    logits[2, ::3] = float("nan")
    logits[3, 10:] = NEG_INF              # only 10 finite tokens, n larger than that
    logits[4, [3, 8]] = float("inf")      # +inf tokens share the mass
    tokens = torch.tensor([4, 9, 3, 400, 8])
    got = run(backend, logits, 12, tokens)
    check(got, expected(logits, 12, tokens))
    assert torch.equal(got.ids[0], torch.arange(12)) and torch.equal(got.ids[1], torch.arange(12))
    assert torch.all(got.logprobs[:2] == NEG_INF) and torch.all(got.token_logprobs[:2] == NEG_INF)
    assert got.token_ranks[:2].tolist() == [1, 1]
    assert got.token_logprobs[2] == NEG_INF and got.token_ranks[2] == 1 + (~logits[2].isnan()).sum()
    assert got.ids[4, :2].tolist() == [3, 8]
    torch.testing.assert_close(got.logprobs[4, :2], torch.full((2,), -0.6931472))
    assert torch.all(got.logprobs[4, 2:] == NEG_INF) and got.token_ranks[4] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_scales_but_keeps_order(backend):
    logits = torch.randn(2, 800) * 3
    tokens = torch.tensor([1, 2])
    cold, hot = run(backend, logits, 10, tokens, 0.5), run(backend, logits, 10, tokens, 2.0)
    assert torch.equal(cold.ids, hot.ids) and torch.equal(cold.token_ranks, hot.token_ranks)
    check(cold, expected(logits, 10, tokens, 0.5))
    check(hot, expected(logits, 10, tokens, 2.0))


def test_strided_and_int32_tokens():
    logits = torch.randn(8, 1200)[::2, :1000]  # non-contiguous rows
    tokens = torch.tensor([3, 999, 0, 500], dtype=torch.int32)
    check(llmkern.top_logprobs(logits, 4, tokens=tokens), expected(logits, 4, tokens))


def test_validation():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="n must be in"):
        llmkern.top_logprobs(x, 11)
    with pytest.raises(ValueError, match="n must be in"):
        llmkern.top_logprobs(x, -1)
    with pytest.raises(TypeError, match="n must be an int"):
        llmkern.top_logprobs(x, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        llmkern.top_logprobs(x, 2, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        llmkern.top_logprobs(x, 2, temperature=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="tokens values"):
        llmkern.top_logprobs(x, 2, tokens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="tokens values"):
        llmkern.top_logprobs(x, 2, tokens=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="tokens must have shape"):
        llmkern.top_logprobs(x, 2, tokens=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="tokens must be an int64"):
        llmkern.top_logprobs(x, 2, tokens=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="logits"):
        llmkern.top_logprobs(x.long(), 2)


def test_op_schema_and_compile():
    x = torch.randn(3, 700).bfloat16()
    tokens = torch.tensor([1, 2, 3])
    t = torch.tensor([1.0, 0.5, 2.0])
    torch.library.opcheck(torch.ops.llmkern.top_logprobs.default, (x, 5, t, tokens),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.llmkern.top_logprobs.default, (x, 0, t, None),
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True)
    def f(logits, tok):
        r = llmkern.top_logprobs(logits, 5, tokens=tok, temperature=0.7)
        return r.ids, r.logprobs, r.token_logprobs, r.token_ranks

    got = ops.TopLogprobs(*f(x, tokens))
    check(got, expected(x, 5, tokens, 0.7))


# ---- generate(top_logprobs=...) ---------------------------------------------------------------------

def _tiny_model():
    from llmkern.models import build

    torch.manual_seed(0)
    return build("llama-tiny", backend="torch", vocab_size=97, n_layer=1, block_size=32).eval()


def _logits_at_each_step(model, seqs, T0):
    """The model's last-position logits for every generated position (full forwards, no cache)."""
    with torch.no_grad():
        return torch.stack([model(seqs[:, :t])[:, -1].float() for t in range(T0, seqs.shape[1])], 1)


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generate_top_logprobs(strategy):
    model = _tiny_model()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(strategy=strategy, return_dict=True)
    if strategy == "sample":
        kw.update(temperature=0.8, top_k=20, seed=3)
    out = llmkern.generate(model, ids, 6, top_logprobs=4, **kw)
    plain = llmkern.generate(model, ids, 6, **kw)
    assert torch.equal(out.sequences, plain.sequences) and plain.top_logprobs is None
    n = out.sequences.shape[1] - 5
    assert out.top_logprob_ids.shape == (2, n, 4) and out.top_logprobs.shape == (2, n, 4)
    assert out.raw_logprobs.shape == (2, n) and out.token_ranks.shape == (2, n)
    raw = torch.log_softmax(_logits_at_each_step(model, out.sequences, 5).double(), -1)
    new = out.sequences[:, 5:]
    torch.testing.assert_close(out.top_logprobs.double(), raw.gather(-1, out.top_logprob_ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.raw_logprobs.double(), raw.gather(-1, new[..., None])[..., 0], atol=1e-4, rtol=1e-4)
    assert torch.all(out.top_logprobs[..., :-1] >= out.top_logprobs[..., 1:])
    if strategy == "greedy":  # the greedy token is the top-1 id, of rank 1
        assert torch.equal(out.top_logprob_ids[..., 0], new)
        assert torch.all(out.token_ranks == 1)
        torch.testing.assert_close(out.raw_logprobs, out.scores)


def test_generate_top_logprobs_errors_and_eos():
    model = _tiny_model()
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="return_dict"):
        llmkern.generate(model, ids, 3, top_logprobs=2)
    with pytest.raises(ValueError, match="beam"):
        llmkern.generate(model, ids, 3, strategy="beam", num_beams=2, top_logprobs=2, return_dict=True)
    with pytest.raises(ValueError, match="top_logprobs must be an int"):
        llmkern.generate(model, ids, 3, top_logprobs=-1, return_dict=True)
    with pytest.raises(ValueError, match="vocabulary"):
        llmkern.generate(model, ids, 3, top_logprobs=98, return_dict=True)
    greedy = llmkern.generate(model, ids, 6)
    eos = int(greedy[0, 5])  # row 0 stops after its second new token
    out = llmkern.generate(model, ids, 6, eos_token_id=eos, top_logprobs=3, return_dict=True)
    done = out.sequences[:, 4:] == eos
    after = (done.long().cumsum(1) - done.long()) > 0  # positions after the row's eos
    assert after.any()
    assert torch.all(out.top_logprob_ids[after] == -1) and torch.all(out.token_ranks[after] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_shape(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(64, 128256, device="cuda", generator=g) * 3).to(dtype)
    logits[0, :5] = logits[0, 5]  # a tie
    tokens = torch.randint(0, 128256, (64,), device="cuda", generator=g)
    got = llmkern.top_logprobs(logits, 20, tokens=tokens, temperature=0.9)
    want = expected(logits, 20, tokens, 0.9)
    check(got, want)
    cpu = llmkern.top_logprobs(logits.cpu(), 20, tokens=tokens.cpu(), temperature=0.9)
    assert torch.equal(cpu.ids, got.ids.cpu()) and torch.equal(cpu.token_ranks, got.token_ranks.cpu())
