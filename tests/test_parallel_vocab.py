"""Vocabulary-parallel embedding, LM head and loss (tensor_parallelize(..., vocab_parallel=True)).

Two gloo ranks on 127.0.0.1; tiny zoo models (GPT: tied head; Llama: untied), a vocabulary that the
world size does not divide; against the unsharded model: logits, the loss with and without logits,
and the gradients of the embedding / LM head shards (the rows of the unsharded gradients) and of a
replicated parameter; greedy generation gives the same tokens.
"""
import copy

import pytest
import torch


def vocab_worker(rank, world_size):
    from llmkern.models import GPT, Llama, get_config
    from llmkern.parallel import tensor_parallelize
    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead, shard_rows

    out = {}
    # (gemma2-style: the final logit soft-cap, in the sharded loss too)
    for arch, cls, kw in (("gpt-tiny", GPT, {}), ("llama-tiny", Llama, {}),
                          ("llama-tiny", Llama, dict(logit_softcap=0.05, norm_offset=1.0, post_norms=True))):
        cfg = get_config(arch).replace(vocab_size=101, **kw)  # not divisible by 2
        torch.manual_seed(0)
        ref = cls(cfg, backend="torch")
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[0, :2] = -100
        logits_ref, loss_ref = ref(ids, labels)
        loss_ref.backward()
        model = tensor_parallelize(copy.deepcopy(ref), vocab_parallel=True)
        emb = next(m for m in model.modules() if isinstance(m, VocabParallelEmbedding))
        head = model.lm_head
        tied = head.weight is emb.weight
        logits, loss_full = model(ids, labels)
        none, loss = model(ids, labels, return_logits=False)
        model.zero_grad()
        loss.backward()
        from llmkern.generation import generate

        with torch.no_grad():
            same_tokens = torch.equal(generate(model, ids[:, :4], 5), generate(ref, ids[:, :4], 5))
        lo, hi, S = shard_rows(101, None)
        ref_emb = ref.wte if arch.startswith("gpt") else ref.embed_tokens
        norm = "ln_f" if arch.startswith("gpt") else "norm"
        out[arch + ("-softcap" if kw else "")] = dict(
            is_head=isinstance(head, VocabParallelLMHead), tied=tied, ref_tied=ref.lm_head.weight is ref_emb.weight,
            shard=tuple(emb.weight.shape), none=none is None, same_tokens=same_tokens,
            logits=(logits - logits_ref).abs().max().item(),
            loss_full=abs(loss_full.item() - loss_ref.item()), loss=abs(loss.item() - loss_ref.item()),
            emb_grad=(emb.weight.grad[:hi - lo] - ref_emb.weight.grad[lo:hi]).abs().max().item(),
            pad_grad=emb.weight.grad[hi - lo:].abs().max().item() if hi - lo < S else 0.0,
            head_grad=0.0 if tied else (head.weight.grad[:hi - lo] - ref.lm_head.weight.grad[lo:hi]).abs().max().item(),
            norm_grad=(getattr(model, norm).weight.grad - getattr(ref, norm).weight.grad).abs().max().item())
    return out


@pytest.fixture
def pool(pool2):
    return pool2  # (conftest's session pool: starting ranks costs seconds)


def test_vocab_parallel_zoo_models_equal_the_unsharded_ones(pool):
    results = pool.run(vocab_worker, timeout=120)
    for rank, res in enumerate(results):
        for arch, r in res.items():
            assert r["is_head"] and r["none"] and r["same_tokens"], r
            assert r["tied"] == r["ref_tied"] == arch.startswith("gpt"), r  # a tied head shares the shard
            assert r["shard"][0] == 51, r  # ceil(101 / 2) rows; rank 1 holds 50 real + 1 padding
            for key in ("logits", "loss_full", "loss", "emb_grad", "head_grad", "norm_grad"):
                assert r[key] < 1e-5, (rank, arch, key, r)
            assert r["pad_grad"] == 0.0, r


