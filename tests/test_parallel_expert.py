"""Expert parallelism (llmkern.parallel.expert): whole experts partitioned over the ranks, every rank with its
own tokens, against the unsharded layer / model (single process, same weights) on the concatenation of all
ranks' tokens.

The ranks are gloo processes on 127.0.0.1 (llmkern.parallel.launch.RankPool, one pool of 2 ranks and one of 4
per module). The losses are sums over the ranks' tokens (weighted by fixed random tensors), so the unsharded
gradient of the summed loss is what every expert-parallel gradient must be: an expert weight's is this rank's
slice of it; a replicated parameter's after all_reduce_replicated_grads is all of it; x's and the routing
weights' are this rank's rows of it.
"""
import copy

import pytest
import torch
import torch.distributed as dist

import llmkern
from llmkern.models import Llama, get_config
from llmkern.models.llama import MoE
from llmkern.parallel import tensor_parallelize
from llmkern.parallel.expert import (ExpertParallelMoE, LocalExperts, all_reduce_replicated_grads,
                                     expert_parallelize, expert_parameter_names)
from llmkern.testing import collect_close, raise_failures

TOL = dict(atol=1e-4, rtol=1e-4)
LAYER = dict(n_embd=32, moe_ffn_dim=24)  # (mixtral-tiny's attention sizes; only the MoE layer is built)
QWEN2_MOE = dict(moe_ffn_dim=48, moe_shared_ffn_dim=40, moe_layers=(1,), moe_renormalize=False,
                 router_aux_loss_coef=0.05)


# ---- helpers (top level: the spawned ranks import them) -----------------------------------------

def _close(tag, actual, expected, failures, **tol):
    collect_close(tag, actual, expected, failures, **{**TOL, **tol})


class _Route:
    """llmkern.moe_route (which the zoo MoE and ExpertParallelMoE both call), patched: records the routing
    weights (their gradients are checked) and, with drop=True, drops every slot routed to an expert
    e ≡ 1 (mod 3), a rule on the routing itself, so the unsharded and the sharded layers drop the same slots."""

    def __init__(self, drop=False):
        self.drop, self.weights, self.ids = drop, [], []

    def __enter__(self):
        self.original = llmkern.moe_route
        llmkern.moe_route = self
        return self

    def __exit__(self, *exc):
        llmkern.moe_route = self.original

    def __call__(self, logits, k, renormalize=True):
        weights, ids = self.original(logits, k, renormalize=renormalize)
        if self.drop:
            ids = torch.where(ids % 3 == 1, -1, ids)
        if weights.requires_grad:
            weights.retain_grad()
        self.weights.append(weights)
        self.ids.append(ids)
        return weights, ids


