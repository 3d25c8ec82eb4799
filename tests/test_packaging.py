"""The source distribution carries everything the extension build reads (`pip install llmkern-*.tar.gz` compiles
csrc/ on the user's machine: a header left out of the sdist fails that build, not ours)."""
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_sdist(tmp_path, cuda="0"):
    # a copy of the tree, so the sdist's egg-info is written there and not into the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("csrc", "llmkern", "tests"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    env = dict(os.environ, LLMKERN_CUDA=cuda)  # (the file list does not depend on it; "0" skips nvcc probing)
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                         env=env, capture_output=True, text=True, timeout=300)
    if cuda != "0":
        return res
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
    # (tests/conftest.py: setuptools ships tests/test_*.py by itself, and without their conftest the GPU tests
    # ran, and failed, on a CPU machine)
    for f in ("setup.py", "pyproject.toml", "README.md", "llmkern/__init__.py", "llmkern/kernels/attention.py",
              "tests/conftest.py"):
        assert f in names, f"sdist lacks {f}"


def test_an_unknown_llmkern_cuda_value_stops_the_build(tmp_path):
    """LLMKERN_CUDA=none (or cpu, a typo) fell through to auto and compiled the CUDA sources (minutes)."""
    res = _build_sdist(tmp_path, cuda="none")
    assert res.returncode != 0 and "LLMKERN_CUDA must be auto, 0 or 1" in res.stderr + res.stdout
