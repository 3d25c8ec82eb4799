"""Suite `generate`: end-to-end decoding with llmkern.generate over a zoo model's KV cache, the serving side
of the package (prefill, then one token per step: attention_with_kvcache's split-K kernel, the fused norms /
RoPE / SwiGLU, llmkern.sample), in decoded tokens per second.

Rows: greedy decoding with backend="llmkern" against the same model on backend="torch" (SDPA, eager ops);
the same with a float8 KV cache (model.kv_cache_dtype = float8_e4m3fn) against the 16-bit cache; and
sampling (temperature, top-k, top-p) on the llmkern backend against greedy. Random weights: the tokens are
meaningless, the work per step is a real model's. Each timed call is a whole generate() (prefill included;
its share is in the notes). On GPU: llama-1b in bf16, B=32, a 1024-token prompt, 128 new tokens; on CPU:
llama-tiny in float32.
"""
import torch

import llmkern
from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn
from llmkern.models import build, get_config


def _plan(device, quick):
    """(config name, batch, prompt length, new tokens, dtype)."""
    if device.type == "cuda":
        return [("llama-1b", 32, 1024, 128 if not quick else 64, torch.bfloat16)]
    return [("llama-tiny", 4, 64, 16 if quick else 32, torch.float32)]


def _model(name, backend, dtype, device, block):
    torch.manual_seed(0)
    cfg = get_config(name, block_size=block)
    return build(cfg, backend=backend).to(device=device, dtype=dtype).eval()


def _timed(model, ids, new, ctx, **kw):
    with torch.no_grad():  # (here, not around the suite's loop: its rows are yielded between the timings)
        return time_fn(lambda: llmkern.generate(model, ids, new, **kw), ctx.device, quick=ctx.quick)


@suite("generate", "end-to-end decoding (llmkern.generate, KV cache): llmkern vs torch backend, fp8 vs 16-bit cache")
def run(ctx):
    """Each row is yielded as soon as its timings are done (a run stopped by its limit keeps the rows it
    finished); the timings are taken in the same order as before: llmkern, prefill, torch, fp8, sample."""
    dev = ctx.device
    for name, B, T, new, dtype in ctx.progress(_plan(dev, ctx.quick), desc="generate"):
        prec = str(dtype).replace("torch.", "")
        ids = torch.randint(0, get_config(name).vocab_size, (B, T), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(0))
        shape = f"{name} B={B} prompt={T} new={new} {prec}"

        def tok_s(t):
            return B * new / (t * 1e-3)

        ours = _model(name, "llmkern", dtype, dev, T + new)
        ms = {"llmkern": _timed(ours, ids, new, ctx),
              "prefill": _timed(ours, ids, 1, ctx)}  # (one new token: the prefill and one sampling step)
        base = _model(name, "torch", dtype, dev, T + new)
        ms["torch"] = _timed(base, ids, new, ctx)
        del base
        prefill = f"prefill + 1 token: {ms['prefill']:.2f} ms"
        yield Result(op="generate greedy", shape=shape, ours_ms=ms["llmkern"], baseline="torch backend",
                     baseline_ms=ms["torch"], throughput=tok_s(ms["llmkern"]), unit="tok/s", notes=prefill,
                     extra={"prefill_ms": ms["prefill"]})
        ours.kv_cache_dtype = torch.float8_e4m3fn
        ms["fp8"] = _timed(ours, ids, new, ctx)
        ours.kv_cache_dtype = None
        yield Result(op="generate greedy, fp8 kv-cache", shape=shape + ", cache e4m3", ours_ms=ms["fp8"],
                     baseline=f"llmkern {prec} cache", baseline_ms=ms["llmkern"], throughput=tok_s(ms["fp8"]),
                     unit="tok/s", notes="" if dev.type == "cuda" else "CPU: the cache is read dequantized")
        ms["sample"] = _timed(ours, ids, new, ctx, strategy="sample", temperature=0.8, top_k=50, top_p=0.9, seed=0)
        yield Result(op="generate sample (top-k 50, top-p 0.9)", shape=shape, ours_ms=ms["sample"],
                     baseline="llmkern greedy", baseline_ms=ms["llmkern"], throughput=tok_s(ms["sample"]),
                     unit="tok/s")
        del ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()
