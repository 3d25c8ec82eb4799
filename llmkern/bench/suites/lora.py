"""Suite "lora": the fused LoRA linear against PEFT-style unfused math and the frozen base GEMM.

GPU protocol (issue 4; --full): M = 8192 tokens, in = out = 4096, r in {8, 16, 64}, bf16 (quick:
r = 16, 1 and 16 adapters).
  - forward, and forward+backward with a frozen base weight (grads for x, A, B), against
    (a) PEFT's unfused math  F.linear(x, W, b) + s · B(A(x))  (the row's baseline) and
    (b) the frozen base layer alone  F.linear(x, W, b)  (extra["base_ms"], extra["vs_base"] =
    ours / base; target fwd+bwd <= 1.10);
  - DoRA forward+backward (frozen W; grads for x, A, B and the magnitude) against PEFT's DoRA math,
    which forms W + s·B·A for the row norms every call (llmkern.peft.dora_linear does not);
  - QLoRA forward+backward (frozen NF4 base W, blocksize 64; grads for x, A, B): lora_linear(x, qw, ...)
    against what PEFT runs on bitsandbytes (a Linear4bit forward, i.e. matmul_4bit, plus the two LoRA
    matmuls) when bitsandbytes imports, else against llmkern.nf4_dequantize + F.linear + the LoRA matmuls
    under autograd (the dequantized W then stays alive for the backward);
  - multi-adapter forward with 1, 4 and 16 adapters (r = 16, 16 sequences of 512 tokens, adapter
    chosen per sequence) against PEFT's per-adapter loop (mixed-batch forward);
    extra["vs_single"] = ours / single-adapter lora_linear time (target <= 1.2 at 16 adapters).
FLOPs: base GEMM 2·M·N·K; LoRA forward 2·M·r·(K + N); fwd+bwd with a frozen base
4·M·N·K + 6·M·r·(K + N).
Floors at the protocol shape (H100 SXM datasheet; not yet measured): the base GEMM is 275 GFLOP
(0.28 ms at 989 TFLOP/s) against ~168 MB of traffic (0.05 ms at 3.35 TB/s): compute-bound. LoRA
adds 2·M·r·(K+N) = 1.1 GFLOP at r = 16 plus skinny memory-bound passes: the forward re-reads x
once (67 MB, ~0.02 ms), the backward reads dy twice and x once (~0.06 ms). Kernel resources on
sm_90 (no spills, wgmma, 3-4 stage pipelines): tests/test_lora_compile.py.
On CPU (no GPU): a small float32 comparison of the dispatched op (the PyTorch reference on CPU)
that finishes in a few seconds; it checks the harness, not the kernels.
"""
import torch
import torch.nn.functional as F

from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn


def _peft_unfused(x, W, b, A, B, s):
    return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s


def _peft_dora(x, W, b, A, B, m, s):
    """PEFT's DoRA forward (no dropout): forms W + s·B·A for its row norms every call."""
    norm = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
    return (m / norm) * (F.linear(x, W) + F.linear(F.linear(x, A), B) * s) + b


def _fwd_bwd(fn, inputs, dy):
    def run():
        y = fn()
        torch.autograd.grad(y, inputs, dy)
    return run


