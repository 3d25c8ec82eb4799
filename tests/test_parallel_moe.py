"""Expert tensor parallelism (llmkern.parallel.moe): the zoo's sparse MoE layers with every routed expert
sharded along its FFN width, against the unsharded model (single process, same weights).

The ranks are gloo processes on 127.0.0.1 (llmkern.parallel.launch.RankPool, one pool of 2 ranks and one
of 4 per module). Each case checks the forward, the loss and every gradient: a sharded parameter's
against its slice of the unsharded gradient, a replicated one's (router, norms, shared-expert gate)
against the whole one.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.distributed as dist

from llmkern.models import Llama, get_config
from llmkern.models.llama import MoE, load_balancing_loss
from llmkern.parallel import ColumnParallelLinear, RowParallelLinear, tensor_parallelize
from llmkern.parallel.moe import ShardedExperts, TensorParallelMoE
from llmkern.testing import collect_close, raise_failures

TOL = dict(atol=1e-4, rtol=1e-4)
# a Qwen2-MoE-like config: shared expert, layer 0 dense, no renormalisation, load-balancing loss
QWEN2_MOE = dict(moe_ffn_dim=48, moe_shared_ffn_dim=40, moe_layers=(1,), moe_renormalize=False,
                 router_aux_loss_coef=0.05)


# ---- helpers (top level: the spawned ranks import them) -----------------------------------------

def _close(tag, actual, expected, failures, **tol):
    collect_close(tag, actual, expected, failures, **{**TOL, **tol})


def _decisive(model, seed=0):
    """Random norm gains and routers with large weights: decisive top-k choices, so that the sharded
    model's different rounding (its sums run over ranks) cannot flip a token's experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "norm" in n:
                prm.copy_(torch.rand(prm.shape, generator=g) + 0.5)
            elif n.endswith("mlp.gate.weight") or n == "gate.weight":
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    return model


def _expected_grad(name, ref_grad, owner, rank, p):
    """This rank's part of the unsharded gradient of parameter `name` (owned by module `owner`)."""
    if isinstance(owner, ShardedExperts):  # rows [r·f, (r+1)·f) of the gate and of the up projection
        F_, f = owner.ffn_dim, owner.ffn_dim // p
        if name.endswith("gate_up_proj"):
            return torch.cat([ref_grad[:, rank * f:(rank + 1) * f], ref_grad[:, F_ + rank * f:F_ + (rank + 1) * f]], 1)
        return ref_grad[:, :, rank * f:(rank + 1) * f]
    n = ref_grad.shape[0] // p
    if isinstance(owner, ColumnParallelLinear):
        return ref_grad[rank * n:(rank + 1) * n]
    if isinstance(owner, RowParallelLinear) and name.endswith("weight"):
        k = ref_grad.shape[1] // p
        return ref_grad[:, rank * k:(rank + 1) * k]
    return ref_grad


def _check_grads(tag, ref, tp, rank, p, failures):
    mods, ref_params = dict(tp.named_modules()), dict(ref.named_parameters())
    for name, prm in tp.named_parameters():
        owner = mods[name.rsplit(".", 1)[0]] if "." in name else tp
        _close(f"{tag}: grad of {name}", prm.grad, _expected_grad(name, ref_params[name].grad, owner, rank, p),
               failures)
    return len(ref_params)


