"""Suite "norm": llmkern.rms_norm / llmkern.layer_norm vs what a model would otherwise run, on the
same inputs in the same run.

GPU: M = 16384 rows x N in {2048, 4096, 8192}, bf16 activations and weights; forward and
forward+backward (dx, dweight; a random upstream gradient, not .sum()'s expanded one):
- rms_norm vs transformers' LlamaRMSNorm eager math (upcast, pow, mean, rsqrt, mul, cast, mul) and
  vs torch's F.rms_norm (one row each, ours timed once);
- rms_norm with the fused residual (returning s = x + residual; the backward gets a gradient for s
  too, as in a pre-norm transformer) vs `s = x + residual; F.rms_norm(s)`;
- layer_norm (weight and bias) vs F.layer_norm.
Throughput is GB/s of the op's minimal traffic: the forward reads x (+ residual) and the weight and
writes y (+ s); the backward reads dy (+ ds) and x and writes dx (the [N] weight gradient aside).
The baseline's GB/s on those same bytes is in extra["baseline_gbs"]. Quick and full mode run the
same rows (each takes milliseconds); full mode times longer.

CPU: small shapes (M = 2048, N = 1024, fp32) through the dispatched op, which on CPU is the PyTorch
reference: it checks the harness, it says nothing about the GPU kernels.
"""
import torch
import torch.nn.functional as F

from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn

ROWS = 16384
EPS = 1e-6


def _llama_eager(x, w, r=None):
    """transformers' LlamaRMSNorm.forward, as written there."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def _torch_rms(x, w, r=None):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def _ours_rms(x, w, r=None):
    import llmkern

    return llmkern.rms_norm(x, w, EPS)


def _ours_rms_res(x, w, r):
    import llmkern

    return llmkern.rms_norm(x, w, EPS, residual=r, return_residual=True)


def _torch_rms_res(x, w, r):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, EPS), s


def _ours_ln(x, w, b):
    import llmkern

    return llmkern.layer_norm(x, w, b, 1e-5)


def _torch_ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _timer(fn, x, w, extra, mode, grads):
    """fn's forward, or forward + backward to (x, w[, extra]) with the prepared upstream gradients."""
    if mode == "fwd":
        return lambda: fn(x, w, extra)
    wrt = (x, w) + ((extra,) if extra is not None and extra.requires_grad else ())

    def step():
        out = fn(x, w, extra)
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, wrt, grads[:len(out)])

    return step


def _bytes(x, w, mode, residual):
    """The op's minimal traffic in bytes (see the module docstring)."""
    a = x.numel() * x.element_size()
    fwd = (4 if residual else 2) * a + w.numel() * w.element_size()
    bwd = (4 if residual else 3) * a  # dy (, ds), x (s), dx
    return fwd if mode == "fwd" else fwd + bwd


def _row(op, shape, mode, ours_ms, base_name, base_ms, gb, notes):
    return Result(op=f"{op} {mode}", shape=shape, ours_ms=ours_ms, baseline=base_name, baseline_ms=base_ms,
                  throughput=gb / (ours_ms * 1e-3), unit="GB/s", notes=notes,
                  extra={"gb": gb, "baseline_gbs": gb / (base_ms * 1e-3)})


def _rows(ctx, M, N, dtype, notes=""):
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale + shift).to(dtype).requires_grad_()

    x, r = rand(M, N), rand(M, N)
    w, b = rand(N, scale=0.1, shift=1.0), rand(N, scale=0.1)
    grads = tuple(torch.randn(M, N, device=dev, generator=gen).to(dtype) for _ in range(2))  # for y and s
    dt = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    shape = f"M={M} N={N} {dt}"
    t = lambda fn, extra, mode: time_fn(_timer(fn, x, w, extra, mode, grads), dev, quick=ctx.quick)  # noqa: E731
    for mode in ("fwd", "fwd+bwd"):
        gb = _bytes(x, w, mode, False) / 1e9
        ours = t(_ours_rms, None, mode)
        yield _row("rms_norm", shape, mode, ours, "transformers LlamaRMSNorm eager math", t(_llama_eager, None, mode),
                   gb, notes)
        yield _row("rms_norm", shape, mode, ours, "torch F.rms_norm", t(_torch_rms, None, mode), gb, notes)
    for mode in ("fwd", "fwd+bwd"):
        gb = _bytes(x, w, mode, True) / 1e9
        yield _row("rms_norm +residual", shape, mode, t(_ours_rms_res, r, mode), "x + residual; F.rms_norm",
                   t(_torch_rms_res, r, mode), gb, notes)
    for mode in ("fwd", "fwd+bwd"):
        gb = (_bytes(x, w, mode, False) + b.numel() * b.element_size()) / 1e9
        yield _row("layer_norm", shape, mode, t(_ours_ln, b, mode), "torch F.layer_norm", t(_torch_ln, b, mode),
                   gb, notes)
    del x, r, w, b, grads


def _gpu_rows(ctx):
    for N in ctx.progress((2048, 4096, 8192), desc="norm"):
        yield from _rows(ctx, ROWS, N, torch.bfloat16)
        torch.cuda.empty_cache()


def _cpu_rows(ctx):
    yield from _rows(ctx, 2048, 1024, torch.float32,
                     notes="CPU runs the PyTorch reference; GPU numbers need a CUDA run")


@suite("norm", "fused RMSNorm / LayerNorm (+ residual add) vs transformers' LlamaRMSNorm math, F.rms_norm, "
               "add + F.rms_norm, F.layer_norm: fwd, fwd+bwd GB/s")
def run(ctx):
    if ctx.device.type == "cuda":
        yield from _gpu_rows(ctx)
    else:
        yield from _cpu_rows(ctx)
