"""tensor_parallelize on Hugging Face GPT-2, whose projections are transformers' Conv1D (y = x W + b, W stored
[in, out]): c_attn (fused q, k, v), c_fc column-parallel, c_proj row-parallel, GPT2Attention.split_size and
num_heads divided by p, PEFT's fan_in_fan_out LoRA wrappers sharded with their factors.

Tiny float32 models on gloo ranks spawned by the module's RankPools (conftest's `ranks`): the sharded model's
logits, loss, every gradient (gathered back to the full shape) and greedy tokens equal the unsharded model's.
"""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

TOL = dict(atol=2e-5, rtol=1e-4)
VOCAB, D, HEADS = 64, 32, 4


def _gpt2(attn="eager", n_head=HEADS, n_embd=D, seed=0, **over):
    """A tiny GPT2LMHeadModel, no dropout, with random biases and LayerNorm gains (Conv1D biases start at zero:
    a wrong bias shard would not show) and weights large enough for varied greedy tokens."""
    import transformers as T

    cfg = T.GPT2Config(n_embd=n_embd, n_layer=2, n_head=n_head, vocab_size=VOCAB, n_positions=32,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None,
                       attn_implementation=attn, **over)
    torch.manual_seed(seed)
    m = T.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for n, prm in m.named_parameters():
            if n.endswith("bias") or ".ln_" in n or "ln_f" in n:
                prm.add_(0.1 * torch.randn_like(prm))
            elif n.endswith("weight") and prm.dim() == 2:
                prm.mul_(5.0)
    return m


