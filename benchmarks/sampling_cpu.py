"""Sampling CPU targets (issue 2): median wall time of llmkern.sample vs one torch.softmax pass and the
sort-based sampler, as a markdown table. Usage: python benchmarks/sampling_cpu.py"""
import time, torch, llmkern
from llmkern.reference import sort_based_sample
def tm(fn, n=40):
    for _ in range(5): fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2] * 1e3
print("| B | V | filter | llmkern ms | softmax ms | x softmax | sort-based ms | speed-up vs sort |")
print("|---|---|---|---|---|---|---|---|")
for B, V in [(1, 32000), (1, 128256), (32, 32000), (32, 128256), (256, 32000), (256, 128256)]:
    x = torch.randn(B, V) * 3
    sm = tm(lambda: torch.softmax(x, -1))
    for name, kw in [("top-k 50 + top-p 0.9", dict(top_k=50, top_p=0.9)), ("top-p 0.9", dict(top_p=0.9))]:
        t = tm(lambda: llmkern.sample(x, seed=0, **kw))
        srt = tm(lambda: sort_based_sample(x, **kw), 3)
        print(f"| {B} | {V} | {name} | {t:.3f} | {sm:.3f} | {t/sm:.2f} | {srt:.1f} | {srt/t:.0f}x |", flush=True)
