"""Sampling CPU targets (issue 2): llmkern.sample against one torch.softmax pass and the sort-based
sampler, as a markdown table. Usage: python benchmarks/sampling_cpu.py

llmkern and softmax are timed in alternating blocks of back-to-back calls (median over all calls),
so that drift in the machine's speed during the run cancels out of their ratio; the much slower
sort-based sampler is timed on its own, 3 calls.
"""
import time

import torch

import llmkern
from llmkern.reference import sort_based_sample

FILTERS = [("top-k 50 + top-p 0.9", dict(top_k=50, top_p=0.9)), ("top-p 0.9", dict(top_p=0.9))]


def interleaved_ms(fns, n, rounds=5):
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(max(1, n // rounds)):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def sort_ms(fn, n=3):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def warm_up(seconds=3.0):
    """This VM runs the first second or two of a process up to 1.7x slower (clock ramp): spin first."""
    x = torch.randn(8, 32000)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.softmax(x, -1)
        llmkern.sample(x, seed=0, top_p=0.9)


def main():
    warm_up()
    print("| B | V | filter | llmkern ms | softmax ms | x softmax | sort-based ms | speed-up vs sort |")
    print("|---|---|---|---|---|---|---|---|")
    for B, V in [(1, 32000), (1, 128256), (32, 32000), (32, 128256), (256, 32000), (256, 128256)]:
        x = torch.randn(B, V) * 3
        fns = {"softmax": lambda: torch.softmax(x, -1)}
        for name, kw in FILTERS:
            fns[name] = lambda kw=kw: llmkern.sample(x, seed=0, **kw)
        n = 400 if B == 1 else (60 if B == 32 else 20)
        ms = interleaved_ms(fns, n)
        for name, kw in FILTERS:
            t, sm = ms[name], ms["softmax"]
            srt = sort_ms(lambda: sort_based_sample(x, **kw))
            print(f"| {B} | {V} | {name} | {t:.3f} | {sm:.3f} | {t / sm:.2f} | {srt:.1f} | {srt / t:.0f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
