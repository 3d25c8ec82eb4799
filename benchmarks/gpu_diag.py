"""Where the GPU time goes: per-kernel times (torch.profiler) and every autotune candidate's time.

The harness (llmkern-bench) says how fast an op is against its baseline; this says why, in one short
run on the GPU machine: for each workload it prints the CUDA kernels of a few iterations (time per
iteration, launches per iteration) and, for each of our autotuned kernels that tuned on it, every
candidate config's measured time. Sections run in order, each guarded (a failure prints its traceback
and moves on; the exit status is 1 when any section failed):

    python benchmarks/gpu_diag.py [host decode attention lora sampling mfu nf4 mla]   (default: all)

Knobs are the package's own environment variables (LLMKERN_FAST_LAUNCH, LLMKERN_ATTN_TMA, LLMKERN_ATTN_TMA_BWD,
LLMKERN_LORA_AUTOTUNE, LLMKERN_LORA_TMA, LLMKERN_SAMPLE_SPLIT, LLMKERN_ATTN_TUNE_TOP, LLMKERN_DECODE_CONFIG,
LLMKERN_MLA_CONFIG); a section may
set them for one workload, and says so in its heading.
"""
import contextlib
import os
import sys
import time
import traceback

import torch

_seen_timings = {}


def _say(*a):
    print(*a, flush=True)


@contextlib.contextmanager
def env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_table(label, fn, iters=5, top=14):
    """Run fn twice (warm-up, tuning), then profile `iters` calls: per-iteration time of each kernel."""
    fn()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / iters, e.count / iters, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    _say(f"\n## {label}: wall {wall:.3f} ms/iter, kernels {total / 1e3:.3f} ms/iter")
    for t, n, name in rows[:top]:
        _say(f"  {t:9.1f} us  x{n:<5.1f} {name[:110]}")


def dump_autotuners(tuners):
    """Every candidate's time of each autotuner that tuned since the last dump."""
    for name, tuner in tuners.items():
        timings = getattr(tuner, "configs_timings", None)
        if not timings or _seen_timings.get(name) is timings:
            continue
        _seen_timings[name] = timings
        best = min(timings, key=lambda c: _ms(timings[c]))
        _say(f"  autotune {name}: {len(timings)} candidates, best {_cfg(best)}")
        for c, t in sorted(timings.items(), key=lambda ct: _ms(ct[1])):
            _say(f"    {_ms(t):8.4f} ms  {_cfg(c)}")


def _ms(t):
    return t[0] if isinstance(t, (list, tuple)) else t


def _cfg(c):
    kw = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"{kw} w{c.num_warps} s{c.num_stages}"


def attention():
    import llmkern
    from llmkern.kernels import attention as A

    def tuners():
        return {n: A._tuned(n) for n in ("fwd", "fwd_tma", "dkdv", "dkdv_tma", "dq", "dq_tma")}

    def qkv(B, H, T, D=128):
        g = torch.Generator(device="cuda").manual_seed(0)
        return [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                for _ in range(3)]

    cases = [(16, 1024, True), (16, 1024, False), (4, 4096, True)]
    variants = [("default", {}), ("pointer (LLMKERN_ATTN_TMA=0)", {"LLMKERN_ATTN_TMA": "0"}),
                ("TMA backward (LLMKERN_ATTN_TMA_BWD=1)", {"LLMKERN_ATTN_TMA_BWD": "1"})]
    for vname, kv in variants:
        for B, T, causal in cases:
            q, k, v = qkv(B, 16, T)
            do = torch.randn_like(q)
            with env(**kv):
                label = f"attention B={B} H=16 T={T} D=128 causal={causal} bf16, {vname}"
                kernel_table(label + ", fwd", lambda: llmkern.attention(q, k, v, causal=causal))
                kernel_table(label + ", fwd+bwd",
                             lambda: torch.autograd.grad(llmkern.attention(q, k, v, causal=causal), (q, k, v), do),
                             iters=3)
            dump_autotuners(tuners())


