"""Timing: CUDA events on GPU (triton.testing.do_bench when available), torch.utils.benchmark on
CPU. Every function returns the median in milliseconds."""
import statistics
import time

import torch


def time_fn(fn, device=None, warmup=3, min_run_time=0.5, quick=False):
    """Median milliseconds of `fn()` on `device` (inferred as CUDA when available)."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return _time_cuda(fn, quick)
    return _time_cpu(fn, warmup, 0.2 if quick else min_run_time, quick)


MIN_CUDA_RUNS = {True: 5, False: 10}  # timed calls at least (quick, full)


def _once_ms(fn):
    """Device ms of one call after a warm-up call (compilation and autotuning happen there)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _time_cuda(fn, quick):
    try:
        from triton.testing import do_bench

        # do_bench times int(rep / estimate) calls: for a 40 ms training step a rep of 40 ms is ONE timed call.
        # The rep grows with the call's own time so that the median has MIN_CUDA_RUNS calls at least; one call
        # more than that, since the estimate also holds do_bench's L2 clear per call (int() then lost one).
        rep = max(40 if quick else 100, (MIN_CUDA_RUNS[quick] + 1) * _once_ms(fn))
        return float(do_bench(fn, warmup=10 if quick else 25, rep=rep, return_mode="median"))
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


MIN_CPU_RUNS = {True: 3, False: 5}  # timed blocks at least (quick, full)


def _warm_up(fn, warmup, min_run_time):
    """`warmup` calls of fn, but two when the second (warm) call alone takes min_run_time: a training step of a
    second gains nothing from a third warm-up call (the first compiles, the second makes optimizer state), and
    _time_cpu now times it MIN_CPU_RUNS times."""
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        if i >= 1 and time.perf_counter() - start >= min_run_time:
            return


def _time_cpu(fn, warmup, min_run_time, quick=True):
    """Median over MIN_CPU_RUNS timed blocks at least: blocked_autorange alone times ONE call of a call that
    takes longer than min_run_time (every mfu and generate row on CPU), a median of a single sample."""
    import torch.utils.benchmark as tub

    _warm_up(fn, warmup, min_run_time)
    timer = tub.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < MIN_CPU_RUNS[quick]:  # (Timer.timeit would warm up again: two more calls each)
        start = time.perf_counter()
        for _ in range(m.number_per_run):
            fn()
        times.append((time.perf_counter() - start) / m.number_per_run)
    return statistics.median(times) * 1e3