def edge_worker(rank, world_size):
    """Out-of-range labels / ids, every label ignored, a LoRA lm_head: as the unsharded model does."""
    from llmkern.models import GPT, get_config
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import inject_lora

    cfg = get_config("gpt-tiny").replace(vocab_size=101)
    torch.manual_seed(0)
    ref = GPT(cfg, backend="torch")
    model = tensor_parallelize(copy.deepcopy(ref), vocab_parallel=True)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, labels in (("label_V", ids.clone().index_fill_(1, torch.tensor([3]), 101)),
                         ("label_neg", ids.clone().index_fill_(1, torch.tensor([3]), -5))):
        try:
            model(ids, labels, return_logits=False)
            out[name] = "no error"
        except IndexError as exc:
            out[name] = str(exc)
    try:
        model(ids.clone().index_fill_(1, torch.tensor([0]), 101))
        out["id_V"] = "no error"
    except (IndexError, ValueError) as exc:  # (the zoo's own check on CPU: ValueError)
        out["id_V"] = str(exc)
    ignored = torch.full_like(ids, -100)
    _, loss_ref = ref(ids, ignored)
    loss_ref.backward()
    _, loss = model(ids, ignored, return_logits=False)
    loss.backward()
    out["ignored_nan"] = bool(loss.isnan()) and bool(loss_ref.isnan())
    out["ignored_grads_zero"] = all(bool((p.grad == 0).all()) for p in model.parameters() if p.grad is not None)
    out["ref_grads_zero"] = all(bool((p.grad == 0).all()) for p in ref.parameters() if p.grad is not None)
    lora = GPT(cfg.replace(tie_embeddings=False))
    inject_lora(lora, ["lm_head", "q_proj"])
    try:
        tensor_parallelize(lora, vocab_parallel=True)
        out["lora"] = "no error"
    except ValueError as exc:
        out["lora"] = str(exc)
    return out


def test_vocab_parallel_edge_cases_match_torch(pool):
    """Regressions: out-of-range labels gave a finite loss and out-of-range ids a zero embedding (torch
    raises); with every label ignored the gradients were NaN (torch: NaN loss, zero gradients)."""
    for r in pool.run(edge_worker, timeout=120):
        assert "out of bounds" in r["label_V"] and "out of bounds" in r["label_neg"], r
        assert "out of range" in r["id_V"] or "must lie in [0, vocab_size=101)" in r["id_V"], r
        assert r["ignored_nan"] and r["ref_grads_zero"] and r["ignored_grads_zero"], r
        assert "LoRA" in r["lora"], r


def test_vocab_parallel_needs_a_process_group():
    from llmkern.models import GPT, get_config
    from llmkern.parallel import tensor_parallelize

    model = GPT(get_config("gpt-tiny"))
    with pytest.raises(RuntimeError, match="no process group"):
        tensor_parallelize(model, vocab_parallel=True)


def autocast_worker(rank, world_size):
    """Under torch.autocast (bf16) the tensor-parallel layers compute like nn.Linear does (they raised a
    dtype error before): loss and gradients close to the unsharded model's under the same autocast."""
    from llmkern.models import Llama, get_config
    from llmkern.parallel import tensor_parallelize

    cfg = get_config("llama-tiny")
    torch.manual_seed(0)
    ref = Llama(cfg, backend="torch")
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    out = {}
    for vocab_parallel in (False, True):
        model = tensor_parallelize(copy.deepcopy(ref), vocab_parallel=vocab_parallel)
        ref.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, want = ref(ids, ids)
            _, got = model(ids, ids, return_logits=not vocab_parallel)
        want.backward()
        got.backward()
        dtypes = {p.grad.dtype for p in model.parameters()}
        rel = abs(got.item() - want.item()) / abs(want.item())
        g_rel = ((model.norm.weight.grad - ref.norm.weight.grad).norm() / ref.norm.weight.grad.norm()).item()
        out[vocab_parallel] = dict(rel=rel, g_rel=g_rel, dtypes=dtypes, got_dtype=got.dtype)
    return out


def test_tensor_parallel_layers_under_autocast(pool):
    for res in pool.run(autocast_worker, timeout=120):
        for vocab_parallel, r in res.items():
            assert r["rel"] < 2e-2 and r["g_rel"] < 5e-2, (vocab_parallel, r)
            assert r["dtypes"] == {torch.float32}, r  # gradients reach the float32 parameters


