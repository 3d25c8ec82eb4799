"""tensor_parallelize checks first that every rank of the group shards the same model with the same arguments: one
all-gather of a digest (one code per argument, one hash of the model's structure), then the same ValueError on every
rank naming what differs, with every rank's value. was: ranks passing different chunks / overlap / pieces / transport
/ vocab_parallel, or models of different shapes or head counts, were sharded without a word, and their layers'
collectives then paired different messages (garbage, or a hang until the process group's timeout).

Two spawned gloo ranks (conftest's pool2, which ranks(2) returns too), tiny models.

The cross-rank guards of llmkern.parallel.guards, also a clear error on every rank:

- generate on a sharded model with arguments that differ across the ranks (max_new_tokens, strategy, eos, the
  prompts, the generator state when sampling without seed=, model.generation_config: the defaults of arguments left
  at FROM_MODEL, the same on every rank while the resolved values differ). was: the ranks ran different numbers of
  collectives (a hang until the process group's timeout) or fed different tokens to the sharded layers (garbage).
- tensor_parallelize on ranks holding different weights (one rank unseeded; one parameter changed, or transposed).
  was: sharded without a word, the outputs silently wrong.
- tensor_parallelize on a model sharded already. was: "found no projection to shard".
- a forward of a sharded model with other tokens (same shape) on one rank, as each rank loading its own batch.
  was: every rank's output silently wrong (the sharded layers mixed the ranks' sequences).
"""
import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.parallel import ColumnParallelLinear, tensor_parallelize

pytestmark = pytest.mark.usefixtures("one_thread")


class Attn(nn.Module):
    def __init__(self, d=8, n_head=2):
        super().__init__()
        self.n_head, self.head_dim = n_head, d // n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for f in (self.q_proj, self.k_proj, self.v_proj))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, d=8, f=16):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


class TinyLM(nn.Module):
    def __init__(self, f=16, n_head=2):
        super().__init__()
        torch.manual_seed(0)  # (the same weights on every rank)
        self.embed_tokens, self.attn, self.mlp, self.lm_head = nn.Embedding(12, 8), Attn(8, n_head), MLP(8, f), \
            nn.Linear(8, 12)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + self.attn(h)
        return self.lm_head(h + self.mlp(h))


def _state(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    types, state = _state(model)
    return types == snap[0] and state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k])
                                                                       for k in state)


def _refusal(rank, tag, make, kw):
    """(tag, exception type, message) of tensor_parallelize(make(), **kw) on this rank, or a failure line."""
    model = make()
    snap = _state(model)
    try:
        tensor_parallelize(model, **kw)
    except (TypeError, ValueError) as e:
        if not _unchanged(model, snap):
            return f"{tag}: rank {rank}: the model was changed"
        return tag, type(e).__name__, str(e)
    return f"{tag}: rank {rank}: no error"


def _case_agreement(rank, p):
    out = {"failures": [], "refusals": []}
    ids = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))
    want = TinyLM()(ids)
    # the same arguments (None and the default it stands for are the same): sharded, and right
    for kw in (dict(chunks=2, pieces=1), dict(overlap="none"),
               dict(chunks=None if rank == 0 else max(4, p), pieces=None if rank == 1 else 2, vocab_parallel=True),
               dict(transport="collective")):
        try:
            model = tensor_parallelize(TinyLM(), **kw)
            if not isinstance(model.mlp.up_proj, ColumnParallelLinear) or model.attn.n_head != 2 // p:
                out["failures"].append(f"{kw}: not sharded")
            torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
        except Exception as e:  # noqa: BLE001  (reported to the parent)
            out["failures"].append(f"{kw}: {type(e).__name__}: {e}")
    # arguments, or models, that differ across the ranks: the same ValueError on both, the model unchanged
    cases = [
        ("chunks", TinyLM, dict(chunks=2 + rank)),
        ("overlap", TinyLM, dict(overlap=("ring", "none")[rank])),
        ("pieces and transport", TinyLM, dict(pieces=1 + rank, transport=("p2p", "collective")[rank])),
        ("vocab_parallel", TinyLM, dict(vocab_parallel=bool(rank))),
        ("chunks as a float", TinyLM, dict(chunks=(4, 4.0)[rank])),
        ("layer shape", lambda: TinyLM(f=16 + 16 * rank), {}),
        ("head count", lambda: TinyLM(n_head=2 + 2 * rank), {}),  # (the same parameter shapes)
        ("bad flag on rank 1", TinyLM, dict(vocab_parallel=(False, "False")[rank])),
    ]
    for tag, make, kw in cases:
        r = _refusal(rank, tag, make, kw)
        (out["failures"] if isinstance(r, str) else out["refusals"]).append(r)
    # then a collective that works: no rank was left behind
    t = torch.ones(1)
    dist.all_reduce(t)
    if t.item() != p:
        out["failures"].append(f"final all-reduce gave {t.item()}")
    return out


