"""Suite `sampling`: llmkern.sample against the sort-based PyTorch sampler (sort, softmax, cumsum,
mask, multinomial: what transformers and most servers run) and against one torch.softmax pass
over the same logits (a proxy for the memory-bound floor), measured in the same run; and
llmkern.top_logprobs against what vLLM's sampler runs for logprobs=n (log_softmax of a float32 copy,
topk, gather) at B=64, V=128256, n=20."""
import torch

import llmkern
from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn
from llmkern.reference import sort_based_sample

CONFIGS = {"top-k+top-p": dict(top_k=50, top_p=0.9), "top-p": dict(top_p=0.9)}


def _shapes(ctx):
    if ctx.device.type == "cpu" and ctx.quick:
        return [(1, 128256), (32, 128256)]
    return [(b, v) for b in (1, 32, 256) for v in (32000, 128256)]


@suite("sampling", "top-k / top-p sampling vs the sort-based PyTorch sampler and one softmax pass")
def run(ctx):
    dev = ctx.device
    shapes = _shapes(ctx)
    for (B, V) in ctx.progress(shapes, desc="sampling"):
        gen = torch.Generator(device=dev).manual_seed(0)
        logits = torch.randn(B, V, device=dev, generator=gen) * 3
        softmax_ms = time_fn(lambda: torch.softmax(logits, -1), dev, quick=ctx.quick)
        for name, kw in CONFIGS.items():
            ours_ms = time_fn(lambda: llmkern.sample(logits, seed=0, **kw), dev, quick=ctx.quick)
            sort_ms = time_fn(lambda: sort_based_sample(logits, generator=gen, **kw), dev, quick=ctx.quick)
            gbs = B * V * logits.element_size() / (ours_ms * 1e-3) / 1e9
            shape = f"B={B} V={V} fp32"
            yield Result(op=f"sample {name}", shape=shape, ours_ms=ours_ms, baseline="torch sort-based",
                         baseline_ms=sort_ms, throughput=gbs, unit="GB/s")
            yield Result(op=f"sample {name}", shape=shape, ours_ms=ours_ms, baseline="one softmax pass",
                         baseline_ms=softmax_ms, throughput=gbs, unit="GB/s",
                         notes="ratio >= 1/3 meets the 'at most 3x one pass' target")

    yield from _logprobs_rows(ctx)


def _vllm_logprobs(logits, n, tokens):
    """vLLM's sampler: a float32 [B, V] log-softmax, its topk, and a gather of the sampled tokens."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(n, -1)
    return top if tokens is None else (top, lp.gather(1, tokens[:, None]))


def _logprobs_rows(ctx, B=64, V=128256, n=20):
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, V, (B,), device=dev, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(B, V, device=dev, generator=gen) * 3).to(dtype)
        for tok, label in ((None, ""), (tokens, " + tokens")):
            ours_ms = time_fn(lambda: llmkern.top_logprobs(logits, n, tokens=tok), dev, quick=ctx.quick)
            base_ms = time_fn(lambda: _vllm_logprobs(logits, n, tok), dev, quick=ctx.quick)
            gbs = B * V * logits.element_size() / (ours_ms * 1e-3) / 1e9
            yield Result(op=f"top_logprobs n={n}{label}", shape=f"B={B} V={V} {str(dtype).split('.')[-1]}",
                         ours_ms=ours_ms, baseline="torch log_softmax+topk+gather", baseline_ms=base_ms,
                         throughput=gbs, unit="GB/s")
