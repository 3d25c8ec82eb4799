"""The README's Python examples run as written (each in a fresh interpreter, on this machine's device).

Blocks that say they need torchrun (an initialized process group) are skipped: the tensor-parallel
tests cover those layers. The interpreters run two at a time (started by the first test: most of each one's
time is the single-threaded import of torch), each test waiting for its own.
"""
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "torchrun" not in b]


def _run(code, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("LLMKERN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # in a scratch folder: the examples write files (a saved adapter) where they run
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def runs():
    """index -> the future of its example's run, every example submitted at once to two workers."""
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        for i, code in enumerate(_blocks()):
            os.mkdir(os.path.join(tmp, str(i)))
            futures[i] = pool.submit(_run, code, os.path.join(tmp, str(i)))
        yield futures
        for f in futures.values():  # (before the folder goes: none still running)
            f.cancel()
        concurrent.futures.wait(list(futures.values()))


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, runs):
    res = runs[index].result()
    assert res.returncode == 0, f"README example {index} failed:\n{_blocks()[index]}\n{res.stderr[-3000:]}"
