"""Suite "attention": llmkern.attention vs PyTorch SDPA, FlashAttention's protocol.

GPU: bf16, 16k tokens per batch (batch = 16384 / seq), seq 512..16k, hidden 2048 (heads =
2048 / head_dim), head dim 64 and 128, causal and not; forward, backward and forward+backward in
TFLOP/s (fwd 4·B·H·T²·D, halved for causal; bwd 2.5x fwd) against every SDPA backend available
(flash, cuDNN, efficient), all measured in the same run on the same inputs; the row's baseline is
the fastest SDPA backend, each backend's time is in `extra`. Plus decode: batch 32, 32 query heads
over 8 KV heads, head dim 128, 8k cached keys, one new token (GB/s of K/V read), against SDPA.
Quick mode: seq 1k and 4k, head dim 128 only, and the decode row. On sm_90+ the dense kernels
load through tensor descriptors (TMA); at seq 4k, causal, head dim 128 the pointer kernels
(LLMKERN_ATTN_TMA=0) are timed too, in the row's notes.
Training rows with dropout, sinks and ALiBi (fwd+bwd, causal, seq 4k) follow, each against what a user
would write without our kernel; outside quick mode also DeepSeek MLA's head dims (q/k 192, v 128) against SDPA.
Right after the decode row, DeepSeek-V3's latent-cache decode (llmkern.mla_decode: 512 + 64 channels, one kv head, 16 and 128 query
heads, kv 4096, one new token; GB/s of the latent read once) against SDPA over the same cache, with the query
heads as SDPA's heads (enable_gqa: what the zoo ran before) and folded into query rows (the best plain-torch form);
and merge_attention_states (cascade decoding's merge) against the same formula in eager torch ops.
TFLOP/s count FlashAttention's way (backward 2.5x the forward: it recomputes Q K^T); `mfu` counts the model's
FLOPs (backward 2x the forward, as llmkern.flops and the mfu suite do) as a fraction of the detected card's
dense bf16 peak; extra["mfu_a100"] against the A100's.

CPU: a small quick comparison (what llmkern.attention runs on CPU: SDPA's CPU kernel with our
masks, or the reference) vs SDPA, in a few seconds; it says nothing about the GPU kernels.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn

TOKENS = 16384
HIDDEN = 2048


def _flops(B, H, T, D, causal, mode):
    f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"fwd": f, "bwd": 2.5 * f, "fwd+bwd": 3.5 * f}[mode]


_MODEL_SHARE = {"fwd": 1.0, "bwd": 2.0 / 2.5, "fwd+bwd": 3.0 / 3.5}  # model FLOPs / FlashAttention's count


def _mfu(tflops, peak, mode="fwd+bwd"):
    """Model FLOPs utilisation of a row timed at `tflops` (FlashAttention's count) against `peak` FLOP/s."""
    return tflops * 1e12 * _MODEL_SHARE[mode] / peak if peak else None


def _a100_extra(tflops, extra=None):
    """`extra` with the row's MFU against the A100's dense bf16 peak (fwd+bwd rows; the summary's MFU A100)."""
    from llmkern.flops import PEAK_FLOPS

    return {**(extra or {}), "mfu_a100": _mfu(tflops, PEAK_FLOPS["a100"]["bf16"])}


def _sdpa_backends():
    """name -> context manager factory selecting one SDPA backend (those this torch has)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover
        return {"default": contextlib.nullcontext}
    out = {}
    for name, attr in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                       ("efficient", "EFFICIENT_ATTENTION")):
        if hasattr(SDPBackend, attr):
            out[name] = (lambda b=getattr(SDPBackend, attr): sdpa_kernel(b))
    return out


def _timer(fn_fwd, q, k, v, dout, mode):
    """A zero-argument callable running `mode` of fn_fwd(q, k, v)."""
    if mode == "fwd":
        return lambda: fn_fwd(q, k, v)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn_fwd(q, k, v), (q, k, v), dout)
    out = fn_fwd(q, k, v)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def _peaks(device):
    try:
        from llmkern import flops

        return flops.device_peak(device, "bf16"), flops.peak("a100", "bf16")
    except Exception:  # flops module missing or card unknown
        return None, 312e12


def _uses_tma(q, k, v):
    from llmkern.kernels.attention import use_tma

    return use_tma(q, k, v, q)


@contextlib.contextmanager
def _tma_off():
    old = os.environ.get("LLMKERN_ATTN_TMA")
    os.environ["LLMKERN_ATTN_TMA"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LLMKERN_ATTN_TMA"]
        else:
            os.environ["LLMKERN_ATTN_TMA"] = old


def _gpu_rows(ctx):
    import llmkern

    dev = ctx.device
    dtype = torch.bfloat16
    peak, peak_a100 = _peaks(dev)
    seqs = (1024, 4096) if ctx.quick else (512, 1024, 2048, 4096, 8192, 16384)
    dims = (128,) if ctx.quick else (64, 128)
    backends = _sdpa_backends()
    plan = [(D, causal, T) for D in dims for causal in (False, True) for T in seqs]
    for D, causal, T in ctx.progress(plan, desc="attention"):
        B, H = TOKENS // T, HIDDEN // D
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        ours = lambda a, b, c: llmkern.attention(a, b, c, causal=causal)  # noqa: E731
        for mode in ("fwd", "bwd", "fwd+bwd"):
            fl = _flops(B, H, T, D, causal, mode)
            ours_ms = time_fn(_timer(ours, q, k, v, dout, mode), dev, quick=ctx.quick)
            base = {}

            def sd(a, b, c):
                return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

            for name, ctxm in backends.items():
                try:
                    with ctxm():  # the backend is picked at the forward; its backward follows
                        base[name] = time_fn(_timer(sd, q, k, v, dout, mode), dev, quick=ctx.quick)
                except RuntimeError:  # backend not available for this shape/card
                    continue
            best = min(base, key=base.get) if base else None
            tflops = fl / (ours_ms * 1e-3) / 1e12
            extra = {f"sdpa-{n}_ms": ms for n, ms in base.items()}
            extra.update({f"sdpa-{n}_tflops": fl / (ms * 1e-3) / 1e12 for n, ms in base.items()})
            extra["mfu_a100"] = _mfu(tflops, peak_a100, mode)
            notes = ""
            if T == 4096 and causal and D == 128 and _uses_tma(q, k, v):  # the target shape: both kernel families
                with _tma_off():
                    ptr_ms = time_fn(_timer(ours, q, k, v, dout, mode), dev, quick=ctx.quick)
                extra["ours_pointer_kernels_ms"] = ptr_ms
                notes = f"TMA kernels; pointer kernels {fl / (ptr_ms * 1e-3) / 1e12:.0f} TFLOP/s"
            yield Result(op=f"attention {mode}", shape=f"B={B} H={H} T={T} D={D} causal={causal} bf16",
                         ours_ms=ours_ms, baseline=f"sdpa-{best}" if best else "",
                         baseline_ms=base.get(best), throughput=tflops, unit="TFLOP/s",
                         mfu=_mfu(tflops, peak, mode), extra=extra, notes=notes)
        del q, k, v, dout
    yield from _dropout_row(ctx, T=4096, D=128, p=0.1, dtype=dtype, peak=peak)
    yield from _sinks_row(ctx, T=4096, H=64, Hk=8, D=64, dtype=dtype, peak=peak)
    yield from _decode_rows(ctx, B=32, H=32, Hk=8, T=8192, D=128, dtype=dtype)
    # (gpu_check's time limit cuts a suite from its end: the never-timed decode rows before the training ones)
    for H in (16, 128):
        yield from _mla_decode_row(ctx, B=64, H=H, T=4096, R=512, Dr=64, dtype=dtype)
    yield from _merge_row(ctx, B=64, H=32, D=128, dtype=dtype)
    yield from _alibi_row(ctx, T=4096, H=16, D=128, dtype=dtype, peak=peak)
    if not ctx.quick:
        yield from _mla_row(ctx, T=4096, H=16, D=192, Dv=128, dtype=dtype, peak=peak)


def _sdpa_with_sinks(q, k, v, sinks):
    """The sinks through SDPA, causal (T = Tq = Tk): one more key of zeros whose score is the sink, given
    by a float mask [1, H, T, T + 1] (T^2 memory; what a user without a sink kernel can write)."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    k, v = (torch.cat([t.repeat_interleave(rep, 1), t.new_zeros(B, H, 1, D)], 2) for t in (k, v))
    i = torch.arange(T, device=q.device)
    mask = torch.zeros(T, T + 1, device=q.device, dtype=q.dtype)
    mask[:, :T].masked_fill_(i[None, :] > i[:, None], float("-inf"))
    mask = mask.expand(H, T, T + 1).clone()
    mask[:, :, T] = sinks.to(q.dtype)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])


