"""Builds llmkern._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Environment:
  LLMKERN_CUDA=auto|0|1   auto (default): build CUDA sources when possible; 1: require them.
  TORCH_CUDA_ARCH_LIST    GPU targets; default "8.0;9.0a" when no GPU is visible.
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja builder).
  CUDA_HOME / CUDA_PATH   toolkit location (else /usr/local/cuda, else the nvcc on PATH).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """Locate the CUDA toolkit without trusting a wrapper `nvcc` on PATH.

    torch guesses dirname(dirname(which nvcc)); when nvcc is a wrapper script in /usr/local/bin
    that lands on /usr/local and linking fails ("cannot find -lcudart").
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # Ask nvcc where it lives: a wrapper script still reports the toolkit's own directories.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True,
                             text=True, timeout=60).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                top = line.split("TOP=", 1)[1].strip().strip('"')
                if os.path.exists(os.path.join(top, "bin", "nvcc")):
                    return os.path.realpath(top)
    except Exception:  # pragma: no cover - best effort
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvcc_major(home):
    """The CUDA major version of the toolkit at `home` (nvcc --version), or None when it cannot be read."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        m = re.search(r"release (\d+)\.", out)
        return int(m.group(1)) if m else None
    except Exception:  # pragma: no cover - best effort
        return None


def _want_cuda(torch):
    mode = os.environ.get("LLMKERN_CUDA", "auto").strip().lower()
    if mode not in ("auto", "", "0", "false", "no", "off", "1", "true", "yes", "on"):
        sys.exit(f"LLMKERN_CUDA must be auto, 0 or 1 (also off / on, false / true, no / yes), got {mode!r}")
    if mode in ("0", "false", "no", "off"):
        return False, None
    home = _real_cuda_home()
    possible = torch.version.cuda is not None and home is not None
    if mode in ("1", "true", "yes", "on") and not possible:
        sys.exit("LLMKERN_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
    if possible and mode not in ("1", "true", "yes", "on"):
        # torch.utils.cpp_extension refuses a toolkit whose major version differs from torch's CUDA (an error,
        # not a warning): under "auto" build the CPU kernels instead of failing the install
        nvcc, torch_major = _nvcc_major(home), int(torch.version.cuda.split(".")[0])
        if nvcc is not None and nvcc != torch_major:
            print(f"llmkern setup: CUDA toolkit {home} is CUDA {nvcc}, torch is built for CUDA {torch.version.cuda}: "
                  f"skipping the CUDA sources (LLMKERN_CUDA=1 forces them)", file=sys.stderr)
            return False, None
    return possible, home


def _extensions():
    import torch

    build_cuda, cuda_home = _want_cuda(torch)
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        # torch.utils.cpp_extension reads CUDA_HOME at import time: import it only now.
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
    import torch.utils.cpp_extension as cpp_ext

    sources = ["csrc/llmkern.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-Wno-psabi"]
    define_macros = []
    ext_cls = cpp_ext.CppExtension
    extra = {"cxx": cxx}
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("LLMKERN_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext_cls = cpp_ext.CUDAExtension
    ext = ext_cls(
        name="llmkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], cpp_ext.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