@suite("lora", "fused LoRA linear vs PEFT unfused and the frozen base GEMM; multi-adapter vs per-adapter loop")
def run(ctx):
    import llmkern

    dev = ctx.device
    cuda = dev.type == "cuda"
    if cuda:  # quick: r = 16 and 1 / 16 adapters (each new shape autotunes the kernels once)
        M, K, N, dtype, seqs = 8192, 4096, 4096, torch.bfloat16, 16
        ranks, n_adapters = ((16,), (1, 16)) if ctx.quick else ((8, 16, 64), (1, 4, 16))
    else:
        M, K, N, ranks, dtype = 128, 128, 128, (8,), torch.float32
        n_adapters, seqs = (1, 4), 4
    dname = str(dtype).replace("torch.", "")
    t = lambda fn: time_fn(fn, dev, quick=ctx.quick)  # noqa: E731
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, device=dev, generator=gen) * sc).to(dtype)  # noqa: E731
    x = rnd(M, K)
    W = rnd(N, K, sc=K ** -0.5)
    b = rnd(N)
    dy = rnd(M, N)
    base_fwd = t(lambda: F.linear(x, W, b))
    xg = x.clone().requires_grad_(True)
    base_fb = t(_fwd_bwd(lambda: F.linear(xg, W, b), [xg], dy))
    single = {}
    for r in ranks:
        A = rnd(r, K, sc=K ** -0.5).requires_grad_(True)
        B = rnd(N, r, sc=r ** -0.5).requires_grad_(True)
        s = 2.0
        shape = f"M={M} K={K} N={N} r={r} {dname}"
        with torch.no_grad():
            ours = t(lambda: llmkern.lora_linear(x, W, b, A, B, s))
            theirs = t(lambda: _peft_unfused(x, W, b, A, B, s))
        single[r] = ours
        fl = 2 * M * N * K + 2 * M * r * (K + N)
        yield Result(op="lora_linear fwd", shape=shape, ours_ms=ours, baseline="PEFT unfused",
                     baseline_ms=theirs, throughput=fl / ours / 1e9, unit="TFLOP/s",
                     extra={"base_ms": base_fwd, "vs_base": ours / base_fwd})
        yield Result(op="lora_linear fwd", shape=shape, ours_ms=ours, baseline="frozen base GEMM",
                     baseline_ms=base_fwd, throughput=fl / ours / 1e9, unit="TFLOP/s",
                     notes="ratio = base / ours (1.0: LoRA for free)")
        ours = t(_fwd_bwd(lambda: llmkern.lora_linear(xg, W, b, A, B, s), [xg, A, B], dy))
        theirs = t(_fwd_bwd(lambda: _peft_unfused(xg, W, b, A, B, s), [xg, A, B], dy))
        fl = 4 * M * N * K + 6 * M * r * (K + N)
        yield Result(op="lora_linear fwd+bwd (frozen W)", shape=shape, ours_ms=ours, baseline="PEFT unfused",
                     baseline_ms=theirs, throughput=fl / ours / 1e9, unit="TFLOP/s",
                     extra={"base_ms": base_fb, "vs_base": ours / base_fb, "target_vs_base": 1.10,
                            "target_vs_unfused": 1.3})
        yield Result(op="lora_linear fwd+bwd (frozen W)", shape=shape, ours_ms=ours, baseline="frozen base layer",
                     baseline_ms=base_fb, throughput=fl / ours / 1e9, unit="TFLOP/s",
                     notes="target ratio >= 0.91 (ours <= 1.10x base)")

    yield from _dora_rows(ctx, x, xg, W, b, dy, rnd, 16 if 16 in ranks else ranks[0], t, dname)
    yield from _qlora_rows(xg, W, b, dy, rnd, 16 if 16 in ranks else ranks[0], t, dname, base_fb)
    r = 16 if 16 in ranks else ranks[0]
    T = M // seqs
    x3 = x.view(seqs, T, K)
    for n in n_adapters:
        A = rnd(n, r, K, sc=K ** -0.5)
        B = rnd(n, N, r, sc=r ** -0.5)
        scal = torch.full((n,), 2.0, device=dev)
        per_seq = torch.arange(seqs, device=dev) % n
        ids = per_seq[:, None].expand(seqs, T).contiguous()
        groups = [(a, (per_seq == a).nonzero().squeeze(1)) for a in range(n)]
        if r not in single:
            with torch.no_grad():
                single[r] = t(lambda: llmkern.lora_linear(x, W, b, A[0], B[0], 2.0))

        def loop():  # PEFT's _mixed_batch_forward: base, then one sub-batch per adapter
            y = F.linear(x3, W, b)
            for a, idx in groups:
                if idx.numel():
                    y[idx] += F.linear(F.linear(x3[idx], A[a]), B[a]) * 2.0
            return y

        with torch.no_grad():
            ours = t(lambda: llmkern.lora_linear_multi(x3, W, b, A, B, scal, ids))
            theirs = t(loop)
        fl = 2 * M * N * K + 2 * M * r * (K + N)
        yield Result(op=f"lora_linear_multi fwd ({n} adapters)", shape=f"M={M} K={K} N={N} r={r} {dname}",
                     ours_ms=ours, baseline="PEFT per-adapter loop", baseline_ms=theirs,
                     throughput=fl / ours / 1e9, unit="TFLOP/s",
                     extra={"single_ms": single[r], "vs_single": ours / single[r], "target_vs_single": 1.2},
                     notes="" if cuda else "CPU: dispatches to the PyTorch reference")
        yield Result(op=f"lora_linear_multi fwd ({n} adapters)", shape=f"M={M} K={K} N={N} r={r} {dname}",
                     ours_ms=ours, baseline="single-adapter lora_linear", baseline_ms=single[r],
                     throughput=fl / ours / 1e9, unit="TFLOP/s", notes="target ratio >= 0.83 (<= 1.2x single)")


