"""Suite "cross_entropy": llmkern.cross_entropy vs eager ``F.cross_entropy(logits.float(), labels)``
(what the model zoo's training step runs on the LM head's output), on the same inputs in the same run.

GPU: N = 16384 tokens, V in {50257 (GPT-2), 128256 (Llama 3)}, bf16 logits, all labels valid;
forward and forward+backward (dlogits). Throughput is GB/s of the op's minimal logits traffic:
one bf16 read in the forward; read, read again and write the gradient in forward+backward
(6 bytes per logit). The baseline's GB/s on those same bytes is in extra["baseline_gbs"] (eager
actually moves about 36 bytes per logit: the float32 upcast, log_softmax, their backward, the
cast back). Quick mode: V = 50257 only.

Plus the LM head with its loss (llmkern.linear_cross_entropy, forward + backward) vs F.linear then
the eager loss: GPT-2's head (d=768, V=50257; full mode also Llama 3 8B's d=4096, V=128256), N=16384
tokens, TFLOP/s of its three GEMMs and the peak memory of each.

CPU: one small shape (N=512, V=32000, fp32): what llmkern.cross_entropy runs on CPU (the PyTorch
reference, i.e. F.cross_entropy itself) vs F.cross_entropy, in seconds; it says nothing about the
GPU kernels.
"""
import torch
import torch.nn.functional as F

from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn

TOKENS = 16384


def _eager(x, y):
    return F.cross_entropy(x.float(), y)


def _timer(fn, x, y, mode):
    if mode == "fwd":
        return lambda: fn(x, y)
    return lambda: torch.autograd.grad(fn(x, y), x)


def _bytes(x, mode):
    per = x.numel() * x.element_size()
    return per if mode == "fwd" else 3 * per


def _rows(ctx, N, V, dtype, notes=""):
    import llmkern

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(N, V, device=dev, generator=gen) * 2).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev, generator=gen)
    dt = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    for mode in ("fwd", "fwd+bwd"):
        ours_ms = time_fn(_timer(llmkern.cross_entropy, x, y, mode), dev, quick=ctx.quick)
        base_ms = time_fn(_timer(_eager, x, y, mode), dev, quick=ctx.quick)
        gb = _bytes(x, mode) / 1e9
        yield Result(op=f"cross_entropy {mode}", shape=f"N={N} V={V} {dt}", ours_ms=ours_ms,
                     baseline="torch eager F.cross_entropy(x.float())", baseline_ms=base_ms,
                     throughput=gb / (ours_ms * 1e-3), unit="GB/s", notes=notes,
                     extra={"logits_gb": gb, "baseline_gbs": gb / (base_ms * 1e-3)})
    del x, y


def _peak_mib(fn, dev):
    """Peak memory (MB) allocated while fn() runs, above what was allocated before (CUDA only)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def _linear_rows(ctx, N, d, V, dtype, notes=""):
    """The LM head and its loss, forward + backward (dhidden, dweight): llmkern.linear_cross_entropy
    (chunked, no [N, V] logits) vs F.linear then eager F.cross_entropy(logits.float()). Throughput:
    TFLOP/s of the three GEMMs (6·N·d·V); extra: peak memory of each."""
    import llmkern

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, d, device=dev, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, d, device=dev, generator=gen) / d ** 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev, generator=gen)
    ours = lambda: torch.autograd.grad(llmkern.linear_cross_entropy(h, w, y), (h, w))  # noqa: E731
    base = lambda: torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), y), (h, w))  # noqa: E731
    ours_ms = time_fn(ours, dev, quick=ctx.quick)
    base_ms = time_fn(base, dev, quick=ctx.quick)
    flops = 6.0 * N * d * V
    dt = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    yield Result(op="linear_cross_entropy fwd+bwd", shape=f"N={N} d={d} V={V} {dt}", ours_ms=ours_ms,
                 baseline="F.linear + eager F.cross_entropy(logits.float())", baseline_ms=base_ms,
                 throughput=flops / (ours_ms * 1e-3) / 1e12, unit="TFLOP/s", notes=notes,
                 extra={"ours_peak_mib": _peak_mib(ours, dev), "baseline_peak_mib": _peak_mib(base, dev)})
    del h, w, y


def _gpu_rows(ctx):
    vocabs = (50257,) if ctx.quick else (50257, 128256)
    for V in ctx.progress(vocabs, desc="cross_entropy"):
        yield from _rows(ctx, TOKENS, V, torch.bfloat16)
        torch.cuda.empty_cache()
    heads = ((768, 50257),) if ctx.quick else ((768, 50257), (4096, 128256))  # GPT-2, Llama 3 8B
    for d, V in heads:
        yield from _linear_rows(ctx, TOKENS, d, V, torch.bfloat16)
        torch.cuda.empty_cache()


def _cpu_rows(ctx):
    yield from _rows(ctx, 512, 32000, torch.float32,
                     notes="CPU runs the PyTorch reference; GPU numbers need a CUDA run")
    yield from _linear_rows(ctx, 512, 256, 8000, torch.float32,
                            notes="CPU: chunked GEMMs + the reference; GPU numbers need a CUDA run")


@suite("cross_entropy", "fused cross-entropy over logits vs eager F.cross_entropy(logits.float()): fwd, fwd+bwd GB/s; "
                        "linear_cross_entropy (LM head + loss) vs F.linear + F.cross_entropy")
def run(ctx):
    if ctx.device.type == "cuda":
        yield from _gpu_rows(ctx)
    else:
        yield from _cpu_rows(ctx)
