"""How much CPU the gloo collectives themselves burn on this machine (issue 5's CPU overlap target).

Two gloo ranks on 127.0.0.1, one thread each: wall time and process CPU time (user + system) of an
8 MiB all-reduce, of the same bytes as one point-to-point exchange, and of a GEMM of similar length.
Over loopback TCP the kernel copies every byte on both sides, so most of a collective's wall time is
CPU time. When both cores are busy with the GEMM that CPU time cannot hide under it: the CPU share
is a floor on the exposed-communication fraction that any overlap scheme reaches on such a machine.
The last column is the share of both cores busy (all processes, kernel included, from /proc/stat):
what stays idle during a collective is all that an overlap could fill with GEMM work.
Usage: python benchmarks/tp_comm_cpu.py
"""
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _machine_ticks():
    """(all, idle) jiffies of the whole machine, from /proc/stat (Linux); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(v), v[3] + v[4]  # idle + iowait


def _measure(fn, iters=20):
    dist.barrier()
    m0 = _machine_ticks()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(iters):
        fn()
    wall = (time.perf_counter() - t0) / iters
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    m1 = _machine_ticks()
    cpu = ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / iters
    busy = 1 - (m1[1] - m0[1]) / max(1, m1[0] - m0[0]) if m0 and m1 else float("nan")
    return wall * 1e3, cpu * 1e3, busy


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x = torch.randn(2048, 1024)  # 8 MiB fp32
    y = torch.empty_like(x)
    w = torch.randn(128, 1024)

    def exchange():
        ops = [dist.P2POp(dist.isend, x, 1 - rank), dist.P2POp(dist.irecv, y, 1 - rank)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    cases = [("all-reduce 8 MiB", lambda: dist.all_reduce(x)), ("p2p exchange 8 MiB", exchange),
             ("GEMM 2048x1024x128", lambda: torch.matmul(x, w.t()))]
    for _, fn in cases:
        fn()
    rows = [(name,) + _measure(fn) for name, fn in cases]
    if rank == 0:
        print("| operation | wall ms | rank CPU ms (user+sys) | rank CPU share | whole machine busy |")
        print("|---|---|---|---|---|")
        for name, wall, cpu, busy in rows:
            print(f"| {name} | {wall:.2f} | {cpu:.2f} | {cpu / wall:.2f} | {busy:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_worker, args=(29533,), nprocs=2)
