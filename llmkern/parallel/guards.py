"""Cross-rank agreement checks that tensor parallelism needs and cannot see inside a single layer call.

- ``weight_fingerprints(model)``: tensor_parallelize compares them across the ranks before sharding, since ranks
  holding different weights (one unseeded, or another checkpoint) shard without error and compute garbage.
- ``check_generate_agreement(model, args)``: llmkern.generate's hook; ranks of a sharded model that call generate
  with different loop-shaping arguments run different numbers of collectives (a hang until the process group's
  timeout) or feed different tokens to the sharded layers (garbage).
"""
import dataclasses
import hashlib
import numbers
import sys

import torch
import torch.nn as nn

from llmkern.parallel import comm

_BLOCK = 1 << 24  # elements per reduction in a fingerprint: its int64 temporaries stay under 128 MiB
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- weight fingerprints ----------------------------------------------------------------------------------

def _bits(t):
    """t's bit patterns as integers, [rows, cols]: integer sums do not depend on the reduction order (thread
    counts, kernels), so identical weights give identical fingerprints, which float sums would not promise.
    Read 8 bytes at a time where the rows allow it: torch's CPU sums of int32 / int16 into int64 run at a tenth
    of the speed of int64 ones."""
    x = t.detach()
    x = (x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)).contiguous()
    if (x.shape[1] * x.element_size()) % 8 == 0 and (x.storage_offset() * x.element_size()) % 8 == 0:
        return x.view(torch.int64)
    return x.view(_INT_OF_SIZE.get(x.element_size(), torch.int64))  # (16-byte elements: two int64 each)


def _fingerprint(t):
    """int64 [3] on t's device: the sum of t's bits, and its row and column sums weighted by their index (so that
    transposed or permuted weights differ too). Integer overflow wraps, alike on every rank."""
    if t.is_meta or t.numel() == 0:
        return None
    x = _bits(t)
    rows, cols = x.shape
    step = max(1, _BLOCK // cols)
    by_row = torch.zeros((), dtype=torch.int64, device=x.device)
    by_col = torch.zeros(cols, dtype=torch.int64, device=x.device)
    for i in range(0, rows, step):
        block = x[i:i + step]
        index = torch.arange(i + 1, i + 1 + block.shape[0], device=x.device)
        by_row += (block.sum(1, dtype=torch.int64) * index).sum()
        by_col += block.sum(0, dtype=torch.int64)
    col_index = torch.arange(1, cols + 1, device=x.device)
    return torch.stack([by_col.sum(), by_row, (by_col * col_index).sum()])


def _rank_local(model):
    """ids of the parameters of layers that are parallel already (tensor-parallel shards, experts): they differ
    across the ranks by design."""
    return {id(p) for m in model.modules() if isinstance(m, comm.SharesProcessGroups) and isinstance(m, nn.Module)
            for p in m.parameters(recurse=False)}


def weight_fingerprints(model):
    """[(name, int)] for every parameter of `model` but those of parallel layers: one hash of its fingerprint each,
    equal across ranks exactly when the weights are (up to hash collisions). One pass over the weights on their
    devices and one host read per device. A parameter on the meta device has no values: its fingerprint is that of
    an empty one on every rank (compared equal; tensor_parallelize's docstring says where such weights are checked:
    load_full_state_dict)."""
    skip = _rank_local(model)
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in skip]
    on_device = {}  # device -> [(index, fingerprint)]: one copy to the host per device
    for i, (_, p) in enumerate(named):
        try:
            f = _fingerprint(p)
        except (RuntimeError, TypeError):  # (a tensor subclass without these ops: the same on every rank)
            f = None
        if f is not None:
            on_device.setdefault(f.device, []).append((i, f))
    values = [[0, 0, 0] for _ in named]
    for items in on_device.values():
        for (i, _), v in zip(items, torch.stack([f for _, f in items]).tolist()):
            values[i] = v
    return [(n, _hash(v)) for (n, _), v in zip(named, values)]


def _hash(value):
    """A signed int64 of repr(value), the same in every process (Python's str hash is salted per process)."""
    h = int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little")
    return h - 2 ** 64 if h >= 2 ** 63 else h


def weights_digest(fingerprints):
    """One int64 for all the fingerprints (the first all-gather compares it; names come only on a mismatch)."""
    return _hash([v for _, v in fingerprints])


def raise_weight_mismatch(fingerprints, group, what):
    """Called by every rank once the digests differ: one all-gather of the per-parameter fingerprints (the same
    parameter list on every rank: the model structures agreed), then the same ValueError everywhere naming the
    first parameter that differs."""
    rows = comm.gather_ints([v for _, v in fingerprints], group)
    differ = [k for k in range(len(fingerprints)) if any(r[k] != rows[0][k] for r in rows)]
    first = fingerprints[differ[0]][0] if differ else "(none found: a parameter of a parallel layer?)"
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault(r[differ[0]] if differ else 0, []).append(i)
    raise ValueError(f"{what}: the ranks hold different weights: parameter {first!r} differs (ranks "
                     f"{' vs '.join(str(g) for g in groups.values())}), {len(differ)} parameter(s) in all. Every "
                     f"rank must hold the same weights before sharding (seed every rank alike, or load the same "
                     f"checkpoint on every rank); the model is left unchanged")


# ---- generate ---------------------------------------------------------------------------------------------