def chunk_worker(rank, world_size):
    """vocab_parallel_loss straight on a sharded head (with and without bias, chunks of 5 rows or one
    chunk, ignored rows) against F.cross_entropy of the unsharded F.linear: loss, dh, the shard rows of
    dW and db."""
    import torch.nn.functional as F

    from llmkern.parallel.vocab import VocabParallelLMHead, shard_rows

    out = {}
    gen = torch.Generator().manual_seed(3)
    V, d, N = 37, 16, 23
    lo, hi, _ = shard_rows(V, None)
    for bias, cap in ((False, None), (True, None), (True, 3.0)):  # cap: Gemma 2's final logit soft-cap
        full = torch.nn.Linear(d, V, bias=bias)
        with torch.no_grad():
            full.weight.copy_(torch.randn(V, d, generator=gen))
            if bias:
                full.bias.copy_(torch.randn(V, generator=gen))
        h0 = torch.randn(N, d, generator=gen)
        y = torch.randint(0, V, (N,), generator=gen)
        y[::4] = -100
        h_ref = h0.clone().requires_grad_()
        logits = full(h_ref)
        want = F.cross_entropy(logits if cap is None else cap * torch.tanh(logits / cap), y)
        want.backward()
        for chunk in (None, 5):
            head = VocabParallelLMHead.from_linear(full, None)
            h = h0.clone().requires_grad_()
            got = head.vocab_parallel_loss(h.view(1, N, d), y.view(1, N), chunk_size=chunk, softcap=cap)
            got.backward()
            err = max(abs(got.item() - want.item()), (h.grad - h_ref.grad).abs().max().item(),
                      (head.weight.grad[:hi - lo] - full.weight.grad[lo:hi]).abs().max().item())
            if bias:
                err = max(err, (head.bias.grad[:hi - lo] - full.bias.grad[lo:hi]).abs().max().item())
            out[(bias, cap, chunk)] = err
        full.zero_grad()
    return out


def test_vocab_parallel_loss_in_chunks_equals_cross_entropy(pool):
    for res in pool.run(chunk_worker, timeout=120):
        for key, err in res.items():
            assert err < 1e-5, (key, err)


