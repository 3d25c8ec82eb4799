"""Audit of the tensor-parallel linear layers against the unsharded nn.Linear, on shapes and states the other
tests leave out: empty batches, 4-D and non-contiguous inputs, frozen weights with an input that needs no gradient,
two accumulated backwards, float16 under CPU autocast, and LoRA on a frozen base under autocast. Every output and
every gradient (input, weight, bias, LoRA factors) must be the unsharded layer's shard, for column / row layers,
sequence parallelism on and off, and both overlaps (ring: chunked all-reduce, ring all-gather / reduce-scatter).

No bug was found by this audit: these are regression checks. One spawn of 2 gloo ranks for the module.
"""
import copy

import torch
import torch.nn as nn

from llmkern.parallel import ColumnParallelLinear, RowParallelLinear
from llmkern.parallel import layers as tp_layers
from llmkern.testing import collect_close, raise_failures

K, N = 8, 6


def _shard(t, rank, p, dim):
    n = t.shape[dim] // p
    return t.narrow(dim, rank * n, n)


class _LoRA(nn.Module):
    """A PEFT-style LoRA wrapper on a frozen base (from_linear reads .base_layer / lora_A / lora_B / scaling)."""

    def __init__(self, base, r=2, scaling=0.5):
        super().__init__()
        self.base_layer, self.scaling = base, scaling
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)  # (PEFT's zeros would make every factor gradient trivial)
        base.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _input(shape, noncontig):
    """x of `shape` (last dim K); noncontig: the same values in a permuted (strided) layout."""
    if not noncontig:
        return torch.randn(*shape)
    lead = shape[:-1]
    return torch.randn(*reversed(lead), K).permute(*reversed(range(len(lead))), len(lead))


def _layer_case(rank, p, failures, kind, shape, sp, overlap, noncontig=False, frozen=False, x_grad=True, steps=1):
    tag = f"{kind} {shape} sp={sp} overlap={overlap} noncontig={noncontig} frozen={frozen} x_grad={x_grad} x{steps}"
    torch.manual_seed(0)
    ref = nn.Linear(K, N)
    ref.weight.requires_grad_(not frozen)
    x = _input(shape, noncontig)
    dy = torch.randn(*shape[:-1], N)
    x_ref = x.clone().requires_grad_(x_grad)
    if kind == "column":
        layer = ColumnParallelLinear.from_linear(copy.deepcopy(ref), sequence_parallel=sp, overlap=overlap)
        x_loc = _shard(x, rank, p, 0) if sp else x  # token shard: dim 0
    else:
        layer = RowParallelLinear.from_linear(copy.deepcopy(ref), sequence_parallel=sp, overlap=overlap)
        x_loc = _shard(x, rank, p, x.dim() - 1)  # feature shard (a strided view when noncontig)
    x_loc = x_loc.detach().requires_grad_(x_grad)
    for _ in range(steps):  # accumulated backwards: .grad sums as nn.Linear's does
        y_ref = ref(x_ref)
        (y_ref * dy).sum().backward()
        y = layer(x_loc)
        if kind == "column":
            want, dy_loc = _shard(y_ref.detach(), rank, p, y_ref.dim() - 1), _shard(dy, rank, p, dy.dim() - 1)
        else:
            want, dy_loc = (_shard(y_ref.detach(), rank, p, 0), _shard(dy, rank, p, 0)) if sp else (y_ref.detach(), dy)
        collect_close(f"{tag}: output", y, want, failures)
        (y * dy_loc).sum().backward()
    if x_grad:
        if kind == "row":
            want_dx = _shard(x_ref.grad, rank, p, x.dim() - 1)
        else:
            want_dx = _shard(x_ref.grad, rank, p, 0) if sp else x_ref.grad
        collect_close(f"{tag}: input grad", x_loc.grad, want_dx, failures)
    if frozen:
        if layer.weight.grad is not None:
            failures.append(f"{tag}: the frozen weight got a gradient")
    else:
        collect_close(f"{tag}: weight grad", layer.weight.grad,
                      _shard(ref.weight.grad, rank, p, 0 if kind == "column" else 1), failures)
    want_db = _shard(ref.bias.grad, rank, p, 0) if kind == "column" else ref.bias.grad
    collect_close(f"{tag}: bias grad", layer.bias.grad, want_db, failures)