def lora():
    import llmkern
    from llmkern.kernels import lora as L

    M, K, N, r = 8192, 4096, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, device="cuda", generator=g) * sc).to(torch.bfloat16)  # noqa: E731
    x, W, b, dy = rnd(M, K), rnd(N, K, sc=K ** -0.5), rnd(N), rnd(M, N)
    xg = x.clone().requires_grad_()
    A = rnd(r, K, sc=K ** -0.5).requires_grad_()
    B = rnd(N, r, sc=r ** -0.5).requires_grad_()
    kernel_table("base F.linear fwd+bwd (frozen W)",
                 lambda: torch.autograd.grad(torch.nn.functional.linear(xg, W, b), (xg,), dy))
    variants = [("fixed config (LLMKERN_LORA_AUTOTUNE=0)", {"LLMKERN_LORA_AUTOTUNE": "0"}),
                ("fixed config, pointer GEMM (LLMKERN_LORA_TMA=0)", {"LLMKERN_LORA_AUTOTUNE": "0", "LLMKERN_LORA_TMA": "0"}),
                ("autotuned", {})]
    for vname, kv in variants:
        with env(**kv), torch.no_grad():
            kernel_table(f"lora_linear fwd M={M} K={K} N={N} r={r} bf16, {vname}",
                         lambda: llmkern.lora_linear(x, W, b, A, B, 2.0))
        with env(**kv):
            kernel_table(f"lora_linear fwd+bwd, {vname}",
                         lambda: torch.autograd.grad(llmkern.lora_linear(xg, W, b, A, B, 2.0), (xg, A, B), dy))
        dump_autotuners({k: v for k, v in L._tuned.items()})
    x3 = x.view(16, M // 16, K)
    for n in (1, 16):
        An, Bn = rnd(n, r, K, sc=K ** -0.5), rnd(n, N, r, sc=r ** -0.5)
        scal = torch.full((n,), 2.0, device="cuda")
        ids = (torch.arange(16, device="cuda") % n)[:, None].expand(16, M // 16).contiguous()
        with env(LLMKERN_LORA_AUTOTUNE="0"), torch.no_grad():
            kernel_table(f"lora_linear_multi fwd, {n} adapters, fixed config",
                         lambda: llmkern.lora_linear_multi(x3, W, b, An, Bn, scal, ids))


def sampling():
    import llmkern

    g = torch.Generator(device="cuda").manual_seed(0)
    for B, V in ((256, 128256), (1, 128256)):
        logits = torch.randn(B, V, device="cuda", generator=g) * 3
        for name, kw in (("top-k+top-p", dict(top_k=50, top_p=0.9)), ("top-p", dict(top_p=0.9))):
            for vname, kv in (("default", {}), ("no split prepass", {"LLMKERN_SAMPLE_SPLIT": "0"})):
                with env(**kv):
                    kernel_table(f"sample {name} B={B} V={V} fp32, {vname}",
                                 lambda: llmkern.sample(logits, seed=0, **kw), iters=10)
        kernel_table(f"torch.softmax B={B} V={V}", lambda: torch.softmax(logits, -1), iters=10)


def mfu():
    from llmkern.bench.suites.mfu import _step_fn
    from llmkern.models import get_config

    for backend in ("torch", "llmkern"):
        step, _, _ = _step_fn(get_config("gpt2"), backend, 8, 1024, False, torch.device("cuda"), False)
        with env(LLMKERN_ATTN_TUNE_TOP="2"):  # as the harness's GPU run: bounded compile time
            kernel_table(f"gpt2-124m train step B=8 T=1024, backend={backend}", step, iters=3, top=20)
        del step
        torch.cuda.empty_cache()


def host_and_device_ms(fn, n=10):
    """(host ms per call, device ms per call) of fn: the host time is measured while a long sleep kernel
    holds the GPU, so the CPU never waits for it (a call that syncs shows up as a host time near the
    sleep); the device time with events around n back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(4e8))  # about 0.2 s of GPU clock cycles
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    if host * n > 150:  # (CUDA's launch queue holds about a thousand launches: past that a launch waits for the
        # sleep, and the host time measures the sleep, not the host)
        _say(f"  (host time {host * n:.0f} ms over {n} calls, near the 200 ms sleep: an upper bound, the launch "
             f"queue may have filled)")
    return host, device_ms(fn, n, warm=False)


def device_ms(fn, n=20, warm=True):
    """Device ms per call of fn: events around n back-to-back calls (after one warm-up call)."""
    if warm:
        fn()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def host():
    """Host time per call against device time, with the launch front on and off (LLMKERN_FAST_LAUNCH):
    where host > device, the eager op is bound by Python and launch work, not by its kernels."""
    import llmkern
    from llmkern.bench.suites.mfu import _step_fn
    from llmkern.models import get_config

    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = (rnd(16, 16, 1024, 128).requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    M, K, N, r = 8192, 4096, 4096, 16
    x, W, dy = rnd(M, K).requires_grad_(), rnd(N, K) * K ** -0.5, rnd(M, N)
    A, B = (rnd(r, K) * K ** -0.5).requires_grad_(), (rnd(N, r) * r ** -0.5).requires_grad_()
    An, Bn = rnd(16, r, K) * K ** -0.5, rnd(16, N, r) * r ** -0.5
    ids = (torch.arange(M, device="cuda") // (M // 16)).contiguous()
    scal = torch.full((16,), 2.0, device="cuda")
    logits, labels = rnd(8 * 1024, 50304), torch.randint(0, 50257, (8 * 1024,), device="cuda")
    logits.requires_grad_()
    step, _, _ = _step_fn(get_config("gpt2"), "llmkern", 8, 1024, False, torch.device("cuda"), False)
    step_t, _, _ = _step_fn(get_config("gpt2"), "torch", 8, 1024, False, torch.device("cuda"), False)
    # a decode step's attention with its new token appended (B=8, GQA 32/8, D=128, 4k cache, pages of 16)
    dq, dk = rnd(8, 32, 1, 128), rnd(8, 8, 1, 128)
    pool = rnd(8 * 256 + 8, 8, 16, 128)
    table = torch.randperm(pool.shape[0], device="cuda")[:8 * 256].view(8, 256).to(torch.int32)
    dlens = torch.full((8,), 4000, device="cuda", dtype=torch.int32)
    dense = rnd(8, 8, 4096, 128)
    xs, Ws, As, Bs = rnd(8192, 768).requires_grad_(), rnd(768, 768) * 768 ** -0.5, rnd(16, 768), rnd(768, 16)
    As.requires_grad_()
    Bs.requires_grad_()
    work = [
        ("attention fwd B=16 H=16 T=1024 D=128 causal", lambda: llmkern.attention(q.detach(), k.detach(), v.detach(), causal=True)),
        ("attention fwd+bwd (same)", lambda: torch.autograd.grad(llmkern.attention(q, k, v, causal=True), (q, k, v), do)),
        ("lora_linear fwd+bwd M=8192 K=N=4096 r=16", lambda: torch.autograd.grad(llmkern.lora_linear(x, W, None, A, B, 2.0), (x, A, B), dy)),
        ("lora_linear_multi fwd, 16 adapters (host waits: ids check)", lambda: llmkern.lora_linear_multi(x.detach(), W, None, An, Bn, scal, ids)),
        ("cross_entropy fwd+bwd N=8192 V=50304", lambda: torch.autograd.grad(llmkern.cross_entropy(logits, labels), (logits,))),
        ("lora_linear fwd+bwd M=8192 K=N=768 r=16 (GPT-2 size)",
         lambda: torch.autograd.grad(llmkern.lora_linear(xs, Ws, None, As, Bs, 2.0), (xs, As, Bs), dy[:, :768])),
        ("kvcache decode + append B=8 4k paged", lambda: llmkern.attention_with_kvcache(
            dq, pool, pool, dlens, k=dk, v=dk, block_table=table)),
        ("kvcache decode + append B=8 4k dense", lambda: llmkern.attention_with_kvcache(
            dq, dense, dense, dlens, k=dk, v=dk)),
        ("gpt2-124m train step B=8 T=1024 (llmkern)", step),
        ("gpt2-124m train step B=8 T=1024 (torch)", step_t),
    ]
    variants = [("front", {}), ("no front", {"LLMKERN_FAST_LAUNCH": "0"})]
    with env(LLMKERN_ATTN_TUNE_TOP="2"):
        for name, fn in work:
            extra = [("front, pointer kernels", {"LLMKERN_ATTN_TMA": "0"})] if name.startswith("attention") else []
            if name.startswith("kvcache"):  # the one-launch append against the indexing ops it replaced
                extra = [("indexing-op append", {"LLMKERN_KV_APPEND_KERNEL": "0"})]
            if "GPT-2 size" in name:  # the small-layer dispatch (llmkern.ops.lora.fused_pays) against fused
                extra = [("fused (FUSED_MIN_MNK=0)", {"LLMKERN_LORA_FUSED_MIN_MNK": "0"})]
            for vname, kv in variants + extra:
                with env(**kv):
                    h, d = host_and_device_ms(fn, n=1 if "step" in name else 10)  # (a step: ~1000 launches)
                _say(f"  {name:58s} {vname:24s}: host {h:8.3f} ms/call, device {d:8.3f} ms/call")


def decode():
    """The split-K decode kernel over block sizes, warps, stages and split counts (B=32, GQA 32/8,
    kv 8192, D=128, bf16), against SDPA: the bench row was 0.403 ms vs SDPA's 0.363 (2026-11-26)."""
    import llmkern
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, Hk, T, D = 32, 32, 8, 8192, 128
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kc = torch.randn(B, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), T, device="cuda", dtype=torch.int32)

    ms = device_ms
    gb = 2 * B * Hk * T * D * 2 / 1e9
    t = ms(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True))
    _say(f"  SDPA (enable_gqa): {t:.4f} ms ({gb / t * 1e3:.0f} GB/s)")
    for cfg in ("64,4,3", "64,4,4", "128,4,2", "128,4,3", "128,8,3", "64,8,4", "32,4,4"):
        for splits in (0, 2, 4, 8):
            with env(LLMKERN_DECODE_CONFIG=cfg):
                try:
                    t = ms(lambda: llmkern.attention_with_kvcache(q, kc, vc, lens, num_splits=splits))
                    _say(f"  decode BLOCK_N,warps,stages={cfg:8s} splits={splits or 'auto'}: {t:.4f} ms "
                         f"({gb / t * 1e3:.0f} GB/s)")
                except Exception as exc:  # noqa: BLE001 - e.g. a config out of shared memory
                    _say(f"  decode {cfg} splits={splits}: {type(exc).__name__}: {str(exc)[:100]}")
    # llmkern.attention on a plain cache tensor (transformers' DynamicCache): one query, no grad, now the split-K
    # decode kernel; LLMKERN_ATTN_DECODE_MAX_TQ=0 gives the forward kernel it replaced
    t = ms(lambda: llmkern.attention(q, kc, vc, causal=True))
    with env(LLMKERN_ATTN_DECODE_MAX_TQ="0"):
        t0 = ms(lambda: llmkern.attention(q, kc, vc, causal=True))
    _say(f"  llmkern.attention Tq=1 no grad: decode route {t:.4f} ms ({gb / t * 1e3:.0f} GB/s), forward kernel "
         f"{t0:.4f} ms ({gb / t0 * 1e3:.0f} GB/s)")
    # transformers' static cache under attn_implementation="llmkern": a one-token step over all 8192 slots with 1024
    # written. Before: the decode route over every slot under the mask; now attention_with_kvcache with each row's
    # key count (llmkern.integrations.transformers._static_step_mask). SDPA reads every slot, masked.
    n = 1024
    mask = (torch.arange(T, device="cuda") < n)[None, :].expand(B, T).contiguous()
    lens_n = torch.full((B,), n, device="cuda", dtype=torch.int32)
    t_all = ms(lambda: llmkern.attention(q, kc, vc, causal=True, key_padding_mask=mask))
    t_len = ms(lambda: llmkern.attention_with_kvcache(q, kc, vc, lens_n, key_padding_mask=mask))
    t_sdpa = ms(lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask[:, None, None, :], enable_gqa=True))
    _say(f"  static cache step, {n} of {T} slots written: masked route {t_all:.4f} ms, with lengths {t_len:.4f} ms, "
         f"SDPA masked {t_sdpa:.4f} ms")
    # the float8 cache (half the bytes): the same kernel with wider key tiles may pay off there
    k8, v8 = llmkern.quantize_kv(kc), llmkern.quantize_kv(vc)
    for cfg in ("64,4,3", "128,4,3", "128,8,3", "256,8,3"):
        with env(LLMKERN_DECODE_CONFIG=cfg):
            try:
                t = ms(lambda: llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=1.0, v_scale=1.0))
                _say(f"  decode fp8 cache BLOCK_N,warps,stages={cfg:8s}: {t:.4f} ms ({gb / 2 / t * 1e3:.0f} GB/s)")
            except Exception as exc:  # noqa: BLE001
                _say(f"  decode fp8 {cfg}: {type(exc).__name__}: {str(exc)[:100]}")