def _reference_layer(cfg, backend, skew, seed):
    torch.manual_seed(seed)
    ref = MoE(cfg, backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in ref.parameters():  # experts of order 1: outputs and gradients of order 1
            prm.copy_(torch.randn(prm.shape, generator=g) * (0.3 if prm.dim() == 3 else 0.5))
        if skew:  # orthonormal router rows (times 4): a token built from rows a, b is routed to a and b
            q = torch.linalg.qr(torch.randn(cfg.n_embd, cfg.n_embd, generator=g))[0]
            ref.gate.weight.copy_(4 * q[:cfg.n_experts])
    return ref


def _tokens(ref, r, p, skew, seed):
    """Rank r's tokens [1 + r % 2, 5, d] (uneven counts across ranks). skew: built from the router rows of
    allowed experts only, rank 0 its own experts' (so it sends nothing to any other rank), the others
    anything but the last expert (which then receives no token at all)."""
    g = torch.Generator().manual_seed(1000 * seed + r)
    B, T, d, E, k = 1 + r % 2, 5, ref.gate.weight.shape[1], ref.n_experts, ref.top_k
    if not skew:
        return torch.randn(B, T, d, generator=g)
    allowed = list(range(E // p)) if r == 0 else list(range(E - 1))
    rows = ref.gate.weight.detach() / 4
    picks = torch.stack([torch.randperm(len(allowed), generator=g)[:k] for _ in range(B * T)])
    x = rows[torch.tensor(allowed)[picks]].sum(1) * 3 + 0.05 * torch.randn(B * T, d, generator=g)
    return x.view(B, T, d)


def _check_skew(tag, ids_by_rank, E, p, failures):
    """The skewed routing really is: rank 0 routes only to its own experts, nobody to expert E - 1."""
    if not bool((ids_by_rank[0] < E // p).all()):
        failures.append(f"{tag}: skew setup: rank 0 routes outside its own experts")
    if any(bool((ids == E - 1).any()) for ids in ids_by_rank):
        failures.append(f"{tag}: skew setup: some token is routed to expert {E - 1}")


def _expert_grads(tag, ep, ref, rank, p, failures):
    E = ref.n_experts
    lo, hi = rank * E // p, (rank + 1) * E // p
    for name in ("gate_up_proj", "down_proj"):
        _close(f"{tag}: grad of experts.{name}", getattr(ep.experts, name).grad,
               getattr(ref.experts, name).grad[lo:hi], failures)


# ---- workers ------------------------------------------------------------------------------------

def layer_worker(rank, p, cases):
    """ExpertParallelMoE.from_moe on one layer: y, the gradients of x, of the routing weights, of this rank's
    experts and (after all_reduce_replicated_grads) of the router and the shared expert."""
    failures = []
    for backend, E, k, mode, shared in cases:
        tag = f"{backend} E={E} k={k} {mode} shared={shared} p={p}"
        cfg = get_config("mixtral-tiny", n_experts=E, n_experts_per_tok=k, moe_shared_ffn_dim=16 if shared else 0,
                         **LAYER)
        skew, drop = mode == "skew", mode == "drop"
        ref = _reference_layer(cfg, backend, skew, seed=E + k)
        ep = ExpertParallelMoE.from_moe(copy.deepcopy(ref))
        if tuple(ep.experts.gate_up_proj.shape) != (E // p, 2 * cfg.moe_ffn_dim, cfg.n_embd):
            failures.append(f"{tag}: local experts {tuple(ep.experts.gate_up_proj.shape)}")
        xs = [_tokens(ref, r, p, skew, seed=E + k) for r in range(p)]
        ws = [torch.randn(x.shape, generator=torch.Generator().manual_seed(50 + r)) for r, x in enumerate(xs)]
        lo = sum(x.shape[0] for x in xs[:rank])
        rows = slice(lo, lo + xs[rank].shape[0])
        x_all = torch.cat(xs).requires_grad_(True)
        with _Route(drop) as route_ref:
            y_ref = ref(x_all)
        (y_ref * torch.cat(ws)).sum().backward()
        x = xs[rank].clone().requires_grad_(True)
        with _Route(drop) as route:
            y = ep(x)
        (y * ws[rank]).sum().backward()
        all_reduce_replicated_grads(ep)
        if drop and not bool((route.ids[0] < 0).any()):
            failures.append(f"{tag}: drop setup: no slot dropped on this rank")
        if skew:
            ids_all = route_ref.ids[0]
            bounds = torch.tensor([0] + [x.shape[0] for x in xs]).cumsum(0).tolist()
            _check_skew(tag, [ids_all[a:b] for a, b in zip(bounds, bounds[1:])], E, p, failures)
        _close(f"{tag}: y", y, y_ref[rows], failures)
        _close(f"{tag}: grad of x", x.grad, x_all.grad[rows], failures)
        _close(f"{tag}: grad of the routing weights", route.weights[0].grad, route_ref.weights[0].grad[rows], failures)
        _expert_grads(tag, ep, ref, rank, p, failures)
        ref_params = dict(ref.named_parameters())
        for name, prm in ep.named_parameters():
            if not name.startswith("experts."):  # router, shared expert and its gate: replicated
                _close(f"{tag}: grad of {name}", prm.grad, ref_params[name].grad, failures)
        gu, dn = ep.experts.gathered()
        full = torch.cat([ref.experts.gate_up_proj.flatten(), ref.experts.down_proj.flatten()])
        _close(f"{tag}: gathered experts", torch.cat([gu.flatten(), dn.flatten()]), full, failures, atol=0, rtol=0)
    raise_failures(rank, failures)
    return len(cases)


def _batches(vocab, p, step):
    return [torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(100 * step + r)) for r in range(p)]


def _load(source, backend):
    if isinstance(source, str):  # a checkpoint directory
        import warnings

        from llmkern.models import from_hf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return from_hf(source, backend=backend)
    config, opts = source
    torch.manual_seed(0)
    model = Llama(get_config(config, **opts), backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # decisive routers: no near-tie whose rounding could flip a token's experts
        for n, prm in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    return model


def model_worker(rank, p, source, backend, steps):
    """expert_parallelize on a whole zoo model: per-rank loss (with the load-balancing loss where the config
    has it), every gradient after all_reduce_replicated_grads, and AdamW steps against the unsharded model
    trained on the sum of the ranks' losses."""
    failures = []
    ref = _load(source, backend)
    ep = expert_parallelize(copy.deepcopy(ref))
    n_ep = sum(isinstance(m, ExpertParallelMoE) for m in ep.modules())
    if n_ep != sum(type(m) is MoE for m in ref.modules()) or not n_ep:
        failures.append(f"{n_ep} ExpertParallelMoE layers")
    ref_params, mods = dict(ref.named_parameters()), dict(ep.named_modules())
    expert_names = set(expert_parameter_names(ep))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    opt = torch.optim.AdamW(ep.parameters(), lr=1e-3, eps=1e-6)
    for step in range(steps):
        tag = f"{source} {backend} p={p} step {step}"
        batches = _batches(ref.config.vocab_size, p, step)
        opt_ref.zero_grad()
        losses_ref = [ref(b, labels=b)[1] for b in batches]
        sum(losses_ref).backward()
        opt.zero_grad()
        _, loss = ep(batches[rank], labels=batches[rank])
        loss.backward()
        all_reduce_replicated_grads(ep)
        _close(f"{tag}: loss", loss, losses_ref[rank], failures)
        for name, prm in ep.named_parameters():
            expected = ref_params[name].grad
            if name in expert_names:
                owner = mods[name.rsplit(".", 1)[0]]
                expected = expected[owner.first:owner.first + owner.n_local]
            _close(f"{tag}: grad of {name}", prm.grad, expected, failures)
        opt_ref.step()
        opt.step()
    for name, prm in ep.named_parameters():
        expected = ref_params[name]
        if name in expert_names:
            owner = mods[name.rsplit(".", 1)[0]]
            expected = expected[owner.first:owner.first + owner.n_local]
        _close(f"after {steps} AdamW steps: {name}", prm, expected, failures)
    raise_failures(rank, failures)
    return sorted(expert_names)


def compile_worker(rank, p):
    """torch.compile of an expert-parallel model: the exchange runs outside the graph, the result and the
    gradients are eager's."""
    failures = []
    ref = _load(("mixtral-tiny", {}), "torch")
    eager, compiled = expert_parallelize(copy.deepcopy(ref)), expert_parallelize(copy.deepcopy(ref))
    fn = torch.compile(compiled, backend="aot_eager")
    b = _batches(ref.config.vocab_size, p, 0)[rank]
    outs = [m(b, labels=b)[1] for m in (eager, fn)]
    for out in outs:
        out.backward()
    _close("compiled loss", outs[1], outs[0], failures)
    for (name, a), (_, c) in zip(eager.named_parameters(), compiled.named_parameters()):
        _close(f"compiled grad of {name}", c.grad, a.grad, failures)
    raise_failures(rank, failures)
    return True


def _expect_error(what, fn, *match):
    try:
        fn()
    except ValueError as exc:
        assert all(m in str(exc) for m in match), f"{what}: {exc}"
        return str(exc)
    raise AssertionError(f"{what}: no ValueError")


def errors_worker(rank, p):
    """Every error is raised on every rank (the pool's 30 s collective timeout would turn a hang into a
    failure), and the group is still usable after it."""
    torch.manual_seed(0)  # (the same weights on every rank: tensor_parallelize compares them; run alone, this test
    # had the pool's unseeded generators and failed there)
    seen = []
    odd = Llama(get_config("mixtral-tiny", n_experts=p + 1), backend="torch")
    seen.append(_expect_error("E % p", lambda: expert_parallelize(odd), f"n_experts={p + 1}", f"world size {p}"))
    assert not any(isinstance(m, ExpertParallelMoE) for m in odd.modules())  # left as it was
    seen.append(_expect_error("from_moe E % p", lambda: ExpertParallelMoE.from_moe(odd.layers[0].mlp), "n_experts"))
    model = expert_parallelize(Llama(get_config("mixtral-tiny"), backend="torch"))
    seen.append(_expect_error("twice", lambda: expert_parallelize(model), "already expert-parallel"))
    seen.append(_expect_error("from_moe twice", lambda: ExpertParallelMoE.from_moe(model.layers[0].mlp),
                              "already expert-parallel"))
    tp = tensor_parallelize(Llama(get_config("mixtral-tiny", n_kv_head=4), backend="torch"))
    seen.append(_expect_error("tensor-parallel", lambda: expert_parallelize(tp), "tensor-parallel"))
    seen.append(_expect_error("then tensor_parallelize", lambda: tensor_parallelize(model), "expert-parallel"))
    dense = Llama(get_config("llama-tiny"), backend="torch")
    seen.append(_expect_error("dense", lambda: expert_parallelize(dense), "no MoE layer"))
    # the ranks hold different models: every rank raises, none waits
    differs = Llama(get_config("mixtral-tiny", n_experts=2 * p if rank else p), backend="torch")
    seen.append(_expect_error("n_experts differs", lambda: expert_parallelize(differs), "differ across ranks"))
    wider = MoE(get_config("mixtral-tiny", moe_ffn_dim=16 + 8 * (rank == 0)), "torch")
    seen.append(_expect_error("ffn differs", lambda: ExpertParallelMoE.from_moe(wider), "differ across ranks"))
    # an invalid input on one rank only, in the forward: every rank raises; then a valid forward works
    layer = model.layers[0].mlp
    d = layer.experts.gate_up_proj.shape[2]
    bad = torch.randn(1, 3, d + (rank == p - 1))
    seen.append(_expect_error("bad input", lambda: layer(bad), "rank"))
    y = layer(torch.randn(1, 3, d))
    assert y.shape == (1, 3, d)
    # (not an error: a rank without tokens still takes part in the exchanges, forward and backward)
    x = torch.randn(1, 0 if rank == 0 else 4, d, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    dist.barrier()
    return [s.split(":")[0].split(" on rank")[0] for s in seen]


def generate_worker(rank, p):
    """Each rank decodes its own prompts with an expert-parallel model; rank 0's rows stop at eos after one
    token while the others go on (the forward's exchange hung once rank 0 stopped calling it). Every rank's output
    equals the unsharded model's on its prompts, greedy and sampled; beam search, a pipelined model and
    max_new_tokens that differ are refused on every rank."""
    from llmkern.generation import generate
    from llmkern.parallel import pipeline_parallelize

    torch.manual_seed(0)
    ref = Llama(get_config("mixtral-tiny"), backend="torch").eval()
    model = expert_parallelize(copy.deepcopy(ref)).eval()
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(rank))
    first = generate(ref, ids, 1)[:, 5]
    eos = int(first[0]) if rank == 0 else 255  # rank 0: row 0 ends at once
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=eos, strategy="sample", seed=3, top_k=20)):
        want = generate(ref, ids, 6, return_dict=True, **kw)
        got = generate(model, ids, 6, return_dict=True, **kw)
        assert torch.equal(got.sequences, want.sequences), (kw, got.sequences, want.sequences)
        torch.testing.assert_close(got.scores, want.scores)
    with pytest.raises(NotImplementedError, match="expert-parallel"):
        generate(model, ids, 3, strategy="beam", num_beams=2)
    seen = [_expect_error("max_new_tokens differs", lambda: generate(model, ids, 3 + rank), "max_new_tokens")]
    piped = Llama(get_config("mixtral-tiny"), backend="torch")
    pipeline_parallelize(piped, n_microbatches=2)
    seen.append(_expect_error("after pipeline", lambda: expert_parallelize(piped), "pipeline-parallel"))
    dist.barrier()
    return len(seen)


# ---- tests --------------------------------------------------------------------------------------


def test_generate_with_ranks_stopping_at_different_steps_2_ranks(ranks):
    assert ranks(2).run(generate_worker, timeout=90) == [2, 2]

LAYER_CASES_2 = [  # (backend, E, k, routing, shared expert)
    ("torch", 4, 2, "plain", False),
    ("torch", 2, 1, "drop", False),     # E = p; rank 1's only expert dropped everywhere: it receives no row
    ("torch", 4, 2, "skew", True),      # rank 0 sends to nobody else, expert 3 gets no token; Qwen2-MoE shared
    ("llmkern", 4, 1, "skew", False),
    ("llmkern", 2, 2, "drop", True),
    ("llmkern", 4, 2, "plain", True),
]


def capacity_worker(rank, p, policy):
    """A capacity factor under expert parallelism counts each rank's own tokens (Megatron's EP ranks): rank r's
    output and input gradient equal the unsharded layer's on rank r's tokens alone, and pairs were dropped."""
    failures = []
    cfg = get_config("mixtral-tiny", n_experts=4, n_experts_per_tok=2, moe_capacity_factor=0.5,
                     moe_drop_policy=policy, **LAYER)
    ref = _reference_layer(cfg, "torch", False, seed=7)
    ep = ExpertParallelMoE.from_moe(copy.deepcopy(ref))
    x = _tokens(ref, rank, p, False, seed=7)
    x_ref, x_ep = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(rank))
    (ref(x_ref) * w).sum().backward()
    (ep(x_ep) * w).sum().backward()
    with torch.no_grad():
        dropped = int((ref.route(x)[1] < 0).sum())
    if dropped == 0:
        failures.append(f"rank {rank}: no pair dropped (factor 0.5)")
    _close(f"{policy}: y", ep(x_ep.detach()), ref(x_ref.detach()), failures)
    _close(f"{policy}: grad of x", x_ep.grad, x_ref.grad, failures)
    raise_failures(rank, failures)
    return dropped


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_counts_each_ranks_tokens_2_ranks(ranks, policy):
    assert all(n > 0 for n in ranks(2).run(capacity_worker, (policy,), timeout=60))


def test_layer_matches_unsharded_2_ranks(ranks):
    assert ranks(2).run(layer_worker, (LAYER_CASES_2,), timeout=60) == [len(LAYER_CASES_2)] * 2


def test_layer_matches_unsharded_4_ranks(ranks):
    cases = [("llmkern", 4, 2, "drop", False), ("torch", 8, 2, "skew", True), ("llmkern", 8, 1, "plain", False),
             ("torch", 4, 1, "skew", False)]
    assert ranks(4).run(layer_worker, (cases,), timeout=60) == [len(cases)] * 4


def test_model_training_matches_unsharded_2_ranks(ranks):
    """mixtral-tiny with the load-balancing loss (torch backend) and a Qwen2-MoE-like model (shared expert,
    layer 0 dense; llmkern backend): loss, gradients, three AdamW steps."""
    pool = ranks(2)
    names = pool.run(model_worker, (("mixtral-tiny", dict(router_aux_loss_coef=0.02)), "torch", 3), timeout=60)
    assert names[0] == names[1] and len(names[0]) == 4  # 2 layers x (gate_up_proj, down_proj)
    names = pool.run(model_worker, (("mixtral-tiny", QWEN2_MOE), "llmkern", 2), timeout=60)
    assert names[0] == ["layers.1.mlp.experts.down_proj", "layers.1.mlp.experts.gate_up_proj"]


def test_model_and_from_hf_4_ranks(ranks, tmp_path):
    pytest.importorskip("safetensors")
    from test_parallel_moe import _save_hf_checkpoint  # a Qwen2-MoE checkpoint with 4 experts

    _save_hf_checkpoint(tmp_path)
    pool = ranks(4)
    pool.run(model_worker, (("mixtral-tiny", dict(router_aux_loss_coef=0.02)), "llmkern", 2), timeout=60)
    names = pool.run(model_worker, (str(tmp_path), "torch", 1), timeout=60)
    assert names[0] == ["layers.1.mlp.experts.down_proj", "layers.1.mlp.experts.gate_up_proj"]


def test_torch_compile_keeps_the_exchange_out_of_the_graph_2_ranks(ranks):
    assert ranks(2).run(compile_worker, timeout=90) == [True, True]


def test_errors_are_raised_on_every_rank(ranks):
    for p in (2, 4):
        seen = ranks(p).run(errors_worker, timeout=60)
        assert all(s == seen[0] for s in seen) and len(seen[0]) == 10


def test_missing_process_group_is_a_clear_error():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    model = Llama(get_config("mixtral-tiny"), backend="torch")
    with pytest.raises(RuntimeError, match="no process group"):
        expert_parallelize(model)
    with pytest.raises(RuntimeError, match="no process group"):
        ExpertParallelMoE.from_moe(model.layers[0].mlp)
    with pytest.raises(RuntimeError, match="no process group"):
        all_reduce_replicated_grads(model)
    assert not any(isinstance(m, (ExpertParallelMoE, LocalExperts)) for m in model.modules())