def _sinks_row(ctx, T, H, Hk, D, dtype, peak):
    """gpt-oss-style attention (GQA, per-head sinks, causal) fwd+bwd: the sink inside our kernels' online
    softmax against SDPA with the sink as an extra masked key column (the sinks' own gradient is left out
    of both timings)."""
    import llmkern

    dev = ctx.device
    B = max(1, TOKENS // T // 4)
    q = torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hk, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    sinks = torch.randn(H, device=dev)
    dout = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    fl = _flops(B, H, T, D, True, "fwd+bwd")
    ours_ms = time_fn(_timer(lambda a, b, c: llmkern.attention(a, b, c, causal=True, sinks=sinks),
                             q, k, v, dout, "fwd+bwd"), dev, quick=ctx.quick)
    try:
        base_ms = time_fn(_timer(lambda a, b, c: _sdpa_with_sinks(a, b, c, sinks), q, k, v, dout, "fwd+bwd"),
                          dev, quick=ctx.quick)
    except RuntimeError:  # out of memory for the T^2 mask on a small card
        base_ms = None
    tflops = fl / (ours_ms * 1e-3) / 1e12
    yield Result(op="attention fwd+bwd sinks (gpt-oss)",
                 shape=f"B={B} H={H} Hk={Hk} T={T} D={D} causal=True {str(dtype).replace('torch.', '')}",
                 ours_ms=ours_ms, baseline="sdpa + sink column mask" if base_ms else "", baseline_ms=base_ms,
                 throughput=tflops, unit="TFLOP/s", mfu=_mfu(tflops, peak), extra=_a100_extra(tflops))


def _alibi_row(ctx, T, H, D, dtype, peak):
    """ALiBi (causal, the paper's slopes) fwd+bwd: the bias computed per tile in our kernels against SDPA
    with the bias and the causal mask as a float attn_mask [H, T, T] (what a user without an ALiBi kernel
    writes; SDPA's flash backend takes no float mask, so the efficient or cuDNN one runs)."""
    import llmkern

    dev = ctx.device
    B = max(1, TOKENS // T // 2)
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=dev)
    fl = _flops(B, H, T, D, True, "fwd+bwd")
    ours_ms = time_fn(_timer(lambda a, b, c: llmkern.attention(a, b, c, causal=True, alibi_slopes=slopes),
                             q, k, v, dout, "fwd+bwd"), dev, quick=ctx.quick)
    try:
        i = torch.arange(T, device=dev)
        mask = (-slopes[:, None, None] * (i[:, None] - i[None, :]).abs()).masked_fill(i[None, :] > i[:, None],
                                                                                     float("-inf"))
        mask = mask[None].to(dtype)
        base_ms = time_fn(_timer(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask),
                                 q, k, v, dout, "fwd+bwd"), dev, quick=ctx.quick)
    except RuntimeError:  # out of memory for the T^2 mask on a small card
        base_ms = None
    tflops = fl / (ours_ms * 1e-3) / 1e12
    yield Result(op="attention fwd+bwd alibi",
                 shape=f"B={B} H={H} T={T} D={D} causal=True {str(dtype).replace('torch.', '')}",
                 ours_ms=ours_ms, baseline="sdpa + float bias mask" if base_ms else "", baseline_ms=base_ms,
                 throughput=tflops, unit="TFLOP/s", mfu=_mfu(tflops, peak), extra=_a100_extra(tflops))