def nf4():
    """QLoRA's NF4 GEMM: where the in-loop dequantization (fused) stops beating dequantize-first, over M
    (LLMKERN_NF4_FUSED_MAX_M, default 256, is an estimate until this runs), against the dense LoRA op and
    bitsandbytes' dequantize + cuBLAS when bitsandbytes is installed. K=N=4096, r=16, bf16, frozen base."""
    import llmkern

    K, N, r = 4096, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, device="cuda", generator=g) * sc).to(torch.bfloat16)  # noqa: E731
    W = rnd(N, K, sc=K ** -0.5)
    qw = llmkern.nf4_quantize(W)
    A, B = rnd(r, K, sc=K ** -0.5), rnd(N, r, sc=r ** -0.5)
    gb = qw.nbytes / 1e9
    t = device_ms(lambda: llmkern.nf4_dequantize(qw, torch.bfloat16))
    _say(f"  nf4_dequantize {N}x{K}: {t:.4f} ms ({(gb + N * K * 2 / 1e9) / t * 1e3:.0f} GB/s)")
    try:
        import bitsandbytes.functional as bnbF
        q, st = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
        t = device_ms(lambda: bnbF.dequantize_4bit(q, st))
        _say(f"  bitsandbytes dequantize_4bit: {t:.4f} ms")
    except Exception as exc:  # noqa: BLE001 - not installed, or no kernel for this card
        _say(f"  bitsandbytes: {type(exc).__name__}: {str(exc)[:80]}")
    for M in (1, 16, 64, 128, 256, 512, 1024, 4096):
        x = rnd(M, K)
        with torch.no_grad():
            row = [f"M={M:5d}"]
            for label, kv in (("fused", {"LLMKERN_NF4_FUSED_MAX_M": str(1 << 30)}),
                              ("dequant-first", {"LLMKERN_NF4_FUSED_MAX_M": "0"})):
                with env(**kv):
                    row.append(f"{label} {device_ms(lambda: llmkern.lora_linear(x, qw, None, A, B, 2.0)):.4f}")
            row.append(f"dense {device_ms(lambda: llmkern.lora_linear(x, W, None, A, B, 2.0)):.4f}")
            row.append(f"W-read floor {gb / 3.35:.4f}")  # 4-bit W once at 3.35 TB/s (H100 SXM), in ms
        _say("  lora_linear fwd ms: " + ", ".join(row))


