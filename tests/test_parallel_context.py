"""Context parallelism (llmkern.parallel.context): the sequence sharded over ranks, K/V all-gathered.

gloo ranks on 127.0.0.1 through llmkern.parallel.launch.RankPool (a pool of 2 and one of 4, started once
per module). Against the single-process computation on the full sequence (fp32):
context_parallel_attention's output and dq/dk/dv (zigzag and contiguous, causal or not, GQA/MQA, windows,
softcap, chunk lengths that are no power of two), shard/gather round trips and positions, and zoo GPT /
Llama models under context_parallelize: logits, the loss and every parameter gradient after
all_reduce_gradients, also on a 2 x 2 tensor x context parallel mesh (4 ranks). float16, bfloat16 autocast
and the Triton kernels (interpreter) against the unsharded op; torch.compile against eager. Memory: the
bytes autograd saves per call are this rank's q, k, v, output and LSE, below the gathered K/V that the
former implementation held (measured with saved_tensors_hooks), and the backward issues one all-gather and
one reduce-scatter. Errors: no process group, lengths that 2p does not divide, KV cache, attention_mask,
attention dropout.
"""
import copy
import os

import pytest
import torch


TOL = 2e-5


# ---- workers (top level: the spawned ranks import them) -----------------------------------------

def _attention_cases(p):
    cases = []
    for layout in ("zigzag", "contiguous"):
        for causal in (True, False):
            for H, Hk in ((4, 4), (4, 2), (4, 1)):  # MHA, GQA, MQA
                cases.append(dict(layout=layout, causal=causal, H=H, Hk=Hk))
            windows = [(3, 0), (5, None)] if causal else [(2, 3), (None, 2), (4, None), (0, 0)]
            cases += [dict(layout=layout, causal=causal, H=4, Hk=2, window=w) for w in windows]
        cases.append(dict(layout=layout, causal=True, H=2, Hk=1, softcap=5.0, scale=0.3, window=(4, 0)))
    return cases


def attention_worker(rank, p, chunk):
    """Max |error| of the output and dq/dk/dv shards against llmkern.attention on the full sequence."""
    from llmkern import attention
    from llmkern.parallel import context_parallel_attention, shard_sequence

    out = []
    for case in _attention_cases(p):
        layout, H, Hk = case["layout"], case["H"], case["Hk"]
        n = 2 * p if layout == "zigzag" else p
        B, T, D = 2, n * chunk, 8
        g = torch.Generator().manual_seed(len(out))  # the same full tensors on every rank
        q, k, v, dy = (torch.randn(B, h, T, D, generator=g) for h in (H, Hk, Hk, H))
        kw = dict(causal=case["causal"], window=case.get("window"), softcap=case.get("softcap"),
                  scale=case.get("scale"))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention(*full, **kw)
        (ref * dy).sum().backward()
        loc = [shard_sequence(t, None, 2, layout).requires_grad_() for t in (q, k, v)]
        got = context_parallel_attention(*loc, layout=layout, **kw)
        (got * shard_sequence(dy, None, 2, layout)).sum().backward()
        errs = {"out": (got - shard_sequence(ref.detach(), None, 2, layout)).abs().max().item()}
        for name, a, b in zip(("dq", "dk", "dv"), loc, full):
            errs[name] = (a.grad - shard_sequence(b.grad, None, 2, layout)).abs().max().item()
        out.append((case, errs))
    return out


def _saved_bytes(fn):
    """(fn(), bytes of the distinct storages autograd saves for the backward while fn runs): a saved view
    keeps its whole storage alive."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _old_context_attention(q, k, v, layout, **kw):
    """The former implementation (K/V gathered by an autograd op, llmkern.attention per chunk on slices of
    it): autograd keeps the gathered K/V until the backward. The memory test's "before"."""
    from llmkern import attention
    from llmkern.parallel import comm, gather_sequence
    from llmkern.parallel.context import _chunk_calls

    kv = gather_sequence(torch.stack((k, v)), None, 3, layout)
    group = comm.resolve_group(None)
    calls = _chunk_calls(q.shape[2], comm.world_size(group), comm.rank(group), layout, kw.pop("causal"), -1, -1)
    c = q.shape[2] // len(calls)
    return torch.cat([attention(q.narrow(2, s * c, c), kv[0, :, :, lo:hi], kv[1, :, :, lo:hi], causal=True, **kw)
                      for s, lo, hi, _ in calls], 2)