def _mla_row(ctx, T, H, D, Dv, dtype, peak):
    """DeepSeek MLA's prefill/training attention (q/k 192 = 128 nope + 64 rope, v 128; causal) fwd+bwd against
    the fastest SDPA backend that takes a value head dim different from q/k's. FLOPs: 2·T²·D for Q·Kᵀ plus
    2·T²·Dv for P·V per head (halved for causal), times 3.5 for fwd+bwd."""
    import llmkern

    dev = ctx.device
    B = max(1, TOKENS // T // 2)
    q, k = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, Dv, device=dev, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, H, T, Dv, device=dev, dtype=dtype)
    fl = _flops(B, H, T, (D + Dv) / 2, True, "fwd+bwd")
    ours_ms = time_fn(_timer(lambda a, b, c: llmkern.attention(a, b, c, causal=True), q, k, v, dout, "fwd+bwd"),
                      dev, quick=ctx.quick)
    base = {}
    for name, ctxm in {**_sdpa_backends(), "default": contextlib.nullcontext}.items():  # (default: SDPA's pick)
        try:
            with ctxm():
                base[name] = time_fn(_timer(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                            q, k, v, dout, "fwd+bwd"), dev, quick=ctx.quick)
        except RuntimeError:  # a backend without this head-dim pair (flash: D == Dv only) or this card
            continue
    best = min(base, key=base.get) if base else None
    tflops = fl / (ours_ms * 1e-3) / 1e12
    yield Result(op="attention fwd+bwd D=192 Dv=128 (DeepSeek MLA prefill)",
                 shape=f"B={B} H={H} T={T} D={D} Dv={Dv} causal=True {str(dtype).replace('torch.', '')}",
                 ours_ms=ours_ms, baseline=f"sdpa-{best}" if best else "", baseline_ms=base.get(best),
                 throughput=tflops, unit="TFLOP/s", mfu=_mfu(tflops, peak),
                 extra=_a100_extra(tflops, {f"sdpa-{n}_ms": ms for n, ms in base.items()}))


