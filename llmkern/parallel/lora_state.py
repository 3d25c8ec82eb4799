"""LoRA factors of tensor-parallel layers as whole matrices, and back.

A ColumnParallelLinear keeps the full lora_A [r, in] (replicated) and its rows of lora_B
[out/p, r] (segment by segment for a fused projection); a RowParallelLinear keeps its columns
of lora_A [r, in/p] and the full lora_B [out, r]. llmkern.peft's PEFT checkpoint writer gathers
them (a collective: every rank of the layer's group calls it) and its reader copies each rank's
shard back, so an adapter trained under tensor parallelism saves the same files as the
unsharded model and loads into either.

A sharded layer's scale is its ``lora_scaling``; its ``lora_alpha`` / ``lora_use_rslora`` (recorded by
``from_linear`` from the LoRA wrapper, and by the loader) are what the writer puts in the config when
they still give back that scaling exactly; otherwise the writer derives alpha from the scaling
(``alpha_for``).
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from llmkern.parallel import comm
from llmkern.peft.lora import lora_scaling
from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear, column_rows


def parallel_layers(model: nn.Module):
    """[(name, layer)] of the model's ColumnParallelLinear / RowParallelLinear layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def _segments(layer):
    return list(getattr(layer, "segments", None) or [layer.out_features])


def gathered_lora(layer):
    """(A [r, in], B [out, r]) of a parallel layer with LoRA, whole (a collective over its group)."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    p = layer.world_size
    if p == 1:
        return A.clone(), B.clone()
    if isinstance(layer, RowParallelLinear):
        return comm.all_gather_last_dim(A.contiguous(), layer.group), B.clone()
    rows = comm.all_gather_dim0(B.contiguous(), layer.group)  # rank-major: each rank's segment parts
    per_rank = rows.view(p, -1, B.shape[1])
    parts, lo = [], 0
    for n in _segments(layer):  # segment j is rank 0's part j, rank 1's part j, ...
        k = n // p
        parts.append(per_rank[:, lo:lo + k].reshape(n, B.shape[1]))
        lo += k
    return A.clone(), torch.cat(parts, 0)


def shard_of(layer, A, B):
    """This rank's (lora_A, lora_B) shard of whole A [r, in] and B [out, r]."""
    p, r = layer.world_size, layer.rank
    if isinstance(layer, RowParallelLinear):
        k = layer.in_features // p
        return A[:, r * k:(r + 1) * k], B
    return A, column_rows(B, _segments(layer), p, r)


def writer(layers):
    """(whether this process writes shared files, the group to wait on): global rank 0 of the
    layers' group (one group for all of them, as tensor_parallelize builds)."""
    groups = {id(layer.group): layer.group for _, layer in layers}
    if len(groups) != 1:
        raise ValueError("the model's tensor-parallel layers use several process groups; saving their LoRA "
                         "needs one group")
    group = next(iter(groups.values()))
    return dist.get_rank() == comm.global_rank(group, 0), group


def recorded_rslora(layer):
    """The layer's recorded use_rslora when its recorded alpha still gives its scaling, else None."""
    alpha, rs = getattr(layer, "lora_alpha", None), getattr(layer, "lora_use_rslora", None)
    if alpha is None or rs is None or layer.lora_A is None:
        return None
    return bool(rs) if lora_scaling(alpha, layer.lora_A.shape[0], rs) == float(layer.lora_scaling) else None


def alpha_for(layer, r, use_rslora):
    """The lora_alpha to write for a sharded layer of rank r so that a reader computing
    alpha / r (alpha / sqrt(r) with use_rslora) gets exactly its lora_scaling s: the recorded alpha
    when it does, else s·r (s·sqrt(r)) or one of its nearest floats. ValueError if none does."""
    s = float(layer.lora_scaling)
    rec, rs = getattr(layer, "lora_alpha", None), getattr(layer, "lora_use_rslora", None)
    if rec is not None and rs is not None and bool(rs) == use_rslora and lora_scaling(rec, r, use_rslora) == s:
        return rec
    a = s * (math.sqrt(r) if use_rslora else r)
    cands = [a]
    up = down = a
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        cands += [up, down]
    for c in cands:
        if math.isfinite(c) and lora_scaling(c, r, use_rslora) == s:
            return c
    raise ValueError(f"no lora_alpha gives back the scaling {s!r} of a rank-{r} layer exactly "
                     f"(use_rslora={use_rslora})")


def finish_write(group, error):
    """After the writing rank tried to write (error: the exception it raised, or None; other ranks pass
    None): every rank returns once the files are there, or raises. One small all-reduce over `group`
    instead of a barrier, so that a failed write does not leave the other ranks waiting."""
    dev = comm._meta_device(None, group)
    flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if flag.item():
        raise RuntimeError("save_peft_adapter: the writing rank (global rank 0 of the tensor-parallel group) "
                           "failed to write the adapter; see its error")