def _mlp_autocast_case(rank, p, failures, sp, overlap, lora):
    """column -> relu -> row under CPU float16 autocast (LoRA: frozen float32 base, two accumulated steps)."""
    tag = f"autocast fp16 mlp sp={sp} overlap={overlap} lora={lora}"
    torch.manual_seed(1)
    c_ref, r_ref = nn.Linear(K, N), nn.Linear(N, K)
    if lora:
        c_ref, r_ref = _LoRA(c_ref), _LoRA(r_ref)
    c = ColumnParallelLinear.from_linear(copy.deepcopy(c_ref), sequence_parallel=sp, overlap=overlap)
    r = RowParallelLinear.from_linear(copy.deepcopy(r_ref), sequence_parallel=sp, overlap=overlap)
    x = torch.randn(4, 2, K)
    x_ref = x.clone().requires_grad_()
    x_loc = (_shard(x, rank, p, 0) if sp else x).clone().requires_grad_()
    for _ in range(2 if lora else 1):
        with torch.autocast("cpu", dtype=torch.float16):
            y_ref = r_ref(torch.relu(c_ref(x_ref)))
            y = r(torch.relu(c(x_loc)))
        if y.dtype != y_ref.dtype:
            failures.append(f"{tag}: output dtype {y.dtype}, nn.Linear's {y_ref.dtype}")
        y_ref.float().pow(2).sum().backward()
        y.float().pow(2).sum().backward()
    tol = dict(atol=3e-2, rtol=3e-2)
    collect_close(f"{tag}: output", y, _shard(y_ref, rank, p, 0) if sp else y_ref, failures, **tol)
    collect_close(f"{tag}: input grad", x_loc.grad, _shard(x_ref.grad, rank, p, 0) if sp else x_ref.grad,
                  failures, **tol)
    if lora:
        want = [(c.lora_A, c_ref.lora_A.weight.grad), (c.lora_B, _shard(c_ref.lora_B.weight.grad, rank, p, 0)),
                (r.lora_A, _shard(r_ref.lora_A.weight.grad, rank, p, 1)), (r.lora_B, r_ref.lora_B.weight.grad)]
        for i, (prm, g) in enumerate(want):
            if prm.grad is not None and prm.grad.dtype != torch.float32:
                failures.append(f"{tag}: factor {i} gradient in {prm.grad.dtype}, not the factor's float32")
            collect_close(f"{tag}: LoRA factor {i} grad", prm.grad, g, failures, **tol)
        if any(t.grad is not None for t in (c.weight, c.bias, r.weight, r.bias)):
            failures.append(f"{tag}: the frozen base got a gradient")
        return
    want = [(c.weight, _shard(c_ref.weight.grad, rank, p, 0)), (c.bias, _shard(c_ref.bias.grad, rank, p, 0)),
            (r.weight, _shard(r_ref.weight.grad, rank, p, 1)), (r.bias, r_ref.bias.grad)]
    for i, (prm, g) in enumerate(want):
        if prm.grad is not None and prm.grad.dtype != torch.float32:
            failures.append(f"{tag}: parameter {i} gradient in {prm.grad.dtype}, not float32")
        collect_close(f"{tag}: parameter {i} grad", prm.grad, g, failures, **tol)


def _audit_worker(rank, p):
    # (the ranks serve the whole session: later modules' workers get the default LORA_IMPL back)
    previous, tp_layers.LORA_IMPL = tp_layers.LORA_IMPL, "plain"
    try:
        return _audit_cases(rank, p)
    finally:
        tp_layers.LORA_IMPL = previous


def _audit_cases(rank, p):
    failures, cases = [], 0
    for overlap in ("none", "ring"):
        for sp in (False, True):
            for kind in ("column", "row"):
                for shape in ((0, 3, K), (2, 0, K), (2, 2, 2, K)):  # empty batches, a 4-D input
                    _layer_case(rank, p, failures, kind, shape, sp, overlap)
                _layer_case(rank, p, failures, kind, (4, 3, K), sp, overlap, noncontig=True)
                _layer_case(rank, p, failures, kind, (2, 2, 2, K), sp, overlap, noncontig=True, steps=2)
                _layer_case(rank, p, failures, kind, (4, 3, K), sp, overlap, frozen=True, x_grad=False)
                cases += 6
            for lora in (False, True):
                _mlp_autocast_case(rank, p, failures, sp, overlap, lora)
                cases += 1
    raise_failures(rank, failures)
    return cases


def test_layers_match_nn_linear_on_edge_shapes_and_states_2_ranks(ranks):
    assert ranks(2).run(_audit_worker, timeout=120) == [56, 56]  # (every case ran on both ranks)
