"""Timing: CUDA events on GPU (triton.testing.do_bench when available), torch.utils.benchmark on
CPU. Every function returns the median in milliseconds."""
import statistics

import torch


def time_fn(fn, device=None, warmup=3, min_run_time=0.5, quick=False):
    """Median milliseconds of `fn()` on `device` (inferred as CUDA when available)."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return _time_cuda(fn, quick)
    return _time_cpu(fn, warmup, 0.2 if quick else min_run_time)


def _time_cuda(fn, quick):
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                              return_mode="median"))
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20 if quick else 50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def _time_cpu(fn, warmup, min_run_time):
    import torch.utils.benchmark as tub

    for _ in range(warmup):
        fn()
    timer = tub.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