def _dropout_row(ctx, T, D, p, dtype, peak):
    """Training with attention dropout (fwd+bwd, causal): the mask is hashed inside our kernels; SDPA's
    flash/efficient backends draw theirs with Philox."""
    import llmkern

    dev = ctx.device
    B, H = TOKENS // T, HIDDEN // D
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    fl = _flops(B, H, T, D, True, "fwd+bwd")
    ours_ms = time_fn(_timer(lambda a, b, c: llmkern.attention(a, b, c, causal=True, dropout_p=p),
                             q, k, v, dout, "fwd+bwd"), dev, quick=ctx.quick)
    base = {}
    for name, ctxm in _sdpa_backends().items():
        try:
            with ctxm():
                base[name] = time_fn(_timer(lambda a, b, c: F.scaled_dot_product_attention(
                    a, b, c, is_causal=True, dropout_p=p), q, k, v, dout, "fwd+bwd"), dev, quick=ctx.quick)
        except RuntimeError:  # backend without dropout or not for this card
            continue
    best = min(base, key=base.get) if base else None
    tflops = fl / (ours_ms * 1e-3) / 1e12
    yield Result(op="attention fwd+bwd dropout", shape=f"B={B} H={H} T={T} D={D} causal=True p={p} bf16",
                 ours_ms=ours_ms, baseline=f"sdpa-{best}" if best else "", baseline_ms=base.get(best),
                 throughput=tflops, unit="TFLOP/s", mfu=_mfu(tflops, peak),
                 extra=_a100_extra(tflops, {f"sdpa-{n}_ms": ms for n, ms in base.items()}))


