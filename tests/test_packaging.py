"""The source distribution carries everything the extension build reads (`pip install llmkern-*.tar.gz` compiles
csrc/ on the user's machine: a header left out of the sdist fails that build, not ours)."""
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_sdist(tmp_path):
    # a copy of the tree, so the sdist's egg-info is written there and not into the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("csrc", "llmkern"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    env = dict(os.environ, LLMKERN_CUDA="0")  # (the file list does not depend on it; skips nvcc probing)
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (tarball,) = list((tmp_path / "dist").glob("llmkern-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        return {"/".join(n.split("/")[1:]) for n in tar.getnames()}


def test_sdist_has_every_extension_source(tmp_path):
    names = _build_sdist(tmp_path)
    csrc = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        csrc += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files
                 if f.endswith((".h", ".cpp", ".cu"))]
    assert any(f.endswith(".h") for f in csrc)  # (the headers are what setuptools leaves out by itself)
    missing = sorted(f for f in csrc if f not in names)
    assert not missing, f"sdist lacks {missing}"
    for f in ("setup.py", "pyproject.toml", "README.md", "llmkern/__init__.py", "llmkern/kernels/attention.py"):
        assert f in names, f"sdist lacks {f}"