def test_tensor_parallelize_ranks_must_agree(pool2):
    t0 = time.monotonic()
    results = pool2.run(_case_agreement, timeout=100)
    assert time.monotonic() - t0 < 30, "a refusal waited for a timeout"
    assert [r["failures"] for r in results] == [[], []], results
    rank0, rank1 = (dict((tag, (exc, msg)) for tag, exc, msg in r["refusals"]) for r in results)
    assert rank0.keys() == rank1.keys()
    expect = {
        "chunks": ["chunks (rank 0: 2, rank 1: 3)"],
        "overlap": ["overlap (rank 0: 'ring', rank 1: 'none')"],
        "pieces and transport": ["pieces (rank 0: 1, rank 1: 2)", "transport (rank 0: 'p2p', rank 1: 'collective')"],
        "vocab_parallel": ["vocab_parallel (rank 0: False, rank 1: True)"],
        "chunks as a float": ["chunks (rank 0: 4, rank 1: another value)"],
        "layer shape": ["the model (", "parameter elements: rank 0: "],
        "head count": ["the model ("],
    }
    for tag, words in expect.items():
        (exc0, msg0), (exc1, msg1) = rank0[tag], rank1[tag]
        assert exc0 == exc1 == "ValueError" and msg0 == msg1, (tag, msg0, msg1)  # the same error on both
        assert "tensor_parallelize: the ranks of the group disagree on" in msg0
        for w in words:
            assert w in msg0, (tag, w, msg0)
        others = {"chunks", "overlap", "pieces", "transport", "vocab_parallel", "the model"} - \
            {w.split(" (")[0].split(",")[0] for w in words}
        assert not [o for o in others if f"{o} (" in msg0], (tag, msg0)  # only what differs is named
    # a flag bad on one rank: its own TypeError there, a ValueError naming that rank on the other (no hang)
    assert rank1["bad flag on rank 1"][0] == "TypeError" and "vocab_parallel" in rank1["bad flag on rank 1"][1]
    assert rank0["bad flag on rank 1"] == ("ValueError", rank0["bad flag on rank 1"][1])
    assert "failed on rank(s) [1]" in rank0["bad flag on rank 1"][1]


# ---- llmkern.parallel.guards (same module: its 2 ranks serve these too) ----

def _gpt(seed=0):
    from llmkern.models import GPT, get_config

    torch.manual_seed(seed)
    return GPT(get_config("gpt-tiny").replace(vocab_size=101), backend="torch")


def _outcome(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _all_met(p):
    """A collective after the cases: every rank got here (none is left waiting in another)."""
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == p


def _case_generate(rank, p):
    from llmkern.generation import generate
    from llmkern.parallel import tensor_parallelize

    ref = _gpt()
    model = tensor_parallelize(copy.deepcopy(ref))
    ids = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(1))
    out = {"unsharded, rank 0 alone": _outcome(lambda: generate(ref, ids, 2)) if rank == 0 else "no error",
           "same": torch.equal(generate(model, ids, 4), generate(ref, ids, 4))}
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 101
    t0 = time.monotonic()
    for tag, kw in (("max_new_tokens", dict(max_new_tokens=3 + rank)),
                    ("strategy", dict(max_new_tokens=3, strategy=("greedy", "sample")[rank], seed=1)),
                    ("eos_token_id", dict(max_new_tokens=3, eos_token_id=(None, 5)[rank])),
                    ("input_ids", dict(input_ids=(ids, other)[rank], max_new_tokens=3))):
        kw = dict(dict(input_ids=ids), **kw)
        out[tag] = _outcome(lambda: generate(model, **kw))
    torch.manual_seed(rank)  # (the generators differ: sampling without seed= draws different tokens)
    out["generator"] = _outcome(lambda: generate(model, ids, 3, strategy="sample"))
    out["generation_config"] = _outcome(lambda: _with_defaults(model, ids, repetition_penalty=(1.0, 1.5)[rank]))
    out["same generation_config"] = _outcome(lambda: _with_defaults(model, ids, repetition_penalty=1.5))
    out["seconds"] = time.monotonic() - t0
    out["met"] = _all_met(p)
    return out


def _with_defaults(model, ids, **defaults):
    """generate with every argument the same, model.generation_config set to `defaults` (may differ per rank)."""
    from llmkern.generation import GenerationDefaults, generate

    model.generation_config = GenerationDefaults(**defaults)
    try:
        generate(model, ids, 3)
    finally:
        del model.generation_config


def test_generate_arguments_must_agree_on_tensor_parallel_ranks(ranks):
    results = ranks(2).run(_case_generate, timeout=60)
    r0, r1 = results
    assert r0["met"] and r1["met"] and r0["same"] and r1["same"], results
    assert r0["unsharded, rank 0 alone"] == "no error", r0  # (no collective for a model that is not sharded)
    assert r0["same generation_config"] == r1["same generation_config"] == "no error", results
    assert r0["seconds"] < 10, "a refusal waited for a timeout"
    for tag, words in (("max_new_tokens", "max_new_tokens (rank 0: 3, rank 1: 4)"), ("strategy", "strategy"),
                       ("eos_token_id", "eos_token_id"), ("input_ids", "input_ids"),
                       ("generator", "random generator state"),
                       ("generation_config", "model.generation_config (the defaults")):
        assert r0[tag] == r1[tag], (tag, r0[tag], r1[tag])  # the same error on both ranks
        assert r0[tag].startswith("ValueError: generate: the ranks of the tensor-parallel model disagree on"), r0[tag]
        assert words in r0[tag], (tag, r0[tag])