def _decode_rows(ctx, B, H, Hk, T, D, dtype):
    import llmkern

    dev = ctx.device
    kc = torch.randn(B, Hk, T, D, device=dev, dtype=dtype)
    vc = torch.randn(B, Hk, T, D, device=dev, dtype=dtype)
    q = torch.randn(B, H, 1, D, device=dev, dtype=dtype)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    ours_ms = time_fn(lambda: llmkern.attention_with_kvcache(q, kc, vc, lens), dev, quick=ctx.quick)
    kr, vr = kc.repeat_interleave(H // Hk, 1), vc.repeat_interleave(H // Hk, 1)
    base = {}
    try:
        base["sdpa-gqa"] = time_fn(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), dev,
                                   quick=ctx.quick)
    except (TypeError, RuntimeError):  # enable_gqa needs torch >= 2.5
        pass
    base["sdpa-repeated-kv"] = time_fn(lambda: F.scaled_dot_product_attention(q, kr, vr), dev, quick=ctx.quick)
    best = min(base, key=base.get)
    gbytes = 2 * kc.numel() * kc.element_size() / 1e9
    yield Result(op="attention decode (kv-cache, split-K)",
                 shape=f"B={B} H={H} Hk={Hk} kv={T} D={D} q=1 {str(dtype).replace('torch.', '')}",
                 ours_ms=ours_ms, baseline=best, baseline_ms=base[best],
                 throughput=gbytes / (ours_ms * 1e-3), unit="GB/s",
                 extra={f"{n}_ms": ms for n, ms in base.items()})
    # llmkern.attention itself on the same tensors (a model whose cache is a plain tensor, transformers'
    # DynamicCache): one query and no gradient take the split-K decode kernel too
    plain_ms = time_fn(lambda: llmkern.attention(q, kc, vc, causal=True), dev, quick=ctx.quick)
    yield Result(op="attention, one query (plain cache tensor)",
                 shape=f"B={B} H={H} Hk={Hk} kv={T} D={D} q=1 {str(dtype).replace('torch.', '')}",
                 ours_ms=plain_ms, baseline=best, baseline_ms=base[best],
                 throughput=gbytes / (plain_ms * 1e-3), unit="GB/s",
                 notes="" if dev.type == "cuda" else "CPU: SDPA's CPU kernel")
    # the same cache stored as float8 (vLLM's kv_cache_dtype="fp8"): half the bytes the decode reads
    fp8 = torch.float8_e4m3fn
    k8, v8 = llmkern.quantize_kv(kc, fp8, 0.5), llmkern.quantize_kv(vc, fp8, 0.5)
    fp8_ms = time_fn(lambda: llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=0.5, v_scale=0.5), dev,
                     quick=ctx.quick)
    yield Result(op="attention decode, fp8 kv-cache",
                 shape=f"B={B} H={H} Hk={Hk} kv={T} D={D} q=1 {str(dtype).replace('torch.', '')}, cache e4m3",
                 ours_ms=fp8_ms, baseline=f"llmkern {str(dtype).replace('torch.', '')} cache", baseline_ms=ours_ms,
                 throughput=(k8.numel() * k8.element_size() + v8.numel() * v8.element_size()) / 1e9 / (fp8_ms * 1e-3),
                 unit="GB/s", notes="" if dev.type == "cuda" else "CPU: the reference reads a dequantized copy")


