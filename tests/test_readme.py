"""The README's Python examples run as written (each in a fresh interpreter, on this machine's device).

Blocks that say they need torchrun (an initialized process group) are skipped: the tensor-parallel
tests cover those layers.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "torchrun" not in b]


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, tmp_path):
    code = _blocks()[index]
    env = {k: v for k, v in os.environ.items() if k not in ("LLMKERN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # in a scratch folder: the examples write files (a saved adapter) where they run
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, f"README example {index} failed:\n{code}\n{res.stderr[-3000:]}"