def mla():
    """llmkern.mla_decode (DeepSeek-V3's latent cache: 512 + 64 channels, one kv head, bf16, B=64, kv 4096,
    one new token) over tile configs and split counts, for 16 local heads (TP=8) and 128 (TP=1), against SDPA
    with the heads folded into query rows (one GEMM pair per batch row; the best plain-torch form). The floor
    is the latent read once: B * T * 576 * 2 bytes."""
    import llmkern
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, R, Dr = 64, 4096, 512, 64
    kv = torch.randn(B, 1, T, R + Dr, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
    gb = kv.numel() * 2 / 1e9
    for H in (16, 128):
        q = torch.randn(B, H, 1, R + Dr, device="cuda", dtype=torch.bfloat16, generator=g)
        t = device_ms(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kv, kv[..., :R], scale=0.1))
        _say(f"  H={H} SDPA (heads as query rows): {t:.4f} ms ({gb / t * 1e3:.0f} GB/s)")
        cfgs = ("", "16,64,8,2", "32,64,8,2", "32,32,8,2", "64,16,8,2", "64,32,8,2", "64,64,8,2", "64,16,8,3",
                "32,32,4,2", "16,32,4,3")
        for cfg in cfgs:
            for splits in (0, 4, 16):
                with env(LLMKERN_MLA_CONFIG=cfg) if cfg else contextlib.nullcontext():
                    try:
                        t = device_ms(lambda: llmkern.mla_decode(q, kv, lens, head_dim_v=R, scale=0.1,
                                                                 num_splits=splits))
                        _say(f"  H={H} mla_decode M,N,warps,stages={cfg or 'default':10s} splits={splits or 'auto'}: "
                             f"{t:.4f} ms ({gb / t * 1e3:.0f} GB/s)")
                    except Exception as exc:  # noqa: BLE001 - e.g. a config out of shared memory
                        _say(f"  H={H} mla_decode {cfg} splits={splits}: {type(exc).__name__}: {str(exc)[:100]}")


SECTIONS = {"host": host, "decode": decode, "attention": attention, "lora": lora, "sampling": sampling, "mfu": mfu,
            "nf4": nf4, "mla": mla}


def main(argv):
    """Runs the sections; returns 1 when any of them raised (after running the rest), else 0."""
    _say(f"gpu_diag on {torch.cuda.get_device_name()} (torch {torch.__version__})")
    failed = []
    for name in argv or list(SECTIONS):
        t0 = time.time()
        _say(f"\n# section {name}")
        try:
            if name not in SECTIONS:
                raise KeyError(f"unknown section {name!r}; sections: {' '.join(SECTIONS)}")
            SECTIONS[name]()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            failed.append(f"{name} ({type(exc).__name__})")
        _say(f"# section {name}: {time.time() - t0:.1f} s")
    if failed:
        _say(f"\n# gpu_diag: FAILED sections: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
