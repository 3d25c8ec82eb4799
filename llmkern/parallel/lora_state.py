"""LoRA factors of tensor-parallel layers as whole matrices, and back.

A ColumnParallelLinear keeps the full lora_A [r, in] (replicated) and its rows of lora_B
[out/p, r] (segment by segment for a fused projection); a RowParallelLinear keeps its columns
of lora_A [r, in/p] and the full lora_B [out, r]. llmkern.peft's PEFT checkpoint writer gathers
them (a collective: every rank of the layer's group calls it) and its reader copies each rank's
shard back, so an adapter trained under tensor parallelism saves the same files as the
unsharded model and loads into either.
"""
import torch
from torch import nn

from llmkern.parallel import comm
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
    import torch.distributed as dist

    return dist.get_rank() == comm.global_rank(group, 0), group
