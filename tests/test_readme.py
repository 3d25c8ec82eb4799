"""The README's Python examples run as written (each in a fresh interpreter, on this machine's device).

Blocks that say they need torchrun (an initialized process group) are skipped: the tensor-parallel
tests cover those layers. Most of each example's time is the single-threaded import of torch, which every
example makes first: one interpreter imports torch once and forks a child per example (each child then is a
fresh `python -c EXAMPLE` that has run `import torch`: its own stdout, stderr, folder, exit status, atexit
and interpreter shutdown), two children at a time, each test waiting for its own.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds one example may run

# The forking interpreter. Reads the jobs ([code, folder, stdout file, stderr file] each) as one JSON line, runs
# at most two children at a time and prints "index exit-status" as each ends. A child leaves the loop and runs
# its example in a cleared __main__ from this program's top level: an uncaught exception prints its traceback
# and exits 1, and the interpreter then shuts down (atexit, threads joined, streams flushed), as `python -c` does.
_FORKER = r"""
import json, os, signal, sys
import torch  # noqa: F401  (what every example imports first; its own import statement then finds it)
jobs = json.loads(sys.stdin.readline())
running, job = {}, None
MAIN_NAMES = ("__name__", "__doc__", "__package__", "__loader__", "__spec__", "__annotations__", "__builtins__")


def _as_main(code):
    scope = sys.modules["__main__"].__dict__  # pickle finds the example's functions there
    for name in [n for n in scope if n not in MAIN_NAMES]:
        del scope[name]
    exec(compile(code, "<string>", "exec"), scope)


def _reap():
    pid, status = os.wait()
    print(running.pop(pid), os.waitstatus_to_exitcode(status), flush=True)


for index, spec in enumerate(jobs):
    if len(running) == 2:
        _reap()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        job = spec
        break
    running[pid] = index
if job is None:
    while running:
        _reap()
    sys.exit(0)
os.chdir(job[1])
sys.stdin.close()
for fd, path in ((1, job[2]), (2, job[3])):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, fd)
    os.close(f)
sys.argv = ["-c"]
signal.alarm(%d)  # a hung example ends with SIGALRM
_as_main(job[0])
"""


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "torchrun" not in b]


def _start(blocks, tmp):
    """The forking interpreter running every block (each in its own folder under tmp), and index -> the future
    of (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLMKERN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    jobs = []
    for i, code in enumerate(blocks):
        # in a scratch folder: the examples write files (a saved adapter) where they run
        folder = os.path.join(tmp, str(i))
        os.mkdir(folder)
        jobs.append([code, folder, os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")])
    proc = subprocess.Popen([sys.executable, "-c", _FORKER % TIMEOUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=tmp, start_new_session=True)
    proc.stdin.write(json.dumps(jobs) + "\n")
    proc.stdin.close()
    futures = {i: Future() for i in range(len(blocks))}

    def read():
        for line in proc.stdout:
            index, status = map(int, line.split())
            err = jobs[index][3]
            futures[index].set_result((status, open(err).read() if os.path.exists(err) else ""))
        for f in futures.values():  # (the forking interpreter itself died)
            if not f.done():
                f.set_result((None, f"the forking interpreter exited with {proc.wait()}"))

    threading.Thread(target=read, daemon=True).start()
    return proc, futures


@pytest.fixture(scope="module")
def runs():
    """index -> the future of its example's (exit status, stderr), every example submitted at once."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, futures = _start(_blocks(), tmp)
        yield futures
        if proc.poll() is None:  # (before the folder goes: none still running) the forker and its children
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, runs):
    status, stderr = runs[index].result()  # (each child ends within TIMEOUT)
    assert status == 0, f"README example {index} failed (status {status}):\n{_blocks()[index]}\n{stderr[-3000:]}"