def _check_expert_memory(tag, ref, tp, p, failures):
    """Every rank holds 1/p of each routed expert tensor (and its shared expert's projections)."""
    full = dict(ref.named_parameters())
    n_sharded = 0
    for name, prm in tp.named_parameters():
        if ".experts." in name or name.startswith("experts.") or "shared_expert." in name:
            if prm.numel() * p != full[name].numel():
                failures.append(f"{tag}: {name} holds {tuple(prm.shape)} of {tuple(full[name].shape)} (not 1/{p})")
            n_sharded += 1
    for name, prm in tp.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            E, F2, d = full[name].shape
            if tuple(prm.shape) != (E, F2 // p, d):
                failures.append(f"{tag}: {name} shard shape {tuple(prm.shape)}")
    if not n_sharded:
        failures.append(f"{tag}: no expert parameter found")


# ---- workers ------------------------------------------------------------------------------------

def model_worker(rank, p, cases):
    """tensor_parallelize on zoo MoE models: logits, loss (with the load-balancing loss), every gradient,
    the experts' memory per rank, and the gathered experts."""
    failures, checked = [], []
    for config, opts, backend in cases:
        tag = f"{config} {opts} {backend} p={p}"
        torch.manual_seed(0)
        ref = _decisive(Llama(get_config(config, **opts), backend=backend))
        tp = tensor_parallelize(copy.deepcopy(ref))
        if not any(isinstance(m, TensorParallelMoE) for m in tp.modules()):
            failures.append(f"{tag}: no TensorParallelMoE")
        _check_expert_memory(tag, ref, tp, p, failures)
        idx = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        logits_ref, loss_ref = ref(idx, labels=idx)
        logits, loss = tp(idx, labels=idx)
        (loss_ref + logits_ref.pow(2).mean()).backward()  # a logits term too: gradients of order 1
        (loss + logits.pow(2).mean()).backward()
        _close(f"{tag}: logits", logits, logits_ref, failures)
        _close(f"{tag}: loss", loss, loss_ref, failures)
        n = _check_grads(tag, ref, tp, rank, p, failures)
        moe = next(m for m in tp.modules() if isinstance(m, TensorParallelMoE))
        layer = next(i for i, b in enumerate(tp.layers) if b.mlp is moe)
        gu, dn = moe.experts.gathered()
        full = ref.layers[layer].mlp.experts
        _close(f"{tag}: gathered gate_up_proj", gu, full.gate_up_proj, failures, atol=0, rtol=0)
        _close(f"{tag}: gathered down_proj", dn, full.down_proj, failures, atol=0, rtol=0)
        checked.append(n)
    raise_failures(rank, failures)
    return checked


def layer_worker(rank, p, backends):
    """TensorParallelMoE.from_moe on one MoE layer (shared expert, load-balancing loss), with and without
    sequence parallelism: y, the input gradient and every parameter gradient."""
    failures, n = [], 0
    cfg = get_config("mixtral-tiny", n_kv_head=4, **QWEN2_MOE)
    for backend in backends:
        for sp in (False, True):
            tag = f"layer {backend} sp={sp} p={p}"
            torch.manual_seed(3)
            ref = _decisive(MoE(cfg, backend), seed=3)
            with torch.no_grad():
                for prm in ref.parameters():  # larger experts: outputs and gradients of order 1
                    if prm.dim() == 3:
                        prm.normal_(0.0, 0.3)
            tp = TensorParallelMoE.from_moe(copy.deepcopy(ref), sequence_parallel=sp)
            _check_expert_memory(tag, ref, tp, p, failures)
            B, T, d = 2 * p, 5, cfg.n_embd
            x = torch.randn(B, T, d)
            w = torch.randn(B, T, d)
            xr, lr = x.clone().requires_grad_(True), []
            y_ref = ref(xr, lr)
            ((y_ref * w).sum() + 3 * load_balancing_loss(lr, cfg.n_experts_per_tok)).backward()
            rows = slice(rank * B // p, (rank + 1) * B // p) if sp else slice(None)
            xt, lt = x[rows].clone().requires_grad_(True), []
            y = tp(xt, lt)
            # every rank adds the whole load-balancing loss (its logits are all-gathered) to its tokens' loss
            ((y * w[rows]).sum() + 3 * load_balancing_loss(lt, cfg.n_experts_per_tok)).backward()
            _close(f"{tag}: y", y, y_ref[rows], failures)
            _close(f"{tag}: router logits", torch.cat(lt), torch.cat(lr), failures)
            _close(f"{tag}: input grad", xt.grad, xr.grad[rows], failures)
            _check_grads(tag, ref, tp, rank, p, failures)
            n += 1
    raise_failures(rank, failures)
    return n


def from_hf_worker(rank, p, path, backend):
    """A checkpoint loaded with from_hf, then tensor_parallelize: the loaded weights, sharded."""
    from llmkern.models import from_hf

    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, tp = from_hf(path, backend=backend), tensor_parallelize(from_hf(path, backend=backend))
    _check_expert_memory("from_hf", ref, tp, p, failures)
    idx = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    outs = [m(idx) for m in (ref, tp)]
    for out in outs:
        out.pow(2).mean().backward()
    _close("from_hf: logits", outs[1], outs[0], failures)
    _check_grads("from_hf", ref, tp, rank, p, failures)
    raise_failures(rank, failures)
    return sorted(n for n, m in tp.named_modules() if isinstance(m, TensorParallelMoE))


def errors_worker(rank, p):
    seen = []
    for opts, match in ((dict(moe_ffn_dim=4 * p + 1), "moe_ffn_dim"),
                        (dict(moe_shared_ffn_dim=4 * p + 1), "shared_expert")):
        model = Llama(get_config("mixtral-tiny", **opts), backend="torch")
        before = {k: v.shape for k, v in model.state_dict().items()}
        try:
            tensor_parallelize(model)
        except ValueError as exc:
            assert "not divisible" in str(exc) and match in str(exc), str(exc)
            seen.append(str(exc))
        else:
            raise AssertionError(f"{opts}: no ValueError on rank {rank}")
        assert {k: v.shape for k, v in model.state_dict().items()} == before  # left as it was
        assert not any(isinstance(m, (TensorParallelMoE, ColumnParallelLinear)) for m in model.modules())
    moe = MoE(get_config("mixtral-tiny", moe_shared_ffn_dim=8), "torch")
    try:  # a replicated shared expert would get only its tokens' gradient under sequence parallelism
        TensorParallelMoE.from_moe(moe, sequence_parallel=True, shard_shared_expert=False)
    except ValueError as exc:
        seen.append(str(exc))
    else:
        raise AssertionError(f"sequence_parallel with a replicated shared expert: no ValueError on rank {rank}")
    try:  # a capacity would count each rank's token shard under sequence parallelism
        TensorParallelMoE.from_moe(MoE(get_config("mixtral-tiny", moe_capacity_factor=1.0), "torch"),
                                   sequence_parallel=True)
    except ValueError as exc:
        assert "capacity" in str(exc), str(exc)
        seen.append(str(exc))
    else:
        raise AssertionError(f"sequence_parallel with a capacity factor: no ValueError on rank {rank}")
    dist.barrier()
    return seen


# ---- tests --------------------------------------------------------------------------------------

def test_moe_models_match_unsharded_2_ranks(ranks):
    """mixtral-tiny and a Qwen2-MoE-like model (shared expert, a dense layer, the load-balancing loss), on
    the torch and the llmkern backends."""
    cases = [("mixtral-tiny", {}, "torch"), ("mixtral-tiny", QWEN2_MOE, "llmkern"),
             ("mixtral-tiny", QWEN2_MOE, "torch"),
             ("mixtral-tiny", dict(moe_capacity_factor=0.5), "llmkern")]  # token dropping: the unsharded drops
    checked = ranks(2).run(model_worker, (cases,), timeout=60)
    assert checked[0] == checked[1] and len(checked[0]) == len(cases)


def test_moe_layer_with_and_without_sequence_parallelism_2_ranks(ranks):
    assert ranks(2).run(layer_worker, (("torch", "llmkern"),), timeout=60) == [4, 4]


def test_moe_layer_and_model_4_ranks(ranks):
    pool = ranks(4)
    assert pool.run(layer_worker, (("llmkern",),), timeout=60) == [2] * 4
    cases = [("mixtral-tiny", dict(n_kv_head=4, **QWEN2_MOE), "llmkern")]
    assert len(set(map(tuple, pool.run(model_worker, (cases,), timeout=60)))) == 1


def _save_hf_checkpoint(path):
    """A Qwen2-MoE checkpoint in transformers' per-expert layout (mlp.experts.{e}.gate_proj ...), written
    from a random zoo model (so from_hf's stacking is what gets sharded)."""
    from safetensors.torch import save_file

    from llmkern.models.hf import llama_config

    hf = dict(model_type="qwen2_moe", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=16,
              mlp_only_layers=[0], norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(4)
    zoo = _decisive(Llama(llama_config(hf), backend="torch"))
    state = {}
    for k, v in zoo.state_dict().items():
        if ".experts." not in k:
            state[k if k.startswith("lm_head") else "model." + k] = v
            continue
        pre = "model." + k.rsplit(".experts.", 1)[0] + ".experts."
        for e in range(v.shape[0]):
            if k.endswith("gate_up_proj"):
                gate, up = v[e].chunk(2, 0)
                state[f"{pre}{e}.gate_proj.weight"], state[f"{pre}{e}.up_proj.weight"] = gate, up
            else:
                state[f"{pre}{e}.down_proj.weight"] = v[e]
    save_file({k: t.contiguous() for k, t in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf))


def test_tensor_parallelize_a_from_hf_moe_model_2_ranks(ranks, tmp_path):
    pytest.importorskip("safetensors")
    _save_hf_checkpoint(tmp_path)
    names = ranks(2).run(from_hf_worker, (str(tmp_path), "llmkern"), timeout=60)
    assert names[0] == names[1] == ["layers.1.mlp"]


def test_ffn_not_divisible_is_a_clear_error_on_every_rank(ranks):
    seen = ranks(2).run(errors_worker, timeout=60)
    assert seen[0] == seen[1] and len(seen[0]) == 4