def _mla_decode_row(ctx, B, H, T, R, Dr, dtype):
    """llmkern.mla_decode over a latent cache [B, 1, T, R + Dr] (values: its first R channels) vs SDPA."""
    import llmkern

    dev = ctx.device
    kv = torch.randn(B, 1, T, R + Dr, device=dev, dtype=dtype)
    q = torch.randn(B, H, 1, R + Dr, device=dev, dtype=dtype)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    scale = (128 + Dr) ** -0.5  # (DeepSeek's per-head scale; any number times the same work)
    ours_ms = time_fn(lambda: llmkern.mla_decode(q, kv, lens, head_dim_v=R, scale=scale), dev, quick=ctx.quick)
    base = {"sdpa-heads-as-rows": time_fn(  # [B, 1, H, D]: one query head of H rows, no repeat of the cache
        lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kv, kv[..., :R], scale=scale), dev, quick=ctx.quick)}
    try:
        base["sdpa-gqa"] = time_fn(lambda: F.scaled_dot_product_attention(q, kv, kv[..., :R], scale=scale,
                                                                          enable_gqa=True), dev, quick=ctx.quick)
    except (TypeError, RuntimeError):  # enable_gqa needs torch >= 2.5
        pass
    best = min(base, key=base.get)
    gbytes = kv.numel() * kv.element_size() / 1e9
    flops = 2 * B * H * T * (2 * R + Dr)
    extra = {f"{n}_ms": ms for n, ms in base.items()}
    extra["tflops"] = flops / (ours_ms * 1e-3) / 1e12
    yield Result(op="mla decode (latent kv-cache)",
                 shape=f"B={B} H={H} kv={T} D={R}+{Dr} q=1 {str(dtype).replace('torch.', '')}",
                 ours_ms=ours_ms, baseline=best, baseline_ms=base[best], throughput=gbytes / (ours_ms * 1e-3),
                 unit="GB/s", extra=extra, notes="FlashMLA / FlashInfer MLA are not installed on the bench machine")
    kv8 = llmkern.quantize_kv(kv, torch.float8_e4m3fn)  # the latent cache stored as float8 (vLLM's fp8 MLA cache)
    fp8_ms = time_fn(lambda: llmkern.mla_decode(q, kv8, lens, head_dim_v=R, scale=scale, kv_scale=1.0), dev,
                     quick=ctx.quick)
    yield Result(op="mla decode, fp8 latent cache",
                 shape=f"B={B} H={H} kv={T} D={R}+{Dr} q=1 {str(dtype).replace('torch.', '')}, cache e4m3",
                 ours_ms=fp8_ms, baseline=f"llmkern {str(dtype).replace('torch.', '')} cache", baseline_ms=ours_ms,
                 throughput=kv8.numel() * kv8.element_size() / 1e9 / (fp8_ms * 1e-3), unit="GB/s")


def _merge_row(ctx, B, H, D, dtype):
    """merge_attention_states of two decode states [B, H, 1, D] (cascade decoding's last step) vs the same
    formula in eager torch ops (logaddexp, exp, weighted sum): GB/s of the bytes the merge must move."""
    import llmkern
    from llmkern.reference.attention import merge_attention_states as eager

    dev = ctx.device
    oa, ob = (torch.randn(B, H, 1, D, device=dev, dtype=dtype) for _ in range(2))
    la, lb = (torch.randn(B, H, 1, device=dev) for _ in range(2))
    ours_ms = time_fn(lambda: llmkern.merge_attention_states(oa, la, ob, lb), dev, quick=ctx.quick)
    base_ms = time_fn(lambda: eager(oa, la, ob, lb), dev, quick=ctx.quick)
    gbytes = (3 * oa.numel() * oa.element_size() + 3 * la.numel() * 4) / 1e9
    yield Result(op="merge attention states (cascade)", shape=f"B={B} H={H} q=1 D={D} "
                 f"{str(dtype).replace('torch.', '')}", ours_ms=ours_ms, baseline="eager torch ops",
                 baseline_ms=base_ms, throughput=gbytes / (ours_ms * 1e-3), unit="GB/s")


def _cpu_rows(ctx):
    """What a CPU user gets from llmkern.attention (the reference path) vs SDPA: seconds."""
    import llmkern

    B, H, T, D = 1, 4, 256, 64
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    for causal in (False, True):
        ours = time_fn(lambda: llmkern.attention(q, k, v, causal=causal), ctx.device, quick=True)
        base = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), ctx.device, quick=True)
        fl = _flops(B, H, T, D, causal, "fwd")
        yield Result(op="attention fwd (cpu path)", shape=f"B={B} H={H} T={T} D={D} causal={causal} fp32",
                     ours_ms=ours, baseline="sdpa-cpu", baseline_ms=base,
                     throughput=fl / (ours * 1e-3) / 1e12, unit="TFLOP/s",
                     notes="CPU runs SDPA's kernel with our masks (or the reference); GPU numbers need a CUDA run")
    yield from _decode_rows(ctx, B=2, H=8, Hk=2, T=512, D=64, dtype=torch.float32)
    yield from _mla_decode_row(ctx, B=2, H=16, T=512, R=128, Dr=32, dtype=torch.float32)


@suite("attention", "fused attention vs SDPA (flash/cuDNN/efficient): fwd, bwd, fwd+bwd TFLOP/s; KV-cache decode")
def run(ctx):
    if ctx.device.type == "cuda":
        yield from _gpu_rows(ctx)
    else:
        yield from _cpu_rows(ctx)