def _ids(B=2, T=7, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _gather(t, dim):
    p = dist.get_world_size()
    parts = [torch.empty_like(t) for _ in range(p)]
    dist.all_gather(parts, t.contiguous())
    return parts


def _unshard(t, layer, name):
    """The full tensor (the nn.Linear layout: weight [out, in]) of a tensor-parallel layer's parameter (or its
    gradient) t: column layers' rows per segment, row layers' weight columns; replicated parts as they are."""
    from llmkern.parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(layer, ColumnParallelLinear) and name != "lora_A":  # rows [out/p, ...] per segment
        parts = _gather(t, 0)
        p = len(parts)
        out, lo = [], 0
        for size in layer.segments:
            k = size // p
            out += [q[lo:lo + k] for q in parts]
            lo += k
        return torch.cat(out, 0)
    if isinstance(layer, RowParallelLinear) and name in ("weight", "lora_A"):  # columns [..., in/p]
        return torch.cat(_gather(t, 1), 1)
    return t


def _check_grads(tag, ref, tp, failures, lora=False):
    """Every trainable parameter of tp, gathered to its full shape, against ref's gradient (a Conv1D's weight
    gradient transposed; a LoRA factor named X.lora_A in tp is X.lora_A.default.weight in the PEFT model)."""
    from llmkern.parallel.layers import _ParallelLinear
    from llmkern.peft._plain_lora import is_hf_conv1d

    from llmkern.testing import collect_close

    ref_params, ref_mods = dict(ref.named_parameters()), dict(ref.named_modules())
    tp_mods = dict(tp.named_modules())
    n = 0
    for name, prm in tp.named_parameters():
        if not prm.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        layer = tp_mods[owner]
        g = prm.grad
        if isinstance(layer, _ParallelLinear):
            g = _unshard(g, layer, leaf)
            ref_name = f"{owner}.{leaf}.default.weight" if leaf.startswith("lora_") else name
            want = ref_params[ref_name].grad
            base = ref_mods[owner + ".base_layer"] if lora else ref_mods[owner]
            if leaf == "weight" and is_hf_conv1d(base):
                want = want.t()
            if not layer.weight.is_contiguous() or \
                    layer.weight.untyped_storage().nbytes() != layer.weight.numel() * layer.weight.element_size():
                failures.append(f"{tag}: {owner}.weight is not a fresh contiguous shard")
        else:
            want = ref_params[name].grad
        collect_close(f"{tag}: grad of {name}", g, want, failures, **TOL)
        n += 1
    return n


def gpt2_worker(rank, p, attn):
    from transformers import DynamicCache

    from llmkern.parallel import ColumnParallelLinear, RowParallelLinear, tensor_parallelize
    from llmkern.testing import collect_close

    failures, checked = [], 0
    ids = _ids()
    for overlap in ("none", "ring"):
        tag = f"GPT-2 {attn} overlap={overlap} p={p}"
        ref = _gpt2(attn)
        tp = tensor_parallelize(copy.deepcopy(ref), overlap=overlap)
        a, mlp = tp.transformer.h[0].attn, tp.transformer.h[0].mlp
        kinds = (type(a.c_attn), type(a.c_proj), type(mlp.c_fc), type(mlp.c_proj))
        if kinds != (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear):
            failures.append(f"{tag}: layers {kinds}")
        if (a.num_heads, a.split_size, a.c_attn.segments) != (HEADS // p, D // p, [D] * 3):
            failures.append(f"{tag}: num_heads {a.num_heads}, split_size {a.split_size}, segments {a.c_attn.segments}")
        want = ref(input_ids=ids, labels=ids)
        want.loss.backward()
        got = tp(input_ids=ids, labels=ids)
        got.loss.backward()
        collect_close(f"{tag}: logits", got.logits, want.logits, failures, **TOL)
        collect_close(f"{tag}: loss", got.loss, want.loss, failures, **TOL)
        checked += _check_grads(tag, ref, tp, failures)
        if overlap == "ring":  # greedy decoding through a DynamicCache: tokens and every step's logits
            kw = dict(attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True, output_logits=True)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g_ref = ref.generate(ids[:, :4], cache=DynamicCache(config=ref.config), **kw)
                g_tp = tp.generate(ids[:, :4], cache=DynamicCache(config=tp.config), **kw)
            if not torch.equal(g_tp.sequences, g_ref.sequences):
                failures.append(f"{tag}: generate {g_tp.sequences.tolist()} != {g_ref.sequences.tolist()}")
            if len(set(g_ref.sequences[:, 4:].flatten().tolist())) < 2:
                failures.append(f"{tag}: degenerate greedy tokens {g_ref.sequences.tolist()}")
            for i, (x, y) in enumerate(zip(g_tp.logits, g_ref.logits)):
                collect_close(f"{tag}: generate step {i} logits", x, y, failures, **TOL)
    if failures:
        raise AssertionError(f"rank {rank}:\n" + "\n".join(failures))
    return checked


def peft_worker(rank, p):
    from llmkern.parallel import tensor_parallelize
    from llmkern.testing import collect_close, peft_lora_model, randomize_lora

    failures = []
    ref = peft_lora_model(_gpt2(), r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj", "c_fc"])
    randomize_lora(ref)  # (lora_B starts at zero)
    tp = tensor_parallelize(copy.deepcopy(ref))
    trainable = sorted(n.rsplit(".", 1)[-1] for n, prm in tp.named_parameters() if prm.requires_grad)
    ids = _ids()
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    got = tp(input_ids=ids, labels=ids)
    got.loss.backward()
    collect_close("PEFT GPT-2: logits", got.logits, want.logits, failures, **TOL)
    collect_close("PEFT GPT-2: loss", got.loss, want.loss, failures, **TOL)
    n = _check_grads("PEFT GPT-2", ref, tp, failures, lora=True)
    flags = _saved_adapter_round_trip(ref, ids, want.logits, failures)
    if failures:
        raise AssertionError(f"rank {rank}:\n" + "\n".join(failures))
    return n, sorted(set(trainable)), flags


def _saved_adapter_round_trip(ref, ids, want, failures):
    """PEFT's saved GPT-2 adapter (fan_in_fan_out=True) loads into a sharded model (inject_lora, tensor_parallelize,
    load_peft_adapter: it was refused, the parallel layers not being Conv1D) and is saved back with the flag PEFT
    writes. Returns the flag of the file saved from the shards (rank 0; None elsewhere)."""
    import json
    import tempfile

    from llmkern import peft as lp
    from llmkern.parallel import tensor_parallelize
    from llmkern.testing import collect_close

    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp + "/peft")
        model = _gpt2()
        lp.inject_lora(model, ["c_attn", "c_proj", "c_fc"], r=4, alpha=8)
        tp = lp.load_peft_adapter(tensor_parallelize(model), tmp + "/peft")
        with torch.no_grad():
            collect_close("PEFT GPT-2 adapter loaded into the shards: logits", tp(input_ids=ids).logits, want,
                          failures, **TOL)
        lp.save_peft_adapter(tp, tmp + "/back")  # (rank 0 writes the gathered adapter)
        if dist.get_rank() != 0:
            return None
        with open(tmp + "/back/adapter_config.json") as f:
            return json.load(f)["fan_in_fan_out"]


def errors_worker(rank, p):
    from llmkern.parallel import tensor_parallelize

    seen = {}
    for case, make in (("heads", lambda: _gpt2(n_head=3, n_embd=24)),
                       ("cross", lambda: _gpt2(add_cross_attention=True))):
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            tensor_parallelize(model)
            seen[case] = "accepted"
        except ValueError as exc:
            after = model.state_dict()
            same = before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
            seen[case] = str(exc) + ("" if same else " (model changed)")
    return seen


# ---- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_sharded_matches_unsharded_2_ranks(ranks, attn):
    """Logits, loss, every gradient (overlap none and ring) and greedy generate with a DynamicCache."""
    checked = ranks(2).run(gpt2_worker, (attn,), timeout=90)
    assert checked[0] == checked[1] > 20, checked


def test_gpt2_peft_fan_in_fan_out_lora_sharded_2_ranks(ranks):
    """PEFT's lora.Linear over Conv1D (fan_in_fan_out=True): forward and the LoRA factors' gradients; its saved
    adapter loaded into and saved from the shards."""
    pytest.importorskip("peft")
    results = ranks(2).run(peft_worker, timeout=90)
    for n, trainable, _ in results:
        assert n == 2 * 4 * 2 and trainable == ["lora_A", "lora_B"], (n, trainable)  # 2 blocks x 4 layers x 2
    assert [flag for *_, flag in results] == [True, None]


def test_gpt2_errors_raise_on_every_rank(ranks):
    seen = ranks(2).run(errors_worker, timeout=90)
    assert seen[0] == seen[1], seen
    s = seen[0]
    assert "transformer.h.0.attn.num_heads=3 is not divisible by the world size 2" in s["heads"], s
    assert "cross-attention" in s["cross"] and "q_attn" in s["cross"], s
    assert not any("model changed" in v for v in s.values()), s
