"""Suite "moe": llmkern.moe_mlp (sorted grouped GEMMs, Triton) vs transformers' loop over experts
(MixtralExperts.forward: per hit expert, index the token rows, gate-up linear, act · up, down linear,
times the routing weight, index_add back; eager, in the input dtype) on the same inputs in the same run.

GPU (bf16, random softmax-top-k routing from moe_route): T = 4096 tokens of DeepSeek-MoE-16B /
Qwen1.5-MoE-A2.7B's MLP (d = 2048, F = 1408, E = 64, k = 6), forward and forward+backward (gradients of x,
both expert weights and topk_weights: the router trains); full mode adds a Mixtral-8x7B-like layer at
reduced width (d = 4096, F = 14336, E = 8, k = 2, T = 4096) and a decoding step (T = 16, the 64x6 layer,
forward only: launch- and weight-read-bound).
FLOPs: forward 2·T·k·3·F·d (three d x F matmuls per (token, slot)); forward+backward 3x that.
extra["mfu"] is against the card's dense bf16 peak (llmkern.flops.device_peak) where it is known, extra["mfu_a100"]
against the A100's at the row's precision.

GPU quick mode (gpu_check.sh) runs each kernel's fixed configuration (LLMKERN_MOE_AUTOTUNE=0, unless
the variable is set): autotuning ~40 candidates costs minutes of compiles; --full autotunes.

CPU: a tiny float32 layer through the dispatched op (the PyTorch reference on CPU, itself a loop over
experts) vs the same baseline, in seconds; it checks the harness, not the kernels.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn


def hf_expert_loop(x, w_gate_up, w_down, topk_ids, topk_weights):
    """transformers' MixtralExperts.forward, inlined (no transformers install needed): the baseline."""
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(topk_ids, num_classes=w_gate_up.shape[0]).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        slot, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)
        o = F.linear(F.silu(gate) * up, w_down[e]) * topk_weights[tok, slot, None]
        out.index_add_(0, tok, o.to(out.dtype))
    return out


def torch_grouped_mm(x, w_gate_up, w_down, topk_ids, topk_weights):
    """The strongest plain-PyTorch path (what transformers' experts_implementation="grouped_mm" does): the
    (token, slot) pairs sorted by expert, two cuBLAS grouped GEMMs (torch._grouped_mm, sm_90, bf16) with the
    activation between them, weighted index_add back. CUDA only."""
    E, k = w_gate_up.shape[0], topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    tok = order // k
    gate, up = torch._grouped_mm(x[tok], w_gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    o = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
    o = o * topk_weights.reshape(-1)[order, None].to(o.dtype)
    return torch.zeros_like(x).index_add(0, tok, o.to(x.dtype))


def _baselines(dev):
    """(name, function) of the baselines on this device."""
    out = [("transformers loop over experts (eager)", hf_expert_loop)]
    if dev.type == "cuda" and hasattr(torch, "_grouped_mm"):
        out.append(("torch._grouped_mm (transformers' grouped_mm experts)", torch_grouped_mm))
    return out


def _rows(ctx, label, T, d, F_, E, k, dtype, modes=("fwd", "fwd+bwd"), notes=""):
    import llmkern
    from llmkern import flops
    from llmkern.flops import device_peak

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, device=dev, generator=gen) * sc).to(dtype)  # noqa: E731
    x = rnd(T, d).requires_grad_()
    wgu = rnd(E, 2 * F_, d, sc=d ** -0.5).requires_grad_()
    wd = rnd(E, d, F_, sc=F_ ** -0.5).requires_grad_()
    tw, ids = llmkern.moe_route(torch.randn(T, E, device=dev, generator=gen), k)
    tw = tw.to(dtype).requires_grad_()  # transformers casts the routing weights to the hidden dtype
    dy = rnd(T, d)
    leaves = (x, wgu, wd, tw)
    fwd_flops = 2 * T * k * 3 * F_ * d
    peak = device_peak(dev, dtype)
    peak_a100 = flops.peak("a100", dtype)  # (its fp32 peak for the CPU rows' float32)
    shape = f"T={T} d={d} F={F_} E={E} k={k} {str(dtype).replace('torch.', '')}"

    def timed(fn, mode):
        if mode == "fwd":
            with torch.no_grad():
                return time_fn(lambda: fn(x, wgu, wd, ids, tw), dev, quick=ctx.quick)
        return time_fn(lambda: torch.autograd.grad(fn(x, wgu, wd, ids, tw), leaves, dy), dev, quick=ctx.quick)

    for mode in modes:
        flops = fwd_flops if mode == "fwd" else 3 * fwd_flops
        ours = timed(llmkern.moe_mlp, mode)
        tflops = flops / (ours * 1e-3) / 1e12
        for name, fn in _baselines(dev):
            try:
                base = timed(fn, mode)
            except (RuntimeError, NotImplementedError) as exc:  # e.g. _grouped_mm on a card without it
                yield Result(op=f"moe_mlp {label} {mode}", shape=shape, ours_ms=ours, baseline=name,
                             baseline_ms=None, throughput=tflops, unit="TFLOP/s",
                             notes=f"baseline failed: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            extra = {"tflop": flops / 1e12, "baseline_tflops": flops / (base * 1e-3) / 1e12}
            if peak:
                extra["mfu"] = tflops * 1e12 / peak
            extra["mfu_a100"] = tflops * 1e12 / peak_a100
            yield Result(op=f"moe_mlp {label} {mode}", shape=shape, ours_ms=ours, baseline=name, baseline_ms=base,
                         throughput=tflops, unit="TFLOP/s", mfu=extra.get("mfu"), notes=notes, extra=extra)
    if dev.type == "cuda":
        del x, wgu, wd, dy, leaves
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _fixed_configs(quick):
    """LLMKERN_MOE_AUTOTUNE=0 for the suite's duration in quick mode, where the user did not choose."""
    if not quick or "LLMKERN_MOE_AUTOTUNE" in os.environ:
        yield ""
        return
    os.environ["LLMKERN_MOE_AUTOTUNE"] = "0"
    try:
        yield "fixed kernel configs (LLMKERN_MOE_AUTOTUNE=0)"
    finally:
        del os.environ["LLMKERN_MOE_AUTOTUNE"]


@suite("moe", "fused MoE MLP (grouped GEMMs) vs transformers' loop over experts: fwd, fwd+bwd TFLOP/s")
def run(ctx):
    if ctx.device.type != "cuda":
        yield from _rows(ctx, "tiny", 64, 64, 96, 8, 2, torch.float32,
                         notes="CPU runs the PyTorch reference; GPU numbers need a CUDA run")
        return
    with _fixed_configs(ctx.quick) as notes:
        yield from _rows(ctx, "64x6", 4096, 2048, 1408, 64, 6, torch.bfloat16, notes=notes)  # DeepSeek-MoE-16B
    if not ctx.quick:
        yield from _rows(ctx, "8x2", 4096, 4096, 14336, 8, 2, torch.bfloat16)  # Mixtral-8x7B's layer
        yield from _rows(ctx, "64x6 decode", 16, 2048, 1408, 64, 6, torch.bfloat16, modes=("fwd",))