_OUTPUT_ONLY = {"model", "return_dict", "top_logprobs"}  # (they change what is returned, not the collectives)


def tensor_parallel_group(*models):
    """The process group (of more than one rank) of the first tensor-parallel layer in `models`, or None."""
    from llmkern.parallel.layers import _ParallelLinear
    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead

    kinds = (_ParallelLinear, VocabParallelEmbedding, VocabParallelLMHead)
    moe = sys.modules.get("llmkern.parallel.moe")  # (not imported: no sharded experts exist)
    kinds += (moe.ShardedExperts,) if moe is not None else ()
    for model in models:
        if not isinstance(model, nn.Module):
            continue
        for m in model.modules():
            if isinstance(m, kinds) and comm.world_size(m.group) > 1:
                return m.group
    return None


def _tensor_bytes(t):
    t = t.detach()
    if t.is_meta or t.layout != torch.strided:
        return b""
    return t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_hash(t):
    """A signed int64 of t's dtype, shape and bytes (read on the host), the same in every process."""
    return _hash(("tensor", str(t.dtype), tuple(t.shape), hashlib.blake2b(_tensor_bytes(t), digest_size=16).digest()))


def _code(v):
    """(shown, value): an int shown in the error as itself (shown=1), else a hash of the value: a tensor's dtype,
    shape and bytes (on the host: once per call), a container's items, another object's type (a scorer function
    or a draft model cannot be compared across processes). Never raises: a rank that raised here would leave the
    others waiting in the all-gather."""
    try:
        if isinstance(v, numbers.Integral) and not isinstance(v, bool) and -2 ** 62 < int(v) < 2 ** 62:
            return 1, int(v)
        return 0, _hash(_key(v))
    except Exception:  # noqa: BLE001  (generate's own checks then say what is wrong with it)
        return 0, _hash(("unreadable", type(v).__qualname__))


def _key(v):
    if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:  # a numpy scalar: as its Python value
        v = v.item()  # (np.int64(3) and 3 differed, and every numpy bool agreed with every other)
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):  # (0.8 and numpy's 0.8 alike)
        return "real", float(v)
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return "int", int(v)
    if v is None or isinstance(v, (bool, numbers.Number, str, bytes)):
        return type(v).__name__, v
    if torch.is_tensor(v):
        return "tensor", tensor_hash(v)
    if isinstance(v, (list, tuple)):
        return type(v).__name__, [_key(x) for x in v]
    if isinstance(v, dict):  # (keys by their own _key: sequence_bias's (3, 4) with numpy ints is (3, 4))
        return "dict", sorted(((_key(k), _key(x)) for k, x in v.items()), key=repr)
    return type(v).__module__, type(v).__qualname__


def _rng_key(args):
    """Sampling without seed= takes fresh seeds from torch's generator of the prompt's device: ranks whose
    generators differ draw different tokens (the ranks' sharded layers then mix different sequences)."""
    ids = args.get("input_ids")
    if args.get("strategy") != "sample" or args.get("seed") is not None or not torch.is_tensor(ids):
        return None
    try:  # (never raises, as _code)
        if ids.device.type == "cuda":
            index = torch.cuda.current_device() if ids.device.index is None else ids.device.index
            return _hash(torch.cuda.default_generators[index].get_state().tolist())
        return _hash(torch.default_generator.get_state().tolist()) if ids.device.type == "cpu" else None
    except Exception:  # noqa: BLE001
        return None


def _generation_config(model):
    """model.generation_config (a dataclass: its fields as a dict), where generate resolves the arguments left at
    FROM_MODEL: ranks that loaded different ones pass the same arguments yet decode differently. Never raises."""
    try:
        cfg = getattr(model, "generation_config", None)
        return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else cfg
    except Exception:  # noqa: BLE001  (as _code)
        return ("unreadable generation_config",)


def check_generate_agreement(model, args):
    """generate's hook (`args`: its arguments, locals() at its top). On a tensor-parallel model (or draft model),
    one all-gather of a code per argument over its group, then the same ValueError on every rank naming the
    arguments that differ (and model.generation_config, where the arguments left at FROM_MODEL come from); nothing
    (no collective, no host read) on any other model."""
    group = tensor_parallel_group(model, args.get("draft_model"))
    if group is None:
        return
    names = sorted(k for k in args if k not in _OUTPUT_ONLY)
    codes = [c for n in names for c in _code(args[n])] + list(_code(_rng_key(args)))
    codes += _code(_generation_config(model))
    rows = comm.agree(group, "generate", codes)
    differ = []
    for k, name in enumerate(names + ["torch's random generator state (strategy='sample' without seed=)",
                                      "model.generation_config (the defaults of the arguments left at FROM_MODEL)"]):
        if any(r[2 * k:2 * k + 2] != rows[0][2 * k:2 * k + 2] for r in rows):
            shown = all(r[2 * k] for r in rows)
            differ.append(name + (" (" + ", ".join(f"rank {i}: {r[2 * k + 1]}" for i, r in enumerate(rows)) + ")"
                                  if shown else ""))
    if differ:
        raise ValueError(f"generate: the ranks of the tensor-parallel model disagree on {'; '.join(differ)}. Every "
                         f"rank must call generate with the same arguments, prompts and model.generation_config: "
                         f"otherwise they run different numbers of collectives (a hang) or feed different tokens to "
                         f"the sharded layers (wrong outputs); for sampling, pass seed= or seed every rank alike")