def memory_worker(rank, p):
    """Bytes saved for the backward by context_parallel_attention and by the former implementation,
    the bound they are held to, and the collectives the backward issues."""
    from llmkern.parallel import comm, context_parallel_attention, shard_sequence

    res = {}
    for layout in ("zigzag", "contiguous"):
        B, H, T, D = 1, 2, 16 * p, 16
        g = torch.Generator().manual_seed(3)
        # (clones: a contiguous shard is a view of the full tensor, whose storage would be counted)
        q, k, v = (shard_sequence(torch.randn(B, H, T, D, generator=g), None, 2, layout).clone().requires_grad_()
                   for _ in range(3))
        out, new = _saved_bytes(lambda: context_parallel_attention(q, k, v, causal=True, layout=layout))
        _, old = _saved_bytes(lambda: _old_context_attention(q, k, v, layout, causal=True))
        local = 4 * q.numel() * q.element_size() + B * H * q.shape[2] * 4  # q, k, v, out, fp32 LSE
        calls, real = [], (comm.all_gather_into, comm.reduce_scatter_into)
        comm.all_gather_into = lambda *a, **kw: calls.append("all_gather") or real[0](*a, **kw)
        comm.reduce_scatter_into = lambda *a, **kw: calls.append("reduce_scatter") or real[1](*a, **kw)
        try:
            out.sum().backward()
        finally:
            comm.all_gather_into, comm.reduce_scatter_into = real
        res[layout] = dict(new=new, old=old, local=local, gathered=2 * B * H * T * D * 4, backward=calls)
    return res


def dtype_worker(rank, p):
    """Max relative error against the unsharded llmkern.attention in float16 (reference path), under
    bfloat16 autocast, and in float32 on the Triton kernels (the interpreter on CPU), with the output
    dtype and the backend that ran."""
    from llmkern import attention
    from llmkern.ops.attention import _backend_for
    from llmkern.parallel import context_parallel_attention, shard_sequence

    res = {}
    cases = (("fp16", torch.float16, None, False), ("autocast", torch.float32, None, True),
             ("triton", torch.float32, "triton", False))
    for name, dtype, backend, autocast in cases:
        if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        g = torch.Generator().manual_seed(5)
        q, k, v, dy = (torch.randn(1, h, 8 * p, 16, generator=g).to(dtype) for h in (4, 2, 2, 4))
        kw = dict(causal=True, window=(5, 0), softcap=4.0)
        old = os.environ.get("LLMKERN_BACKEND")
        os.environ["LLMKERN_BACKEND"] = backend or old or ""
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                full = [t.clone().requires_grad_() for t in (q, k, v)]
                ref = attention(*full, **kw)
                (ref.float() * dy).sum().backward()
                loc = [shard_sequence(t, None, 2).requires_grad_() for t in (q, k, v)]
                got = context_parallel_attention(*loc, **kw)
                (got.float() * shard_sequence(dy, None, 2)).sum().backward()
            ran = _backend_for(q.device, got.dtype)
        finally:
            os.environ.pop("LLMKERN_BACKEND") if old is None else os.environ.update(LLMKERN_BACKEND=old)
        pairs = [(got, ref.detach())] + [(a.grad, b.grad) for a, b in zip(loc, full)]
        errs = [((a.float() - shard_sequence(b.float(), None, 2)).abs().max() / b.float().abs().max()).item()
                for a, b in pairs]
        res[name] = dict(err=max(errs), dtype=str(got.dtype), grad_dtype=str(loc[0].grad.dtype), backend=ran)
    return res


def compile_worker(rank, p):
    """context_parallel_attention inside torch.compile (graph breaks at the collectives, as before): the
    output and gradients against eager."""
    from llmkern.parallel import context_parallel_attention, shard_sequence

    g = torch.Generator().manual_seed(9)
    q, k, v, dy = (shard_sequence(torch.randn(1, h, 8 * p, 8, generator=g), None, 2) for h in (4, 2, 2, 4))
    fn = lambda a, b, c: context_parallel_attention(a, b, c, window=(3, 0))  # noqa: E731
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager")):
        loc = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*loc)
        (out * dy).sum().backward()
        outs.append([out.detach()] + [t.grad for t in loc])
    return [(a - b).abs().max().item() for a, b in zip(*outs)]