def _case_weights(rank, p):
    from llmkern.parallel import tensor_parallelize

    def changed(fn):
        model = _gpt()
        with torch.no_grad():
            fn(model)
        return model

    def transposed(model):
        w = model.h[1].attn.o_proj.weight
        w.copy_(w.t().clone())

    cases = {
        "unseeded": lambda: _gpt(seed=rank),
        "one norm gain": lambda: changed(lambda m: m.ln_f.weight.add_(1e-7 * rank)),
        "transposed": lambda: changed(transposed if rank else (lambda m: None)),
    }
    out = {}
    for tag, make in cases.items():
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out[tag] = _outcome(lambda: tensor_parallelize(model))
        out[tag + " unchanged"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    out["opted out"] = _outcome(lambda: tensor_parallelize(_gpt(seed=rank), check_weights=False))
    out["flag differs"] = _outcome(lambda: tensor_parallelize(_gpt(), check_weights=bool(rank)))
    out["met"] = _all_met(p)
    return out


def test_tensor_parallelize_refuses_ranks_with_different_weights(ranks):
    r0, r1 = ranks(2).run(_case_weights, timeout=60)
    assert r0["met"] and r1["met"] and r0["opted out"] == "no error", (r0, r1)
    for tag, name in (("unseeded", "'wte.weight'"), ("one norm gain", "'ln_f.weight'"),
                      ("transposed", "'h.1.attn.o_proj.weight'")):
        assert r0[tag] == r1[tag], (tag, r0[tag], r1[tag])
        assert r0[tag].startswith("ValueError: tensor_parallelize: the ranks hold different weights: parameter "
                                  + name), (tag, r0[tag])
        assert r0[tag + " unchanged"] and r1[tag + " unchanged"], tag
    assert r0["flag differs"] == r1["flag differs"], (r0, r1)  # (the flag is agreed first: no rank left waiting)
    assert "check_weights (rank 0: False, rank 1: True)" in r0["flag differs"], r0["flag differs"]


def _case_twice(rank, p):
    from llmkern.parallel import ColumnParallelLinear, RowParallelLinear, tensor_parallelize

    model = tensor_parallelize(_gpt())
    sub = _gpt()
    tensor_parallelize(sub.h[0])  # (a module of it sharded: the whole model is refused too)

    class ByHand(torch.nn.Module):  # sharded by hand: no projection left to shard
        def __init__(self):
            super().__init__()
            self.up_proj, self.down_proj = ColumnParallelLinear(8, 16), RowParallelLinear(16, 8)

    return {"twice": _outcome(lambda: tensor_parallelize(model)),
            "module first": _outcome(lambda: tensor_parallelize(sub)),
            "by hand": _outcome(lambda: tensor_parallelize(ByHand())), "met": _all_met(p)}


def test_tensor_parallelize_refuses_a_sharded_model(ranks):
    r0, r1 = ranks(2).run(_case_twice, timeout=60)
    assert r0 == r1 and r0["met"], (r0, r1)
    for tag in ("twice", "module first", "by hand"):
        assert r0[tag].startswith("ValueError: tensor_parallelize: the model is already tensor-parallel"), r0[tag]


def _case_forward(rank, p):
    from llmkern.parallel import tensor_parallelize

    ref = _gpt()
    model = tensor_parallelize(copy.deepcopy(ref))
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(rank))
    same = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = {"other tokens": _outcome(lambda: model(ids))}
        out["same"] = torch.allclose(model(same)[0], ref(same)[0], atol=1e-5)
    out["met"] = _all_met(p)
    return out


def test_tensor_parallel_forward_refuses_different_tokens_on_the_ranks(ranks):
    r0, r1 = ranks(2).run(_case_forward, timeout=60)
    assert r0 == r1 and r0["met"] and r0["same"], (r0, r1)
    assert r0["other tokens"].startswith("ValueError: input_ids: the ranks of a tensor-parallel model must all pass "
                                         "the same input_ids; those of rank(s) [1] differ"), r0["other tokens"]


def test_agreement_keys_read_numpy_scalars_as_their_values():
    """generate's cross-rank agreement compared np.int64(3) with 3 as different (a false mismatch for a rank
    passing numpy ids, e.g. sequence_bias keys) and every numpy bool as equal to every other."""
    import numpy as np

    from llmkern.parallel.guards import _key

    assert _key(np.int64(3)) == _key(3) and _key(np.float32(0.5)) == _key(0.5)
    assert _key(np.True_) != _key(np.False_) and _key(np.True_) == _key(True) != _key(1)
    assert _key({(np.int64(3), np.int64(4)): 1.0}) == _key({(3, 4): 1.0}) != _key({(4, 3): 1.0})
