"""tensor_parallelize checks first that every rank of the group shards the same model with the same arguments: one
all-gather of a digest (one code per argument, one hash of the model's structure), then the same ValueError on every
rank naming what differs, with every rank's value. was: ranks passing different chunks / overlap / pieces / transport
/ vocab_parallel, or models of different shapes or head counts, were sharded without a word, and their layers'
collectives then paired different messages (garbage, or a hang until the process group's timeout).

Two spawned gloo ranks (conftest's pool2), tiny models: one task runs every case.
"""
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