def fp16_scale_worker(rank, world_size):
    """float16 vocab_parallel_loss under a GradScaler-sized loss scale: the gradients were formed with 1 / n_valid
    folded into the float16 dlogits and dh (underflow whatever the scale), and the backward cast g to float16
    (2^16 is float16's inf)."""
    import torch.nn.functional as F

    from llmkern.parallel.vocab import VocabParallelLMHead

    gen = torch.Generator().manual_seed(5)
    N, d, V = 4096, 8, 64
    full = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        full.weight.copy_(torch.randn(V, d, generator=gen) * 0.05)
    full = full.half()
    h0 = torch.randn(N, d, generator=gen).half()
    y = torch.randint(0, V, (N,), generator=gen)
    hd, wd = h0.double().requires_grad_(), full.weight.detach().double().requires_grad_()
    F.cross_entropy(hd @ wd.t(), y).backward()
    head = VocabParallelLMHead.from_linear(full, None)
    lo, hi = rank * V // world_size, (rank + 1) * V // world_size
    h = h0.clone().requires_grad_()
    S = 65536.0
    (head.vocab_parallel_loss(h.view(1, N, d), y.view(1, N), chunk_size=N // 4) * S).backward()
    rel = lambda a, b: ((a.double() / S - b).norm() / b.norm()).item()  # noqa: E731
    return dict(dh=rel(h.grad, hd.grad), dw=rel(head.weight.grad[:hi - lo], wd.grad[lo:hi]))


def test_vocab_parallel_loss_float16_loss_scale(pool):
    for res in pool.run(fp16_scale_worker, timeout=120):
        assert res["dh"] < 2e-3 and res["dw"] < 2e-3, res


def bf16_dw_worker(rank, world_size):
    """The sharded head's weight gradient kept until the backward, measured with saved_tensors_hooks on each rank:
    bfloat16 for a bfloat16 shard (2·S·d bytes; it kept float32's 4·S·d), float32 for float16 and float32, as
    training_memory(..., loss="fused", tp=world_size) estimates; the gradients against the unsharded float64 ones,
    and the bfloat16 dW against the float32-kept one's: equal up to a last-place rounding (the mean's 1 / n_valid
    is applied in float32 before the one rounding; a g other than a power of two rounds the product again)."""
    import torch.nn.functional as F

    import llmkern.ops.cross_entropy as ce
    from llmkern.memory import saved_activations, training_memory
    from llmkern.models import get_config
    from llmkern.parallel.vocab import VocabParallelLMHead, shard_rows

    cfg = get_config("llama-tiny").replace(vocab_size=101)  # (not divisible by 2)
    B, T, V, d = 2, 16, cfg.vocab_size, cfg.n_embd
    lo, hi, S = shard_rows(V, None)
    gen = torch.Generator().manual_seed(6)
    h0 = torch.randn(B, T, d, generator=gen)
    w0 = torch.randn(V, d, generator=gen) * 0.3
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, :5] = -100
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        full = torch.nn.Linear(d, V, bias=False)
        with torch.no_grad():
            full.weight.copy_(w0)
        head = VocabParallelLMHead.from_linear(full.to(dt), None)
        h = h0.to(dt).requires_grad_()
        hd, wd = h.detach().double().requires_grad_(), full.weight.detach().double().requires_grad_()
        F.cross_entropy((hd @ wd.t()).view(-1, V), y.view(-1)).backward()
        terms = training_memory(cfg, B, T, dtype=name, loss="fused", tp=world_size).terms()
        for g in (1.0, 3.0):
            def grads():
                with saved_activations(exclude=head) as saved:
                    loss = head.vocab_parallel_loss(h, y, chunk_size=7)
                gh, gw = torch.autograd.grad(loss * g, (h, head.weight))
                return saved, gh, gw

            saved, gh, gw = grads()
            orig = ce._dw_dtype
            ce._dw_dtype = lambda t: torch.float64 if t == torch.float64 else torch.float32  # float32 kept, as before
            try:
                saved32, gh32, gw32 = grads()
            finally:
                ce._dw_dtype = orig
            ulps = 0 if dt != torch.bfloat16 else (1 if g == 1.0 else 2)
            rel = lambda a, b: ((a.double() / g - b).norm() / b.norm()).item()  # noqa: E731
            out[(name, g)] = dict(
                bytes=saved.bytes, bytes32=saved32.bytes,
                estimate=terms["loss_input_grad"] + terms["loss_weight_grad"] + 8,  # + n_valid (int64)
                kept=sorted((shape, t) for shape, t, n in saved.tensors if n), gw_dtype=gw.dtype,
                same_dh=torch.equal(gh, gh32),
                dw_ulps=bool(((gw.float() - gw32.float()).abs() <= gw32.float().abs() * 2 ** -8 * ulps).all()),
                dh=rel(gh, hd.grad), dw=rel(gw[:hi - lo], wd.grad[lo:hi]), pad=gw[hi - lo:].abs().max().item()
                if hi - lo < S else 0.0)
    return dict(out=out, N=B * T, d=d, S=S)


def test_vocab_parallel_loss_keeps_a_bfloat16_weight_gradient_in_bfloat16(pool):
    for r in pool.run(bf16_dw_worker, timeout=120):
        N, d, S = r["N"], r["d"], r["S"]
        for (name, g), m in r["out"].items():
            dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
            kept_dw = torch.bfloat16 if name == "bf16" else torch.float32
            assert m["kept"] == sorted([((), torch.int64), ((N, d), dt), ((S, d), kept_dw)]), m
            assert m["bytes"] == N * d * dt.itemsize + S * d * kept_dw.itemsize + 8 == m["estimate"], m
            assert m["bytes32"] == m["bytes"] + (S * d * 2 if name == "bf16" else 0), m
            assert m["gw_dtype"] == dt and m["same_dh"] and m["dw_ulps"] and m["pad"] == 0.0, m
            tol = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-6}[name]
            assert m["dh"] < tol and m["dw"] < tol, (name, g, m)


def no_grad_worker(rank, world_size):
    """vocab_parallel_loss under torch.no_grad (an evaluation): the same loss, and no gradient work (the
    chunked loss forms its gradients in the forward; under no_grad it formed dh and the float32 dW all the
    same, since an autograd.Function's needs_input_grad ignores the grad mode)."""
    import llmkern.ops.cross_entropy as ce
    from llmkern.parallel.vocab import VocabParallelLMHead

    gen = torch.Generator().manual_seed(4)
    full = torch.nn.Linear(16, 37, bias=True)
    head = VocabParallelLMHead.from_linear(full, None)
    h = torch.randn(2, 11, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 37, (2, 11), generator=gen)
    want = head.vocab_parallel_loss(h, y, chunk_size=4).item()
    calls = []
    orig = ce._add_mm
    ce._add_mm = lambda *a: calls.append(1) or orig(*a)
    try:
        with torch.no_grad():
            got = head.vocab_parallel_loss(h, y, chunk_size=4)
    finally:
        ce._add_mm = orig
    return dict(err=abs(got.item() - want), grad_fn=got.grad_fn is None, dw_gemms=len(calls))


def test_vocab_parallel_loss_under_no_grad_forms_no_gradients(pool):
    for r in pool.run(no_grad_worker, timeout=120):
        assert r["err"] < 1e-6 and r["grad_fn"], r
        assert r["dw_gemms"] == 0, r


