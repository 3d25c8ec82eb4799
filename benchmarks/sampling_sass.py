"""Static look at the CUDA sampler on a machine without a GPU: registers, spills and the SASS of the
first pass over the row (the max / level-1 histogram loop of `sample_kernel`).

    python benchmarks/sampling_sass.py [sm_90|sm_80] [f32|f16|bf16]

Compiles csrc/cuda/sampling.cu with the extension's nvcc flags (-O3 --use_fast_math) for one target,
disassembles it with the cuobjdump that ships with Triton, and prints, for every kernel, registers
and spill bytes (ptxas -v); for `sample_kernel` of the chosen dtype, the instruction count of the
loops over the row (one lane step = 8 elements for fp32 and 16-bit logits alike; loop 0 and 1 are
the first pass, max and level-1 histogram, for general and plain rows) and how many 16-byte loads a
step issues before their first use. The count is static (both
sides of every branch), so it bounds the work per element from above; the kernel's time at
B=256 is set by such counts, not by HBM bandwidth, when the loops are instruction-bound.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"f32": 0, "f16": 1, "bf16": 2}


def _tools():
    import torch.utils.cpp_extension as ext
    import triton

    nvcc = os.path.join(ext.CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    includes = [f"-I{p}" for p in ext.include_paths(device_type="cuda")]
    return nvcc, cuobjdump, includes


def compile_and_dump(arch):
    nvcc, cuobjdump, includes = _tools()
    obj = os.path.join(tempfile.mkdtemp(), "sampling.o")
    cmd = [nvcc, "-O3", "--use_fast_math", "-std=c++17", f"-arch={arch}", f"-I{ROOT}/csrc", *includes,
           "-Xptxas", "-v", "-c", f"{ROOT}/csrc/cuda/sampling.cu", "-o", obj]
    ptxas = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    return ptxas, sass


def kernel_resources(ptxas):
    """{mangled name: (registers, spill store bytes, spill load bytes)}"""
    out, name, spill = {}, None, (0, 0)
    for line in ptxas.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = (int(m.group(1)),) + spill
    return out


def row_loops(sass, dtype_code):
    """[(instructions, 16-byte loads before the first use, has a division, opcode counts)] of the
    innermost loops around sample_kernel<dtype>'s 16-byte loads, in code order. Each pass over
    the row comes twice since the seventh session: the general loop (bias, mask, temperature
    division: MUFU.RCP) and the plain one for rows with none of them."""
    funcs = re.split(r"\n\s*Function : ", sass)
    body = next(f for f in funcs[1:] if f"sample_kernelILNS_5DTypeE{dtype_code}" in f.split("\n", 1)[0])
    lines = [ln for ln in body.split("\n") if re.search(r"/\*[0-9a-f]+\*/\s+\S", ln)]
    addr = [int(re.search(r"/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    back = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA[^;]*?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i] and int(m.group(1), 16) in addr:
            back.append((addr.index(int(m.group(1), 16)), i))
    out, seen = [], set()
    for first in (i for i, ln in enumerate(lines) if "LDG.E.128" in ln):
        around = [(j, i) for j, i in back if j <= first <= i]
        if not around:
            continue
        j, i = min(around, key=lambda t: t[1] - t[0])
        if (j, i) in seen:
            continue
        seen.add((j, i))
        seg = lines[j:i + 1]
        ops = collections.Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", x).group(1) for x in seg)
        ahead = 0
        for x in lines[first:i + 1]:  # 16-byte loads issued before the first floating-point use
            if "LDG.E.128" in x:
                ahead += 1
            elif re.search(r"\b(FADD|FSEL|FMUL|FFMA|MUFU)\b", x):
                break
        out.append((len(seg), ahead, ops["MUFU"] > 0, ops))
    return out


def main():
    arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
    dt = sys.argv[2] if len(sys.argv) > 2 else "f32"
    ptxas, sass = compile_and_dump(arch)
    for name, (regs, st, ld) in sorted(kernel_resources(ptxas).items()):
        short = re.sub(r".*_sampling_cu_[0-9a-f]{8}\d+", "", name)
        print(f"{arch} {short[-60:]:60s} registers {regs:3d}  spill stores {st:3d} B  loads {ld:3d} B")
    print(f"\nsample_kernel<{dt}>: loops over the row (static SASS instructions per lane step of 8 elements)")
    for k, (n, ahead, general, ops) in enumerate(row_loops(sass, DTYPES[dt])):
        print(f"  loop {k:2d} {'general' if general else 'plain  '} {n:5d} ({n / 8:5.1f} per element), "
              f"{ahead} 16-byte load(s) in flight before the first use; "
              + ", ".join(f"{o} {c}" for o, c in ops.most_common(6)))


if __name__ == "__main__":
    main()
