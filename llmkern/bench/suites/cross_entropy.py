"""Suite "cross_entropy": llmkern.cross_entropy vs eager ``F.cross_entropy(logits.float(), labels)``
(what the model zoo's training step runs on the LM head's output), on the same inputs in the same run.

GPU: N = 16384 tokens, V in {50257 (GPT-2), 128256 (Llama 3)}, bf16 logits, all labels valid;
forward and forward+backward (dlogits). Throughput is GB/s of the op's minimal logits traffic:
one bf16 read in the forward; read, read again and write the gradient in forward+backward
(6 bytes per logit). The baseline's GB/s on those same bytes is in extra["baseline_gbs"] (eager
actually moves about 36 bytes per logit: the float32 upcast, log_softmax, their backward, the
cast back). Quick mode: V = 50257 only.

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


def _gpu_rows(ctx):
    vocabs = (50257,) if ctx.quick else (50257, 128256)
    for V in ctx.progress(vocabs, desc="cross_entropy"):
        yield from _rows(ctx, TOKENS, V, torch.bfloat16)
        torch.cuda.empty_cache()


def _cpu_rows(ctx):
    yield from _rows(ctx, 512, 32000, torch.float32,
                     notes="CPU runs the PyTorch reference; GPU numbers need a CUDA run")


@suite("cross_entropy", "fused cross-entropy over logits vs eager F.cross_entropy(logits.float()): fwd, fwd+bwd GB/s")
def run(ctx):
    if ctx.device.type == "cuda":
        yield from _gpu_rows(ctx)
    else:
        yield from _cpu_rows(ctx)
