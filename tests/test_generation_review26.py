"""generate(strategy="beam", num_beams=1) with stop sequences: the row lengths its scores divide by are counted while
decoding (a stop test per generated token afterwards cost max_new_tokens more launches), on a toy model whose
greedy path is known."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmkern.generation import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
V = 16


class _NextToken(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: greedy decoding goes id -> id + 1 (mod V), at a log-probability that differs
    per id (so that a wrong length in a score shows). No cache (generate(use_cache=False))."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        table = torch.randn(V, V, generator=g) * 0.5
        table[torch.arange(V), (torch.arange(V) + 1) % V] = 3.0 + torch.rand(V, generator=g)
        self.register_buffer("table", table)

    def forward(self, ids, cache=None, last_only=False, **kw):
        return self.table[ids[:, -1:] if last_only else ids]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(fn):
    with torch.no_grad(), _CountOps() as c:
        fn()
    return c.n


def test_one_beam_counts_lengths_while_decoding():
    """Row 0 (4, 5, 6) stops on [5, 6] at its 3rd new token, row 1 on its eos at its 5th: the scores are the greedy
    log-probabilities summed up to the stop over (3, 5) ** length_penalty. Per decode step, num_beams=1 costs
    greedy's launches plus one (the length count), whatever the stop test costs; the old code ran the stop test
    again for each generated token after decoding (+6 launches per step here)."""
    m = _NextToken()
    x = torch.tensor([[2, 3], [9, 10]])
    kw = dict(eos_token_id=15, pad_token_id=0, stop_sequences=[[5, 6]], use_cache=False)
    greedy = generate(m, x, 6, return_dict=True, **kw)
    # (row 1 ends with the eos at its 5th new token: every row has finished, the decoding too)
    assert greedy.sequences[:, 2:].tolist() == [[4, 5, 6, 0, 0], [11, 12, 13, 14, 15]]
    one = generate(m, x, 6, strategy="beam", num_beams=1, length_penalty=1.5, return_dict=True, **kw)
    assert torch.equal(one.sequences, greedy.sequences)
    torch.testing.assert_close(one.scores, greedy.scores.sum(-1) / torch.tensor([3.0, 5.0]) ** 1.5)

    kw = dict(kw, eos_token_id=None)  # (no row ends before max_new_tokens but row 0: every step runs)
    steps = {}
    for name, extra in (("greedy", {}), ("beam1", dict(strategy="beam", num_beams=1))):
        few, many = (_ops(lambda: generate(m, x, n, **kw, **extra)) for n in (3, 9))
        steps[name] = (many - few) / 6
    assert steps["beam1"] <= steps["greedy"] + 1, steps
