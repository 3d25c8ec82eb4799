"""Run a function on p local ranks, each in a fresh process with a process group (for tests,
benchmarks and quick experiments; production runs use torchrun).

    from llmkern.parallel.launch import spawn
    results = spawn(fn, world_size=2, args=(...,), timeout=60)   # fn(rank, world_size, *args)

The ranks meet on 127.0.0.1 at a port the OS picks; every collective is bounded by
`pg_timeout` seconds and the whole run by `timeout` (ranks still alive then are killed), so a bug
fails instead of hanging. Returns the list of fn's return values in rank order; raises
RuntimeError with every failed rank's traceback. args and the return values travel between the
processes, so they must pickle (TypeError naming them otherwise, at once, not after the timeout). A rank
ends with os._exit once its results are sent (logging flushed; its other atexit handlers do not run).
"""
import datetime
import io
import logging
import numbers
import os
import pickle
import queue as _queue
import socket
import sys
import time
import traceback
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp

from llmkern.ops._checks import real_arg


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_process_group(rank, world_size, port, backend="gloo", pg_timeout=30.0, host="127.0.0.1"):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = host
    os.environ["MASTER_PORT"] = str(port)
    if backend == "gloo" and host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout), **kw)


def _rank_main(rank, world_size, port, backend, pg_timeout, num_threads, tasks, results):
    import torch.distributed as dist

    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        init_process_group(rank, world_size, port, backend, pg_timeout)
    except BaseException:  # noqa: B902
        results.put((-1, rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args = task
        try:
            value = fn(rank, world_size, *args)
            _check_result(fn, value)
            results.put((task_id, rank, True, value))
        except BaseException:  # noqa: B902  (report everything to the parent)
            results.put((task_id, rank, False, traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    _leave(results)


def _leave(results):
    """Ends the rank's process once its results have reached the parent, without the interpreter's shutdown: with
    torch imported that took 1-3 s per rank, which every pool's close() (and each spawn) waited for. Its tasks are
    done and reported; logging's handlers are flushed and closed, stdout and stderr flushed; other atexit handlers
    of the rank's (coverage's, a user's) do not run."""
    results.close()
    results.join_thread()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


class _PickleProbe(ForkingPickler):
    """A trial run of the queues' pickling, tensors and storages left out: they always travel, and ForkingPickler
    moves a CPU tensor into shared memory and duplicates a file descriptor for it on each dump, which a trial
    dump nobody loads would leak (one per tensor per run)."""

    def persistent_id(self, obj):
        if torch.is_tensor(obj) or isinstance(obj, (torch.UntypedStorage, torch.TypedStorage)):
            return 0
        return None


def _probe_pickle(obj):
    _PickleProbe(io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(obj)


def _check_result(fn, value):
    """TypeError unless fn's return value pickles: the result queue pickles it in a background thread, where a
    failure (a lambda, a generator, a process group) was printed only, and the parent then waited for the whole
    timeout and reported the rank as not finishing."""
    try:
        _probe_pickle(value)
    except Exception as exc:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} returned a {type(value).__name__} that cannot be sent "
                        f"back to the parent (it must pickle): {exc}") from None


def _seconds(what, name, v):
    """v as a float > 0, else ValueError naming it (0 or a negative timeout failed every run as "did not finish",
    a negative pg_timeout inside torch's store), a string too, as the pool's other checks raise."""
    return real_arg(f"{what}: {name} (seconds)", v, positive=True, type_error=ValueError)


def _check_args(what, args):
    """args as a tuple, or TypeError naming it: tuple("abc") passed 'a', 'b', 'c' (args="abc" for ("abc",)), an int
    failed after the ranks had started, and arguments that do not pickle were lost in the task queue's background
    thread (a printed traceback), the run then waiting for its whole timeout."""
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{what}: args must be a tuple (or list) of fn's arguments after (rank, world_size), got "
                        f"{type(args).__name__}{' (a 1-tuple needs a comma: (x,))' if isinstance(args, str) else ''}")
    try:
        _probe_pickle(tuple(args))
    except Exception as exc:
        raise TypeError(f"{what}: args must pickle (the spawned ranks receive a copy): {exc}") from None
    return tuple(args)


def _check_fn(what, fn):
    """TypeError unless fn is a callable that pickles (by reference: cheap). The task queue pickles it in a
    background thread, where a lambda or a nested function failed with a printed traceback only, and the run then
    waited for its whole timeout and reported the ranks as not finishing."""
    if not callable(fn):
        raise TypeError(f"{what}: fn must be a function, got {type(fn).__name__}")
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(f"{what}: fn must be picklable (a module-level function, which the spawned ranks import), "
                        f"got {getattr(fn, '__qualname__', fn)!r}: {exc}") from None


class RankPool:
    """`world_size` spawned ranks with a live process group, running functions on request:

        with RankPool(2) as pool:
            pool.run(fn, args)   # fn(rank, world_size, *args) on every rank; list of results

    Starting ranks (importing torch in each) dominates small runs; a pool pays it once. A task
    that fails, or does not finish within `timeout`, raises RuntimeError with the tracebacks and
    closes the pool (its ranks may be left inside a collective)."""

    def __init__(self, world_size, backend="gloo", pg_timeout=30.0, num_threads=1):
        from llmkern.ops._checks import positive_int

        # (checked before any process starts: world_size 0 ran nothing and returned [], a bool started one rank)
        world_size = positive_int("RankPool: world_size", world_size)
        pg_timeout = _seconds("RankPool", "pg_timeout", pg_timeout)
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral)
                                        or num_threads < 0):
            raise ValueError(f"RankPool: num_threads must be None or an int >= 0 (0: torch's default), got "
                             f"{num_threads!r}")
        if not isinstance(backend, str):
            raise TypeError(f"RankPool: backend must be a string ('gloo', 'nccl'), got {type(backend).__name__}")
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, backend, pg_timeout, num_threads,
                                                            self._tasks[r], self._results), daemon=True)
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._next = 0
        self.closed = False

    def run(self, fn, args=(), timeout=120.0):
        if self.closed:
            raise RuntimeError("RankPool is closed")
        timeout = _seconds("RankPool.run", "timeout", timeout)
        _check_fn("RankPool.run", fn)
        args = _check_args("RankPool.run", args)
        self._next += 1
        task_id = self._next
        for q in self._tasks:
            q.put((task_id, fn, args))
        deadline = time.monotonic() + timeout
        got, failures = {}, {}
        while len(got) + len(failures) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                tid, r, ok, val = self._results.get(timeout=min(left, 1.0))
            except _queue.Empty:
                for i, p in enumerate(self._procs):
                    if not p.is_alive() and i not in got and i not in failures:
                        failures[i] = f"rank {i} exited with code {p.exitcode} without a result"
                continue
            if tid == -1:
                failures[r] = val
            elif tid == task_id:
                (got if ok else failures)[r] = val
        missing = [i for i in range(self.world_size) if i not in got and i not in failures]
        if missing or failures:  # ranks may be left mid-collective: start afresh next time
            self.close()
        if failures or missing:
            msg = [f"--- rank {r} failed:\n{tb}" for r, tb in sorted(failures.items())]
            if missing:
                msg.append(f"--- ranks {missing} did not finish within {timeout:.0f} s (pool killed)")
            raise RuntimeError(f"llmkern.parallel.launch: {getattr(fn, '__name__', fn)} failed\n" + "\n".join(msg))
        return [got[r] for r in range(self.world_size)]

    def close(self):
        if self.closed:
            return
        self.closed = True
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 3.0  # let the ranks leave the group; then stop them
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def spawn(fn, world_size, args=(), timeout=120.0, backend="gloo", pg_timeout=30.0, num_threads=1):
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks; see the module docstring."""
    _seconds("spawn", "timeout", timeout)
    _check_fn("spawn", fn)  # (before any rank starts: seconds each)
    args = _check_args("spawn", args)
    with RankPool(world_size, backend, pg_timeout, num_threads) as pool:
        return pool.run(fn, args, timeout)