def mismatch_worker(rank, world_size):
    """Ranks that pass different shapes to the vocabulary-parallel layers: every rank raises a ValueError
    naming the argument (gloo aborted the process: "Received data size doesn't match expected size")."""
    import time

    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead

    torch.manual_seed(0)
    emb = VocabParallelEmbedding.from_embedding(torch.nn.Embedding(10, 4))
    head = VocabParallelLMHead.from_linear(torch.nn.Linear(4, 10))
    n = 5 + rank
    cases = {
        "ids": lambda: emb(torch.randint(0, 10, (2 + rank, 3))),
        "logits h": lambda: head(torch.randn(n, 4)),
        "loss h": lambda: head.vocab_parallel_loss(torch.randn(n, 4), torch.randint(0, 10, (n,))),
        # h the same everywhere, labels wrong on one rank only (it used to raise there alone)
        "loss labels": lambda: head.vocab_parallel_loss(torch.randn(5, 4), torch.randint(0, 10, (5 + rank,))),
        # the same on every rank, but wrong: h 8 wide for a 4-wide head (reshaped into other rows: a loss came
        # back), labels of h's size in another shape, chunk_size -1 (no chunk ran: loss 0)
        "loss width": lambda: head.vocab_parallel_loss(torch.randn(3, 8), torch.randint(0, 10, (6,))),
        "loss label shape": lambda: head.vocab_parallel_loss(torch.randn(2, 3, 4), torch.randint(0, 10, (3, 2))),
        "loss chunk": lambda: head.vocab_parallel_loss(torch.randn(5, 4), torch.randint(0, 10, (5,)), chunk_size=-1),
        # the loss on one rank, the logits on the other: the same first check, then different collectives (a gloo
        # abort on the loss's rank, NaN logits on the other)
        "loss or logits": lambda: (head.vocab_parallel_loss(torch.randn(5, 4), torch.randint(0, 10, (5,))) if rank == 0
                                   else head(torch.randn(5, 4))),
    }
    out = {}
    t0 = time.perf_counter()
    for name, fn in cases.items():
        try:
            fn()
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
        with torch.no_grad():  # the group still works
            if not torch.equal(emb(torch.tensor([[1, 7]])), torch.nn.functional.embedding(
                    torch.tensor([[1, 7]]), _full_weight(emb))):
                out[name] += " / the group is broken afterwards"
    out["seconds"] = time.perf_counter() - t0
    return out


def _full_weight(emb):
    import torch.distributed as dist

    parts = [torch.empty_like(emb.weight) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, emb.weight.detach().contiguous())
    return torch.cat(parts)[:emb.num_embeddings]


def test_vocab_parallel_shape_mismatch_raises_on_every_rank(pool):
    for r in pool.run(mismatch_worker, timeout=60):
        for name, want in (("ids", "VocabParallelEmbedding: ids"), ("logits h", "VocabParallelLMHead: h"),
                           ("loss h", "vocab_parallel_loss: h"), ("loss labels", "vocab_parallel_loss: labels")):
            assert want in r[name] and "differs across" in r[name], (name, r)
        assert "different calls (rank 0: the loss, rank 1: the logits)" in r["loss or logits"], r
        for name, want in (("loss width", "h must be [..., 4]"), ("loss label shape", "labels must have shape"),
                           ("loss chunk", "chunk_size must be None or an int >= 1")):
            assert want in r[name], (name, r)
        assert r["seconds"] < 10, r  # no process-group timeout


def padding_idx_worker(rank, world_size):
    """An embedding with padding_idx (transformers' Llama-family pad_token_id) sharded by vocabulary: the same
    output, and the padding row (held by one rank) gets no gradient; each rank's rows equal the unsharded ones."""
    import torch.distributed as dist

    from llmkern.parallel.vocab import VocabParallelEmbedding, shard_rows

    torch.manual_seed(0)
    results = []
    for pad in (1, 9):  # (on rank 0's and on rank 1's shard of 11 rows)
        emb = torch.nn.Embedding(11, 4, padding_idx=pad)
        ids = torch.tensor([[pad, 3, pad, 9, 1, 10]])
        par = VocabParallelEmbedding.from_embedding(emb)
        out = par(ids)
        out.pow(2).sum().backward()
        emb(ids).pow(2).sum().backward()
        lo, hi, _ = shard_rows(11, dist.group.WORLD)
        results.append(((out - emb(ids)).abs().max().item(),
                        (par.weight.grad[:hi - lo] - emb.weight.grad[lo:hi]).abs().max().item(),
                        float(emb.weight.grad[pad].abs().max())))
    return results