def shard_worker(rank, p):
    from llmkern.parallel import context_parallel_positions, gather_sequence, shard_sequence

    res = {}
    for layout in ("zigzag", "contiguous"):
        T = 4 * p * 3
        x = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(7))
        w = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(8))
        local = shard_sequence(x, None, 1, layout)
        grads = {}
        for reduce_grad in (True, False):
            xl = local.clone().requires_grad_()
            back = gather_sequence(xl, None, 1, layout, reduce_grad=reduce_grad)
            (back * w).sum().backward()  # every rank computes the same function: reduce_grad sums p copies
            grads[reduce_grad] = xl.grad
        ids = torch.arange(3 * T).view(3, T)
        res[layout] = dict(
            local_shape=tuple(local.shape), round_trip=torch.equal(back.detach(), x),
            neg_dim=torch.equal(shard_sequence(x, None, -2, layout), local),
            grad_slice=torch.allclose(grads[False], shard_sequence(w, None, 1, layout)),
            grad_sum=torch.allclose(grads[True], p * shard_sequence(w, None, 1, layout)),
            positions=context_parallel_positions(T, None, layout).tolist(),
            positions_small=context_parallel_positions(4 * p, None, layout).tolist(),
            ids_dim0=torch.equal(shard_sequence(ids.t(), None, 0, layout).t(), shard_sequence(ids, None, 1, layout)))
    return res


def _grad_errors(model, ref):
    errs, missing = {}, []
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        if (a.grad is None) != (b.grad is None):
            missing.append(name)
        elif a.grad is not None:
            # relative to the gradient's largest entry; a floor for the (near-zero) key-bias gradients
            errs[name] = (a.grad - b.grad).abs().max().item() / (b.grad.abs().max().item() + 1e-4)
    return errs, missing