def _dora_rows(ctx, x, xg, W, b, dy, rnd, r, t, dname):
    """DoRA fwd+bwd (frozen W; grads for x, A, B, magnitude): llmkern.peft.dora_linear (row norms without
    B·A, the fused LoRA op) against PEFT's DoRA math (W + s·B·A formed each call)."""
    from llmkern.peft import dora_linear

    M, K = x.shape
    N = W.shape[0]
    A = rnd(r, K, sc=K ** -0.5).requires_grad_(True)
    B = rnd(N, r, sc=r ** -0.5).requires_grad_(True)
    m = torch.linalg.vector_norm(W.float(), dim=1).to(W.dtype).requires_grad_(True)
    s = 2.0
    inputs = [xg, A, B, m]
    ours = t(_fwd_bwd(lambda: dora_linear(xg, W, b, A, B, m, s), inputs, dy))
    theirs = t(_fwd_bwd(lambda: _peft_dora(xg, W, b, A, B, m, s), inputs, dy))
    fl = 4 * M * N * K + 6 * M * r * (K + N)
    yield Result(op="dora_linear fwd+bwd (frozen W)", shape=f"M={M} K={K} N={N} r={r} {dname}", ours_ms=ours,
                 baseline="PEFT DoRA math", baseline_ms=theirs, throughput=fl / ours / 1e9, unit="TFLOP/s",
                 notes="" if x.is_cuda else "CPU: the PyTorch reference LoRA op")


def _bnb_linear4bit(W, b):
    """A bitsandbytes NF4 Linear4bit over W (blocksize 64, no double quantization: the absmax llmkern's
    NF4Weight holds), computing in W's dtype; None when bitsandbytes does not import here."""
    try:
        import bitsandbytes as bnb
    except Exception:  # not installed, or no usable binary for this machine
        return None
    N, K = W.shape
    layer = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=W.dtype, compress_statistics=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(W.detach().clone(), requires_grad=False, compress_statistics=False,
                                     quant_type="nf4", blocksize=64)
    layer.bias = torch.nn.Parameter(b.detach().clone(), requires_grad=False)
    return layer.to(W.device).train()  # (train: bitsandbytes repacks CPU weights for eval-mode inference)


def _qlora_rows(xg, W, b, dy, rnd, r, t, dname, base_fb):
    """QLoRA fwd+bwd (frozen NF4 W; grads for x, A, B): the fused op reading W in 4 bits against the
    baseline a user has today (see the module docstring)."""
    import llmkern

    M, K = xg.shape
    N = W.shape[0]
    A = rnd(r, K, sc=K ** -0.5).requires_grad_(True)
    B = rnd(N, r, sc=r ** -0.5).requires_grad_(True)
    s = 2.0
    qw = llmkern.nf4_quantize(W, 64)
    bnb_layer = _bnb_linear4bit(W, b)
    if bnb_layer is not None:
        base, name = bnb_layer, "PEFT on bitsandbytes (matmul_4bit + LoRA)"
    else:
        base, name = (lambda u: F.linear(u, llmkern.nf4_dequantize(qw, u.dtype), b)), "nf4_dequantize + F.linear + LoRA"
    inputs = [xg, A, B]
    ours = t(_fwd_bwd(lambda: llmkern.lora_linear(xg, qw, b, A, B, s), inputs, dy))
    theirs = t(_fwd_bwd(lambda: base(xg) + F.linear(F.linear(xg, A), B) * s, inputs, dy))
    fl = 4 * M * N * K + 6 * M * r * (K + N)
    yield Result(op="qlora lora_linear fwd+bwd (NF4 W)", shape=f"M={M} K={K} N={N} r={r} {dname} blocksize=64",
                 ours_ms=ours, baseline=name, baseline_ms=theirs, throughput=fl / ours / 1e9, unit="TFLOP/s",
                 extra={"base_ms": base_fb, "vs_base": ours / base_fb, "weight_bytes": qw.nbytes},
                 notes="" if xg.is_cuda else "CPU: the PyTorch reference (W dequantized per call)")
