"""The kernel-compile scripts (tests/test_*_compile.py), run in the background while the rest of the suite runs.

Each compile test runs a script in a subprocess (Triton compiles for sm_80 / sm_90 with its bundled ptxas: minutes of
one core in all), and the rest of the suite leaves the machine's second core mostly idle. conftest.py registers the
scripts of the selected compile tests at collection (a test function lists them in its `background` attribute), moves
those tests to the end of the run, and starts one worker thread that runs the scripts one after another; a test then
takes its script's result (`run_script`), waiting only for what is not finished yet. A script nobody registered (a
test run on its own, or the script run by hand) runs in the foreground, as before.
"""
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JOBS = {}  # (script, args) -> _Job
_WORKER = []
_RUNNING = []  # the script running now (stop() kills it)
_STOP = threading.Event()


class _Job:
    def __init__(self, script, args, timeout):
        self.script, self.args, self.timeout = script, tuple(args), timeout
        self.done = threading.Event()
        self.result = self.error = None

    def run(self):
        try:
            self.result = _run(self.script, self.args, self.timeout)
        except BaseException as exc:  # (raised again in the test that waits for it)
            self.error = exc
        finally:
            self.done.set()


def _run(script, args, timeout):
    """`python script args` outside the interpreter (TRITON_INTERPRET unset: kernels cannot be compiled under it),
    with the repository and tests/ importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    argv = [sys.executable, script, *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=ROOT) as proc:
        _RUNNING.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            raise
        finally:
            _RUNNING.remove(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def register(script, args=(), timeout=600):
    """Queue a script for the background worker (before start(); a script queued twice runs once)."""
    key = (os.path.abspath(script), tuple(args))
    if key not in _JOBS:
        _JOBS[key] = _Job(key[0], args, timeout)


def start():
    """Start the worker over the queued scripts, in the order they were registered."""
    if _WORKER or not _JOBS:
        return
    jobs = list(_JOBS.values())

    def work():
        for job in jobs:
            if _STOP.is_set():
                job.error = RuntimeError("the background runs were stopped")
                job.done.set()
            else:
                job.run()

    t = threading.Thread(target=work, name="llmkern-compile-scripts", daemon=True)
    t.start()
    _WORKER.append(t)


def run_script(script, args=(), timeout=600):
    """The CompletedProcess of `python script args`: the background run's where one was queued (waiting for it), else
    a run now."""
    job = _JOBS.get((os.path.abspath(script), tuple(args)))
    if job is None or not _WORKER:
        return _run(script, args, timeout)
    job.done.wait()  # (each script runs under its own timeout: the worker always moves on)
    if job.error is not None:
        raise job.error
    return job.result


def stop():
    """At the end of the session (or an interrupted one): no script left running after pytest exits."""
    _STOP.set()
    for proc in list(_RUNNING):
        proc.kill()