def test_vocab_parallel_embedding_keeps_padding_idx(pool):
    for res in pool.run(padding_idx_worker, timeout=60):
        for out_err, grad_err, pad_grad in res:
            assert out_err < 1e-6 and grad_err < 1e-6 and pad_grad == 0.0, res


def argument_check_worker(rank, world_size):
    """Arguments nn.Embedding / linear_cross_entropy refuse or normalise: a negative padding_idx given to the
    constructor matched no rank's rows (the row of id V - 1 got its gradient), one out of range was taken; a NaN or
    inf softcap gave a NaN loss, a negative one or True was taken for a cap (linear_cross_entropy raises)."""
    import torch.nn.functional as F

    import llmkern
    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead, _shard, shard_rows

    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 4, padding_idx=-1)  # (nn.Embedding: padding_idx 10)
    par = VocabParallelEmbedding(torch.nn.Parameter(_shard(emb.weight.detach(), None)), 11, None, padding_idx=-1)
    ids = torch.tensor([[10, 3, 10, 0]])
    par(ids).pow(2).sum().backward()
    emb(ids).pow(2).sum().backward()
    lo, hi, _ = shard_rows(11, None)
    out = dict(pad=par.padding_idx, grad=(par.weight.grad[:hi - lo] - emb.weight.grad[lo:hi]).abs().max().item())
    for bad in (11, -12, 2.0):
        try:
            VocabParallelEmbedding(torch.nn.Parameter(_shard(emb.weight.detach(), None)), 11, None, padding_idx=bad)
            out[f"pad {bad}"] = "no error"
        except ValueError as exc:
            out[f"pad {bad}"] = str(exc)
    full = torch.nn.Linear(4, 11)
    head = VocabParallelLMHead.from_linear(full, None)
    h, y = torch.randn(5, 4), torch.randint(0, 11, (5,))
    for cap in (float("nan"), float("inf"), -2.0, True):
        seen = []
        for fn in (lambda: head.vocab_parallel_loss(h, y, softcap=cap),
                   lambda: llmkern.linear_cross_entropy(h, full.weight, y, bias=full.bias, softcap=cap)):
            try:
                seen.append(f"no error: {fn().item()}")
            except (TypeError, ValueError) as exc:
                seen.append(type(exc).__name__)
        out[f"softcap {cap}"] = seen
    logits = full(h)
    out["softcap 0"] = abs(head.vocab_parallel_loss(h, y, softcap=0).item() - F.cross_entropy(logits, y).item())
    return out


def test_vocab_parallel_arguments_checked_as_the_unsharded_ops_do(pool):
    for r in pool.run(argument_check_worker, timeout=60):
        assert r["pad"] == 10 and r["grad"] < 1e-6, r
        for bad in (11, -12, 2.0):
            assert "padding_idx must be None or an int in [-11, 11)" in r[f"pad {bad}"], r
        for cap in (float("nan"), float("inf"), -2.0, True):
            seen = r[f"softcap {cap}"]
            assert seen[0] == seen[1] and seen[0] in ("TypeError", "ValueError"), (cap, seen)
        assert r["softcap 0"] < 1e-6, r


def shard_check_worker(rank, world_size):
    import torch.nn as nn

    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead

    seen = {}
    for name, make in (("emb full table", lambda: VocabParallelEmbedding(nn.Parameter(torch.randn(8, 4)), 8, None)),
                       ("head 3 rows", lambda: VocabParallelLMHead(nn.Parameter(torch.randn(3, 4)), None, 8, None)),
                       ("head bias", lambda: VocabParallelLMHead(nn.Parameter(torch.randn(4, 4)),
                                                                 nn.Parameter(torch.zeros(8)), 8, None))):
        try:
            make()
            seen[name] = "accepted"
        except ValueError as exc:
            seen[name] = str(exc)
    seen["right"] = type(VocabParallelEmbedding(nn.Parameter(torch.randn(4, 4)), 8, None)).__name__
    return seen


def test_vocab_parallel_constructors_check_the_shard(pool):
    """A full table (or a shard of another split) given to the constructors gave wrong rows, or logits of the
    wrong width, silently."""
    for seen in pool.run(shard_check_worker, timeout=60):
        assert "weight_shard must be this rank's" in seen["emb full table"], seen
        assert "weight_shard must be this rank's" in seen["head 3 rows"], seen
        assert "bias_shard must be [4]" in seen["head bias"], seen
        assert seen["right"] == "VocabParallelEmbedding", seen
