"""Suites "rope" and "swiglu": the fused elementwise ops of a Llama block vs the eager PyTorch a
transformers model runs, on the same inputs in the same run.

rope: llmkern.rope(q, k, cos, sin) vs transformers' apply_rotary_pos_emb (``q * cos +
rotate_half(q) * sin`` for q and k, eager). GPU: Llama 3 8B's attention at 32k tokens, bf16:
q [8, 32, 4096, 128] and k [8, 8, 4096, 128] as the [B, H, T, D] views of [B, T, H, D] projections
(the layout Llama's attention hands to RoPE), cos / sin [1, T, 128] (transformers'
position_embeddings); forward and forward+backward (dq, dk). Throughput: GB/s of the op's minimal
traffic: read q and k, write the outputs (forward); the same again for the gradients (backward);
cos / sin included.

swiglu: llmkern.swiglu(gate, up) vs eager ``F.silu(gate) * up`` (LlamaMLP). GPU: [16384, 14336]
bf16 (Llama 3 8B's MLP width at 16k tokens); forward and forward+backward (dgate, dup). Minimal
traffic: read gate and up, write the output (6 bytes per element in bf16); the backward reads
dout, gate, up and writes dgate, dup (10 more bytes). Full mode adds geglu (tanh) vs eager
``F.gelu(gate, approximate="tanh") * up`` (Gemma).

The baseline's GB/s on the same bytes is in extra["baseline_gbs"] (eager moves several times as many).
CPU: small float32 shapes through the dispatched op (the PyTorch reference on CPU) vs the same
baselines, in seconds; they say nothing about the GPU kernels.
"""
import torch
import torch.nn.functional as F

from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn


def _dt(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _row(ctx, op, shape, ours, base, baseline, gb, notes=""):
    ours_ms = time_fn(ours, ctx.device, quick=ctx.quick)
    base_ms = time_fn(base, ctx.device, quick=ctx.quick)
    return Result(op=op, shape=shape, ours_ms=ours_ms, baseline=baseline, baseline_ms=base_ms,
                  throughput=gb / (ours_ms * 1e-3), unit="GB/s", notes=notes,
                  extra={"gb": gb, "baseline_gbs": gb / (base_ms * 1e-3)})


# ---- rope ---------------------------------------------------------------------------------------

def _hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (LlamaAttention's eager math), inlined so that the suite
    needs no transformers install: cos / sin unsqueezed over the heads, rotate_half by halves."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _rope_rows(ctx, B, Hq, Hk, T, D, dtype, notes=""):
    import llmkern

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, T, Hq, D, device=dev, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, device=dev, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    freqs = torch.arange(T, device=dev, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    shape = f"q={list(q.shape)} k={list(k.shape)} {_dt(dtype)}"
    fwd = 2 * _nbytes(q, k) + _nbytes(cos, sin)
    modes = {
        "fwd": (lambda: llmkern.rope(q, k, cos, sin), lambda: _hf_rope(q, k, cos, sin), fwd),
        "fwd+bwd": (lambda: torch.autograd.grad(llmkern.rope(q, k, cos, sin), (q, k), (gq, gk)),
                    lambda: torch.autograd.grad(_hf_rope(q, k, cos, sin), (q, k), (gq, gk)), 2 * fwd),
    }
    for mode, (ours, base, nbytes) in modes.items():
        yield _row(ctx, f"rope {mode}", shape, ours, base, "transformers apply_rotary_pos_emb (eager)",
                   nbytes / 1e9, notes)


@suite("rope", "fused RoPE on q and k vs transformers' apply_rotary_pos_emb (eager): fwd, fwd+bwd GB/s")
def run_rope(ctx):
    if ctx.device.type == "cuda":
        yield from _rope_rows(ctx, 8, 32, 8, 4096, 128, torch.bfloat16)  # Llama 3 8B, 32k tokens
        torch.cuda.empty_cache()
    else:
        yield from _rope_rows(ctx, 2, 8, 2, 256, 64, torch.float32,
                              notes="CPU runs the PyTorch reference; GPU numbers need a CUDA run")


# ---- swiglu -------------------------------------------------------------------------------------

def _glu_rows(ctx, N, F_, dtype, name="swiglu", notes=""):
    import llmkern

    ours_fn, eager_fn, baseline = {
        "swiglu": (llmkern.swiglu, lambda g, u: F.silu(g) * u, "eager F.silu(gate) * up"),
        "geglu": (llmkern.geglu, lambda g, u: F.gelu(g, approximate="tanh") * u,
                  "eager F.gelu(gate, approximate='tanh') * up"),
    }[name]
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    g = torch.randn(N, F_, device=dev, generator=gen).to(dtype).requires_grad_()
    u = torch.randn(N, F_, device=dev, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn_like(g)
    one = _nbytes(g)
    modes = {
        "fwd": (lambda: ours_fn(g, u), lambda: eager_fn(g, u), 3 * one),
        "fwd+bwd": (lambda: torch.autograd.grad(ours_fn(g, u), (g, u), dout),
                    lambda: torch.autograd.grad(eager_fn(g, u), (g, u), dout), 8 * one),
    }
    for mode, (ours, base, nbytes) in modes.items():
        yield _row(ctx, f"{name} {mode}", f"[{N}, {F_}] {_dt(dtype)}", ours, base, baseline, nbytes / 1e9, notes)


@suite("swiglu", "fused SwiGLU (and GeGLU) gating vs eager F.silu(gate) * up: fwd, fwd+bwd GB/s")
def run_swiglu(ctx):
    if ctx.device.type == "cuda":
        for name in ("swiglu",) if ctx.quick else ("swiglu", "geglu"):
            yield from _glu_rows(ctx, 16384, 14336, torch.bfloat16, name)  # Llama 3 8B's MLP, 16k tokens
            torch.cuda.empty_cache()
    else:
        yield from _glu_rows(ctx, 512, 2048, torch.float32,
                             notes="CPU runs the PyTorch reference; GPU numbers need a CUDA run")
