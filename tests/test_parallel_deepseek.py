"""DeepSeek-V3 zoo models (multi-head latent attention, the sigmoid group-limited MoE with its selection bias and
ungated shared experts) under tensor, expert and context parallelism, against the unsharded model in one
process with the same weights (float32, tiny configs: deepseek-v3-tiny and a variant with one q_proj and
rotate-half RoPE); DeepSeek-V2 (deepseek-v2-tiny: V2's group-limited softmax router) under tensor and expert
parallelism.

- tensor_parallelize: logits, loss, every parameter gradient (a sharded parameter's: its slice of the
  unsharded one), and greedy decoding through the KV cache. The gradients are compared relative to their
  largest entry, so that a replicated parameter missing the other ranks' part (kv_a_proj_with_mqa's rotary
  key rows without MLAttention.shared_key_grad) stands out.
- expert_parallelize: each rank's loss on its own batch and, after all_reduce_replicated_grads, every
  gradient against the unsharded model's gradient of the sum of the ranks' losses; an AdamW step.
- context_parallelize: logits, loss and gradients after all_reduce_gradients; context_parallel_attention with
  a value head dim Dv != D against llmkern.attention on the whole sequence, forward and backward.

gloo ranks on 127.0.0.1 (the `ranks` fixture); the workers are top-level functions (the ranks import them).
"""
import copy

import pytest
import torch

from llmkern.testing import collect_close, raise_failures

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

VARIANTS = {  # name -> (config changes, backend)
    "v3": (dict(), "torch"),
    "lite": (dict(q_lora_rank=None, rope_interleave=False, moe_renormalize=False), "llmkern"),
    "v2": (dict(), "llmkern"),
}
PRESETS = {"v2": "deepseek-v2-tiny"}  # variant -> the config it changes (default deepseek-v3-tiny)


# ---- helpers (top level: the spawned ranks import them) -----------------------------------------