def zoo_worker(rank, p):
    """GPT and Llama (GQA; sliding window; contiguous layout; the fused loss; Gemma 2's options: attention
    scale and soft-caps, sandwich norms; Mixtral with its load-balancing loss) under context_parallelize
    against the unsharded model on the full sequence."""
    from llmkern.models import GPT, Llama, get_config
    from llmkern.parallel import all_reduce_gradients, context_parallelize, shard_sequence

    variants = [("gpt", GPT, get_config("gpt-tiny"), "zigzag", True),
                ("llama", Llama, get_config("llama-tiny"), "zigzag", True),
                ("llama-window", Llama, get_config("llama-tiny", sliding_window=5), "zigzag", False),
                ("llama-contiguous", Llama, get_config("llama-tiny"), "contiguous", True),
                ("gpt-contiguous", GPT, get_config("gpt-tiny"), "contiguous", False),
                ("gemma2-style", Llama, get_config("llama-tiny", activation="gelu_tanh", norm_offset=1.0, post_norms=True,
                                                   scale_embeddings=True, attn_scale=4.0, attn_softcap=0.5,
                                                   logit_softcap=3.0), "zigzag", True),
                # the load-balancing loss pools its expert statistics over the ranks (per-rank copies were wrong)
                ("mixtral-aux", Llama, get_config("mixtral-tiny", router_aux_loss_coef=0.5), "zigzag", True)]
    out = {}
    for name, cls, cfg, layout, return_logits in variants:
        torch.manual_seed(0)
        ref = cls(cfg, backend="torch")
        T = 4 * p * 3
        ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[0, :5] = -100
        labels[1, T // 2:] = -100  # the ranks hold different numbers of valid labels
        logits_ref, loss_ref = ref(ids, labels)
        loss_ref.backward()
        model = context_parallelize(copy.deepcopy(ref), None, layout)
        if not return_logits:
            model.backend = "llmkern"  # linear_cross_entropy on the local rows
        local = lambda t: shard_sequence(t, None, 1, layout)  # noqa: E731
        logits, loss = model(local(ids), local(labels), return_logits=return_logits)
        model.zero_grad()
        loss.backward()
        all_reduce_gradients(model)
        errs, missing = _grad_errors(model, ref)
        out[name] = dict(
            loss=abs(loss.item() - loss_ref.item()),
            logits=0.0 if logits is None else (logits - local(logits_ref)).abs().max().item(),
            grad=max(errs.values()), worst=max(errs, key=errs.get), n_grads=len(errs), missing=missing)
    # a rank whose tokens are all ignored (no valid label): the global mean still matches
    cfg = get_config("llama-tiny")
    torch.manual_seed(0)
    ref = Llama(cfg, backend="torch")
    ids = torch.randint(0, cfg.vocab_size, (1, 4 * p), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    labels[0, 2] = ids[0, 2]  # only position 1 has a target: its rank alone has a valid label
    _, loss_ref = ref(ids, labels)
    loss_ref.backward()
    model = context_parallelize(copy.deepcopy(ref))
    _, loss = model(shard_sequence(ids), shard_sequence(labels))
    model.zero_grad()
    loss.backward()
    all_reduce_gradients(model)
    errs, missing = _grad_errors(model, ref)
    out["one-valid-label"] = dict(loss=abs(loss.item() - loss_ref.item()), logits=0.0, grad=max(errs.values()),
                                  worst=max(errs, key=errs.get), n_grads=len(errs), missing=missing)
    return out


def tp_cp_worker(rank, world_size):
    """A 2 x 2 mesh: tensor parallelism over ranks {0, 1} / {2, 3}, context parallelism over {0, 2} /
    {1, 3}: a Llama's loss, logits and gradients (replicated ones whole, sharded q_proj / o_proj by rows /
    columns) equal the unsharded model's."""
    import torch.distributed as dist

    from llmkern.models import Llama, get_config
    from llmkern.parallel import all_reduce_gradients, context_parallelize, shard_sequence, tensor_parallelize

    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # (every rank creates every group)
    cp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, cp, t = tp_groups[rank // 2], cp_groups[rank % 2], rank % 2
    cfg = get_config("llama-tiny")
    torch.manual_seed(0)
    ref = Llama(cfg, backend="torch")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    logits_ref, loss_ref = ref(ids, ids)
    loss_ref.backward()
    model = context_parallelize(tensor_parallelize(copy.deepcopy(ref), tp), cp)
    logits, loss = model(shard_sequence(ids, cp), shard_sequence(ids, cp))
    loss.backward()
    all_reduce_gradients(model, cp)
    errs = {n: (a.grad - b.grad).abs().max().item()
            for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()) if a.shape == b.shape}
    for i, layer in enumerate(model.layers):
        q, o = ref.layers[i].self_attn.q_proj.weight.grad, ref.layers[i].self_attn.o_proj.weight.grad
        errs[f"{i}.q_proj"] = (layer.self_attn.q_proj.weight.grad - q.chunk(2, 0)[t]).abs().max().item()
        errs[f"{i}.o_proj"] = (layer.self_attn.o_proj.weight.grad - o.chunk(2, 1)[t]).abs().max().item()
    return dict(loss=abs(loss.item() - loss_ref.item()), n=len(errs), grad=max(errs.values()),
                logits=(logits - shard_sequence(logits_ref, cp)).abs().max().item())


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def error_worker(rank, p):
    from llmkern.generation import generate
    from llmkern.models import GPT, Llama, get_config
    from llmkern.parallel import context_parallel_attention, context_parallelize, gather_sequence, shard_sequence

    q = torch.randn(1, 2, 6, 4)
    kodd = torch.randn(1, 2, 5, 4)
    model = context_parallelize(Llama(get_config("llama-tiny")))
    ids = torch.randint(0, 256, (2, 8))
    gpt = context_parallelize(GPT(get_config("gpt-tiny").replace(dropout=0.1)))
    from llmkern.parallel import pipeline_parallelize, tensor_parallelize

    tp_model = tensor_parallelize(Llama(get_config("llama-tiny")))  # over the same ranks (both defaults: WORLD)
    cp_model = context_parallelize(Llama(get_config("llama-tiny")))
    piped = Llama(get_config("llama-tiny"))
    pipeline_parallelize(piped, n_microbatches=2)
    return dict(
        labels_one_rank=_error(lambda: model(ids[:, :4], ids[:, :4] if rank == 0 else None)),
        labels_batch=_error(lambda: model(ids[:, :4], ids[:, :4] if rank == 0 else ids[:1, :4])),
        tp_same_ranks=_error(lambda: context_parallelize(tp_model)),
        cp_then_tp_same_ranks=_error(lambda: tensor_parallelize(cp_model)),
        after_pipeline=_error(lambda: context_parallelize(piped)),
        tp_after_pipeline=_error(lambda: tensor_parallelize(piped)),
        odd_local=_error(lambda: context_parallel_attention(kodd, kodd, kodd)),
        odd_gather=_error(lambda: gather_sequence(torch.randn(2, 5))),
        odd_shard=_error(lambda: shard_sequence(torch.randn(2, 10))),  # 10 % (2p = 4)
        contiguous_ok=tuple(shard_sequence(torch.randn(2, 10), None, 1, "contiguous").shape),
        bad_layout=_error(lambda: context_parallel_attention(q, q, q, layout="ring")),
        mismatch=_error(lambda: context_parallel_attention(q, q[:, :, :4], q)),
        odd_model=_error(lambda: model(torch.randint(0, 256, (2, 3)))),
        too_long=_error(lambda: model(torch.randint(0, 256, (2, 66)))),  # 2 x 66 > block_size 128
        cache=_error(lambda: model(ids, cache=model.new_cache(2))),
        generate=_error(lambda: generate(model, ids, 3)),
        generate_nocache=_error(lambda: generate(model, ids, 3, use_cache=False)),
        attention_mask=_error(lambda: model(ids, attention_mask=torch.ones(2, 8, dtype=torch.long))),
        dropout=_error(lambda: gpt.train()(ids)),
        twice=_error(lambda: context_parallelize(model)),
        not_zoo=_error(lambda: context_parallelize(torch.nn.Linear(2, 2))),
        capacity=_error(lambda: context_parallelize(Llama(get_config("mixtral-tiny", moe_capacity_factor=1.0)))),
        # one rank's out-of-vocabulary id raised on that rank only: the other waited in the K/V all-gather
        one_rank_bad_id=_error(lambda: model(ids[:, :4] if rank else ids[:, :4].clone().fill_(999))),
        # ranks that shard differently: the loss came back silently wrong
        layout_differs=_error(lambda: context_parallelize(Llama(get_config("llama-tiny")),
                                                          layout="zigzag" if rank == 0 else "contiguous")),
        config_differs=_error(lambda: context_parallelize(Llama(get_config("llama-tiny",
                                                                           sliding_window=4 if rank else None)))),
        one_rank_bad_layout=_error(lambda: context_parallelize(Llama(get_config("llama-tiny")),
                                                               layout="ring" if rank == 0 else "zigzag")),
        # wide heads: llmkern.attention's limit (the zoo falls back to SDPA; context parallelism cannot)
        wide_heads=_error(lambda: context_parallelize(Llama(get_config("llama-tiny", head_dim=288)))))


def ep_cp_worker(rank, p):
    """A MoE model both expert- and context-parallel over the same ranks: all_reduce_gradients sums the replicated
    parameters' gradients but leaves the partitioned experts' (complete on their rank) alone; every gradient
    equals the unsharded model's (this rank's experts: its slice)."""
    from llmkern.models import Llama, get_config
    from llmkern.parallel import all_reduce_gradients, context_parallelize, expert_parallelize, shard_sequence

    torch.manual_seed(0)
    ref = Llama(get_config("mixtral-tiny", router_aux_loss_coef=0.2), backend="torch")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    _, loss_ref = ref(ids, ids)
    loss_ref.backward()
    model = expert_parallelize(context_parallelize(copy.deepcopy(ref)))
    _, loss = model(shard_sequence(ids), shard_sequence(ids))
    loss.backward()
    all_reduce_gradients(model)
    refp, worst, n = dict(ref.named_parameters()), 0.0, 0
    for name, prm in model.named_parameters():
        want = refp[name].grad
        if prm.shape != want.shape:  # this rank's experts
            k = prm.shape[0]
            want = want[rank * k:(rank + 1) * k]
        worst = max(worst, ((prm.grad - want).abs().max() / want.abs().max()).item())
        n += 1
    return dict(loss=abs(loss.item() - loss_ref.item()), grad=worst, n=n)


# ---- tests -----------------------------------------------------------------------------------------

def _check_attention(results):
    for rank, res in enumerate(results):
        for case, errs in res:
            for key, err in errs.items():
                assert err < TOL, (rank, case, key, err)


def test_context_parallel_attention_equals_full_attention_2_ranks(pool2):
    _check_attention(pool2.run(attention_worker, (3,), timeout=120))  # chunks of 3 tokens: T = 12 / 6


def test_context_parallel_attention_equals_full_attention_4_ranks(pool4):
    _check_attention(pool4.run(attention_worker, (2,), timeout=120))  # T = 16 (zigzag) / 8 (contiguous)


def test_context_parallel_attention_saves_only_local_tensors(pool4):
    """What autograd holds per call is this rank's q, k, v, output and LSE, not the gathered K/V (p times
    the local K/V); the backward gathers K/V again and reduce-scatters dK/dV."""
    for res in pool4.run(memory_worker, timeout=60):
        for layout, r in res.items():
            assert r["old"] >= r["gathered"], (layout, r)  # the measurement sees a held gathered K/V
            assert r["new"] <= r["local"] < r["gathered"], (layout, r)
            assert r["backward"] == ["all_gather", "reduce_scatter"], (layout, r)


def test_context_parallel_attention_dtypes_and_backends(pool2):
    for res in pool2.run(dtype_worker, timeout=120):
        fp16, amp = res["fp16"], res["autocast"]
        assert fp16["dtype"] == fp16["grad_dtype"] == "torch.float16" and fp16["err"] < 5e-3, res
        # autocast: bf16 attention, float32 gradients of the float32 inputs (as llmkern.attention)
        assert amp["dtype"] == "torch.bfloat16" and amp["grad_dtype"] == "torch.float32" and amp["err"] < 3e-2, res
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":  # (conftest sets it on CPU)
            # the kernels' backward from the saved output and LSE
            assert res["triton"]["backend"] == "triton" and res["triton"]["err"] < 1e-5, res


def test_context_parallel_attention_under_torch_compile(pool2):
    for errs in pool2.run(compile_worker, timeout=120):
        assert max(errs) < 1e-6, errs


@pytest.mark.parametrize("p", [2, 4])
def test_shard_gather_round_trip_and_positions(p, pool2, pool4):
    results = (pool2 if p == 2 else pool4).run(shard_worker, timeout=60)
    T = 12 * p
    for layout in ("zigzag", "contiguous"):
        seen = []
        for rank, res in enumerate(results):
            r = res[layout]
            assert r["local_shape"] == (2, T // p, 5), r
            assert r["round_trip"] and r["neg_dim"] and r["ids_dim0"], r
            assert r["grad_slice"] and r["grad_sum"], r  # reduce_grad=False: a slice; True: the sum over ranks
            c = T // (2 * p) if layout == "zigzag" else T // p
            chunks = [rank, 2 * p - 1 - rank] if layout == "zigzag" else [rank]
            assert r["positions"] == [j * c + i for j in chunks for i in range(c)], (layout, rank, r["positions"])
            seen += r["positions"]
        assert sorted(seen) == list(range(T))
    if p == 2:  # the zigzag layout written out: 4 chunks of 2, rank 0 holds the first and the last
        assert results[0]["zigzag"]["positions_small"] == [0, 1, 6, 7]
        assert results[1]["zigzag"]["positions_small"] == [2, 3, 4, 5]


def test_zoo_models_under_context_parallelize_equal_the_unsharded_ones(pool2):
    for rank, res in enumerate(pool2.run(zoo_worker, timeout=120)):
        for name, r in res.items():
            assert not r["missing"] and r["n_grads"] > 10, (rank, name, r)
            assert r["loss"] < 1e-5 and r["logits"] < 1e-5, (rank, name, r)
            assert r["grad"] < 1e-5, (rank, name, r)  # relative to the largest entry of each gradient


def test_context_parallel_composes_with_tensor_parallel(pool4):
    for r in pool4.run(tp_cp_worker, timeout=60):
        assert r["n"] >= 11 and r["loss"] < 1e-5 and r["logits"] < 1e-5 and r["grad"] < 1e-6, r


def float64_worker(rank, p):
    """A float64 model: each rank's token share n_local / n was int64 / int64 = float32 (loss 1.7e-7 off)."""
    import copy

    from llmkern.models import GPT, get_config
    from llmkern.parallel import all_reduce_gradients, context_parallelize, shard_sequence

    torch.manual_seed(0)
    ref = GPT(get_config("gpt-tiny"), backend="torch").double()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # valid targets: rank 0 holds 3 of 8, rank 1 5 of 8
    _, want = ref(ids, labels)
    want.backward()
    m = context_parallelize(copy.deepcopy(ref), None, "contiguous")
    m.zero_grad()
    _, loss = m(shard_sequence(ids, None, 1, "contiguous"), shard_sequence(labels, None, 1, "contiguous"))
    loss.backward()
    all_reduce_gradients(m)
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(m.parameters(), ref.parameters()))
    return loss.dtype, abs(loss.item() - want.item()), worst


def test_context_parallel_float64_is_float64_exact(pool2):
    for dtype, loss_err, grad_err in pool2.run(float64_worker, timeout=60):
        assert dtype == torch.float64 and loss_err < 1e-12 and grad_err < 1e-12, (loss_err, grad_err)


def test_context_parallel_errors(pool2):
    for r in pool2.run(error_worker, timeout=60):
        for key in ("odd_local", "odd_gather", "odd_shard", "odd_model"):
            assert r[key].startswith("ValueError") and "not divisible" in r[key] and "pad" in r[key], (key, r[key])
        assert r["contiguous_ok"] == (2, 5)
        assert r["bad_layout"].startswith("ValueError") and "layout" in r["bad_layout"], r
        assert r["mismatch"].startswith("ValueError"), r
        assert r["too_long"].startswith("ValueError") and "block_size" in r["too_long"], r
        assert r["cache"].startswith("NotImplementedError") and "KV cache" in r["cache"], r["cache"]
        for key in ("generate", "generate_nocache"):  # (without a cache it ran on shards, silently wrong)
            assert r[key].startswith("NotImplementedError") and "context-parallel" in r[key], (key, r[key])
        assert r["attention_mask"].startswith("NotImplementedError") and "attention_mask" in r["attention_mask"], r
        assert r["dropout"].startswith("NotImplementedError") and "dropout" in r["dropout"], r
        assert r["twice"].startswith("ValueError") and "already" in r["twice"], r
        assert r["not_zoo"].startswith("TypeError"), r
        assert r["capacity"].startswith("NotImplementedError") and "moe_capacity_factor" in r["capacity"], r
        assert r["one_rank_bad_id"].startswith("ValueError") and "rank(s) [0]" in r["one_rank_bad_id"], r
        assert r["wide_heads"].startswith("NotImplementedError") and "288" in r["wide_heads"], r
        assert r["layout_differs"].startswith("ValueError") and "rank 1: 'contiguous'" in r["layout_differs"], r
        assert r["config_differs"].startswith("ValueError") and "different models" in r["config_differs"], r
        assert r["one_rank_bad_layout"].startswith("ValueError") and (
            "layout must be one of" in r["one_rank_bad_layout"] or "rank(s) [0]" in r["one_rank_bad_layout"]), r
        for key in ("labels_one_rank", "labels_batch"):  # (the label shift's all-gather hung, or gloo aborted)
            assert r[key].startswith("ValueError") and "labels" in r[key], (key, r[key])
        # tensor and context parallelism over the same ranks gathered other heads' K/V: silently wrong logits
        for key in ("tp_same_ranks", "cp_then_tp_same_ranks"):
            assert r[key].startswith("ValueError") and "grid" in r[key], (key, r[key])
        # a pipelined model made context-parallel hung at its next step
        assert r["after_pipeline"].startswith("ValueError") and "pipeline" in r["after_pipeline"], r
        assert r["tp_after_pipeline"].startswith("ValueError") and "pipeline" in r["tp_after_pipeline"], r


def test_expert_and_context_parallel_over_the_same_ranks(pool2):
    for r in pool2.run(ep_cp_worker, timeout=60):
        assert r["n"] > 10 and r["loss"] < 1e-5 and r["grad"] < 1e-5, r


def test_context_parallel_needs_a_process_group():
    from llmkern.models import GPT, get_config
    from llmkern.parallel import context_parallel_attention, context_parallelize, shard_sequence

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="no process group"):
        context_parallel_attention(q, q, q)
    with pytest.raises(RuntimeError, match="no process group"):
        shard_sequence(torch.randn(2, 8))
    model = GPT(get_config("gpt-tiny"))
    with pytest.raises(RuntimeError, match="no process group"):
        context_parallelize(model)
    assert model.context_parallel is None  # left unchanged