def _model(variant, **changes):
    """A deepseek-v3-tiny Llama with weights of order 1 where they decide something: decisive routers
    (no near-tie that the sharded sums' rounding could flip) and a nonzero selection bias."""
    from llmkern.models import Llama, get_config

    opts, backend = VARIANTS[variant]
    torch.manual_seed(0)
    model = Llama(get_config(PRESETS.get(variant, "deepseek-v3-tiny"), **{**opts, **changes}), backend=backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if n.endswith("mlp.gate.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif n.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif "norm" in n:  # random gains: a latent norm's gradient must come out whole
                t.uniform_(0.5, 1.5)
            elif "layers" in n and "experts" not in n:
                t.normal_(0.0, 0.1)
    return model


def _rel_close(tag, actual, expected, failures, tol=1e-5):
    """|actual - expected| relative to expected's largest entry (floored) below tol."""
    if actual is None or expected is None:
        if (actual is None) != (expected is None):
            failures.append(f"{tag}: one of actual / expected is None")
        return
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    scale = expected.detach().abs().max().item() + 1e-6
    if not err / scale < tol:
        failures.append(f"{tag}: max error {err:.3g} relative to {scale:.3g}")


def _slice(name, full, module, rank, p):
    """This rank's part of an unsharded model's tensor `full` for parameter `name` of a tensor-parallel
    module (the whole tensor for a replicated one)."""
    from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from llmkern.parallel.moe import ShardedExperts, _expert_shard

    if isinstance(module, ColumnParallelLinear):
        return full.chunk(p, 0)[rank]
    if isinstance(module, RowParallelLinear):
        return full.chunk(p, 1)[rank] if name.endswith("weight") else full
    if isinstance(module, ShardedExperts):  # (_expert_shard reads F from the down projection's shape)
        if name.endswith("gate_up_proj"):
            return _expert_shard(full, full.new_empty(full.shape[0], 1, full.shape[1] // 2), p, rank)[0]
        return _expert_shard(full.new_empty(full.shape[0], 2 * full.shape[2], 1), full, p, rank)[1]
    return full


def _ids(vocab, B, T, seed):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def tp_worker(rank, p, variants=("v3", "lite")):
    """tensor_parallelize on the variants: the sharding, logits, loss, every gradient, the KV cache."""
    from llmkern.models.deepseek import MLAttention
    from llmkern.parallel import tensor_parallelize
    from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from llmkern.parallel.moe import TensorParallelDeepseekMoE

    failures, checked = [], []
    for variant in variants:
        ref = _model(variant)
        tp = tensor_parallelize(copy.deepcopy(ref))
        attn, moe = tp.layers[1].self_attn, tp.layers[1].mlp
        q = attn.q_proj if attn.q_b_proj is None else attn.q_b_proj
        kinds = [type(m) for m in (q, attn.kv_b_proj, attn.o_proj, attn.kv_a_proj_with_mqa, moe)]
        want = [ColumnParallelLinear, ColumnParallelLinear, RowParallelLinear, torch.nn.Linear,
                TensorParallelDeepseekMoE]
        if kinds != want or attn.n_head != 4 // p or not isinstance(attn, MLAttention):
            failures.append(f"{variant}: sharding {kinds}, n_head {attn.n_head}")
        if not isinstance(moe.shared_experts.gate_proj, ColumnParallelLinear):
            failures.append(f"{variant}: shared experts not sharded")
        ids = _ids(ref.config.vocab_size, 2, 12, 2)
        labels = ids.clone()
        labels[0, :3] = -100
        logits_ref, loss_ref = ref(ids, labels)
        (loss_ref + logits_ref.pow(2).mean()).backward()  # (the logits term: gradients of a larger size)
        logits, loss = tp(ids, labels)
        (loss + logits.pow(2).mean()).backward()
        collect_close(f"{variant}: logits", logits, logits_ref, failures, atol=1e-5, rtol=1e-5)
        collect_close(f"{variant}: loss", loss, loss_ref, failures, atol=1e-6, rtol=1e-6)
        mods, ref_params = dict(tp.named_modules()), dict(ref.named_parameters())
        for name, prm in tp.named_parameters():
            owner = mods[name.rsplit(".", 1)[0]]
            _rel_close(f"{variant}: grad of {name}", prm.grad, _slice(name, ref_params[name].grad, owner, rank, p),
                       failures)
        for name, buf in tp.named_buffers():  # (the selection bias: replicated, untouched)
            if name.endswith("e_score_correction_bias"):
                collect_close(f"{variant}: {name}", buf, dict(ref.named_buffers())[name], failures, atol=0, rtol=0)
        with torch.no_grad():
            full = ref(ids)
            cache = tp.new_cache(2, 12)
            dec = torch.cat([tp(ids[:, :8], cache=cache)] + [tp(ids[:, t:t + 1], cache=cache) for t in range(8, 12)], 1)
        collect_close(f"{variant}: cache decode", dec, full, failures, atol=1e-5, rtol=1e-5)
        checked.append(len(ref_params))
    raise_failures(rank, failures)
    return checked


def tp_errors_worker(rank, p):
    """What tensor parallelism refuses: a head count that p does not divide (the model left as it was), and
    sequence parallelism on DeepSeek's MoE layer."""
    from llmkern.parallel import TensorParallelMoE, tensor_parallelize
    from llmkern.parallel.layers import _ParallelLinear

    out = []
    odd = _model("v3", n_head=2 * p + 1)
    try:
        tensor_parallelize(odd)
    except ValueError as exc:
        out.append("n_head=" in str(exc) and "not divisible" in str(exc))
    out.append(not any(isinstance(m, _ParallelLinear) for m in odd.modules()))
    try:
        TensorParallelMoE.from_moe(_model("v3").layers[1].mlp, sequence_parallel=True)
    except ValueError as exc:
        out.append("DeepseekMoE" in str(exc) and "sequence_parallel" in str(exc))
    # transformers' own DeepseekV3Attention: its shared rotary key's gradient would stay partial
    import transformers

    cfg = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
                                        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    try:
        tensor_parallelize(transformers.DeepseekV3ForCausalLM(cfg))
    except ValueError as exc:
        out.append("DeepseekV3Attention" in str(exc) and "from_hf" in str(exc))
    return out


def ep_worker(rank, p, variant, steps):
    """expert_parallelize: per-rank loss, every gradient after all_reduce_replicated_grads, AdamW steps,
    against the unsharded model trained on the sum of the ranks' losses."""
    from llmkern.parallel.expert import (ExpertParallelDeepseekMoE, all_reduce_replicated_grads, expert_parallelize,
                                         expert_parameter_names)

    failures = []
    ref = _model(variant)
    ep = expert_parallelize(copy.deepcopy(ref))
    layers = [m for m in ep.modules() if isinstance(m, ExpertParallelDeepseekMoE)]
    if len(layers) != len(ref.config.moe_layers) or layers[0].experts.n_local != 8 // p:
        failures.append(f"{variant}: {len(layers)} expert-parallel layers")
    ref_params, mods = dict(ref.named_parameters()), dict(ep.named_modules())
    experts = set(expert_parameter_names(ep))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    opt = torch.optim.AdamW(ep.parameters(), lr=1e-3, eps=1e-6)

    def expected(name, full):
        if name not in experts:
            return full
        owner = mods[name.rsplit(".", 1)[0]]
        return full[owner.first:owner.first + owner.n_local]

    for step in range(steps):
        tag = f"{variant} p={p} step {step}"
        batches = [_ids(ref.config.vocab_size, 2, 8, 100 * step + r) for r in range(p)]
        opt_ref.zero_grad()
        losses = [ref(b, labels=b)[1] for b in batches]
        sum(losses).backward()
        opt.zero_grad()
        _, loss = ep(batches[rank], labels=batches[rank])
        loss.backward()
        all_reduce_replicated_grads(ep)
        collect_close(f"{tag}: loss", loss, losses[rank], failures, atol=1e-6, rtol=1e-6)
        for name, prm in ep.named_parameters():
            _rel_close(f"{tag}: grad of {name}", prm.grad, expected(name, ref_params[name].grad), failures)
        opt_ref.step()
        opt.step()
    for name, prm in ep.named_parameters():
        collect_close(f"{variant} after {steps} steps: {name}", prm, expected(name, ref_params[name]), failures,
                      atol=1e-5, rtol=1e-5)
    raise_failures(rank, failures)
    return sorted(experts)


def cp_worker(rank, p):
    """context_parallelize on both variants (zigzag; contiguous for one), and context_parallel_attention with
    Dv != D against llmkern.attention on the whole sequence."""
    from llmkern import attention
    from llmkern.parallel import all_reduce_gradients, context_parallel_attention, context_parallelize, shard_sequence

    failures = []
    for variant, layout in (("v3", "zigzag"), ("lite", "contiguous")):
        ref = _model(variant)
        T = 4 * p * 3
        ids = _ids(ref.config.vocab_size, 2, T, 3)
        labels = ids.clone()
        labels[1, T // 2:] = -100  # the ranks hold different numbers of valid labels
        logits_ref, loss_ref = ref(ids, labels)
        loss_ref.backward()
        model = context_parallelize(copy.deepcopy(ref), None, layout)
        local = lambda t: shard_sequence(t, None, 1, layout)  # noqa: E731
        logits, loss = model(local(ids), local(labels))
        loss.backward()
        all_reduce_gradients(model)
        collect_close(f"{variant}: logits", logits, local(logits_ref), failures, atol=1e-5, rtol=1e-5)
        collect_close(f"{variant}: loss", loss, loss_ref, failures, atol=1e-6, rtol=1e-6)
        for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
            _rel_close(f"{variant} {layout}: grad of {name}", a.grad, b.grad, failures)
    cases = [dict(layout="zigzag", causal=True, Hk=4), dict(layout="contiguous", causal=False, Hk=2),
             dict(layout="zigzag", causal=True, Hk=1, window=(3, 0), scale=0.3)]
    for i, case in enumerate(cases):
        layout = case.pop("layout")
        Hk, n = case.pop("Hk"), (2 * p if layout == "zigzag" else p)
        g = torch.Generator().manual_seed(i)  # the same full tensors on every rank
        q, k, v, dy = (torch.randn(2, h, 3 * n, d, generator=g) for h, d in ((4, 24), (Hk, 24), (Hk, 12), (4, 12)))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        want = attention(*full, **case)
        (want * dy).sum().backward()
        loc = [shard_sequence(t, None, 2, layout).requires_grad_() for t in (q, k, v)]
        got = context_parallel_attention(*loc, layout=layout, **case)
        (got * shard_sequence(dy, None, 2, layout)).sum().backward()
        collect_close(f"attention {i}: out", got, shard_sequence(want.detach(), None, 2, layout), failures,
                      atol=1e-5, rtol=1e-5)
        for name, a, b in zip(("dq", "dk", "dv"), loc, full):
            collect_close(f"attention {i}: {name}", a.grad, shard_sequence(b.grad, None, 2, layout), failures,
                          atol=1e-5, rtol=1e-5)
    raise_failures(rank, failures)
    return True


# ---- tests --------------------------------------------------------------------------------------

def test_tensor_parallel_deepseek_equals_unsharded_2_ranks(ranks):
    pool = ranks(2)
    assert all(len(r) == 2 and min(r) > 20 for r in pool.run(tp_worker, (), timeout=90))
    assert pool.run(tp_errors_worker, timeout=60) == [[True, True, True, True]] * 2


def test_tensor_and_expert_parallel_deepseek_4_ranks(ranks):
    pool = ranks(4)
    pool.run(tp_worker, (), timeout=120)
    names = pool.run(ep_worker, ("v3", 1), timeout=90)
    assert names[0] == names[3] and len(names[0]) == 4  # 2 MoE layers x (gate_up_proj, down_proj)


def test_tensor_parallel_deepseek_v2_equals_unsharded_2_ranks(ranks):
    """DeepSeek-V2's MoE layer (DeepseekMoE with the softmax router) shards as V3's: TensorParallelDeepseekMoE."""
    assert ranks(2).run(tp_worker, (("v2",),), timeout=90) == [[len(dict(_model("v2").named_parameters()))]] * 2


def test_expert_parallel_deepseek_equals_unsharded_2_ranks(ranks):
    pool = ranks(2)
    for variant, steps in (("v3", 2), ("lite", 1), ("v2", 1)):
        names = pool.run(ep_worker, (variant, steps), timeout=90)
        assert names[0] == ["layers.1.mlp.experts.down_proj", "layers.1.mlp.experts.gate_up_proj",
                            "layers.2.mlp.experts.down_proj", "layers.2.mlp.experts.gate_up_proj"]


def test_context_parallel_deepseek_equals_unsharded_2_ranks(ranks):
    assert ranks(2).run(cp_worker, timeout=120) == [True, True]
