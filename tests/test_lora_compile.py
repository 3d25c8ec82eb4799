"""Compile the LoRA kernels for the GPU target (sm_90) without a GPU.

Triton ships ptxas, so `triton.compile(..., target=GPUTarget("cuda", 90, 32))` runs the whole
pipeline (TTIR -> TTGIR -> PTX -> cubin) on a CPU-only machine. That catches what the interpreter
cannot (type rules of the compiled frontend, layouts, shared-memory budgets) and reports each
kernel's registers, stack (spills) and shared memory. Runs in a subprocess: the tests import
Triton with TRITON_INTERPRET=1, under which kernels cannot be compiled.

    python tests/test_lora_compile.py [all]      # prints the resource table

The TMA GEMM (sm_90+) rows compile every candidate of `_GEMM_TMA_TILES` in the forward (W [N, K],
bias) and the backward (Wᵀ read as [K, N]; with the dropout epilogue where the prune keeps it)
shape; the descriptors are typed `tensordesc<bf16[rows, cols]>` with the config's box, and the SASS
must show the bulk tensor copy (UTMALDG) feeding the warp-group MMA (HGMMA), with no spill.
"""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
_DIV16 = {"M", "N", "K", "P"}
ROOT = os.path.dirname(os.path.dirname(HERE))


SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (opt-in maximum)


def _tma_box(name, consts):
    """The box of a TMA GEMM descriptor argument: the tile the config loads."""
    bm, bn, bk = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]
    if name == "desc_x":
        return [bm, bk]
    return [bk, bn] if consts["W_T"] else [bn, bk]


def _compile(fn, types, consts, num_warps, num_stages, cc=90, sass=True):
    """Compile fn for sm_<cc>; its registers, stack and shared memory, the warp-group MMA in the TTGIR, and
    (sass=True) facts from the disassembly. sass=False skips nvdisasm (about 0.3 s a kernel, most of a
    compile test's time once Triton's cache holds the cubin): utmaldg / hgmma / ldg128 / stg128 are None."""
    return _resources(_build(fn, types, consts, num_warps, num_stages, cc), sass)


def compile_many(jobs, workers=2):
    """[_compile(*job) for job in jobs], each job (fn, types, consts, num_warps, num_stages, cc, sass). The
    kernels compile one after another here; their cubins are read back (cuobjdump / nvdisasm: most of the time
    once Triton's cache holds the cubins) `workers` at a time meanwhile: the same work, on both cores."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_resources, _build(fn, types, consts, warps, stages, cc), sass)
                   for fn, types, consts, warps, stages, cc, sass in jobs]
        return [f.result() for f in futures]


def _build(fn, types, consts, num_warps, num_stages, cc=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.startswith("desc_") and consts.get("USE_TMA"):
            rows, cols = _tma_box(name, consts)
            sig[name] = f"tensordesc<{types['X'][1:]}[{rows}, {cols}]>"
        else:
            sig[name] = types.get(name, "i32")
            # what a launch with realistic sizes specialises: 16-aligned pointers, and strides and
            # M / N / K / P divisible by 16
            if sig[name].startswith("*") or name in _DIV16 or (name.startswith("s") and sig[name] == "i32"
                                                               and name not in ("split",)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _resources(k, sass=True):
    """The resource facts of compiled kernel k (see _compile)."""
    import triton

    regs = stack = None
    text = ""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        if sass:
            text = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+)", out)
        regs = int(m.group(1)) if m else None
        m = re.search(r"STACK:(\d+)", out)
        stack = int(m.group(1)) if m else None
    ttgir = k.asm.get("ttgir", "")
    facts = {key: (op in text if sass else None) for key, op in (("utmaldg", "UTMALDG"), ("hgmma", "HGMMA"),
                                                                 ("ldg128", "LDG.E.128"), ("stg128", "STG.E.128"))}
    return dict(regs=regs, stack=stack, smem=k.metadata.shared, wgmma="warp_group_dot" in ttgir, **facts)


def main(everything=False):
    from llmkern.kernels import lora as L

    dt = "bf16"
    shrink_t = dict(X=f"*{dt}", A=f"*{dt}", OUT="*fp32", ROWS="*i32", IDS="*i32", SCALES="*fp32", scale="fp64",
                    SEED="*i32", inv_keep="fp64")
    gemm_t = dict(X=f"*{dt}", W=f"*{dt}", BIAS=f"*{dt}", XS="*fp32", LB=f"*{dt}", OUT=f"*{dt}", IDS="*i32", desc_x=f"*{dt}", desc_w=f"*{dt}", SEED="*i32", inv_keep="fp64")
    reduce_t = dict(Y=f"*{dt}", Z="*fp32", OUT="*fp32", ROWS="*i32", SEG="*i32", SEED="*i32", inv_keep="fp64")
    gemm_fwd = dict(sxk=1, swk=1, sxs_r=1, slb_r=1, son=1, PRECISION="tf32", GROUP_M=8, USE_TMA=False, W_T=False,
                    W_NF4=False, QBLOCK=1, NESTED=False)
    gemm_bwd = dict(sxk=1, swn=1, sxs_r=1, slb_n=1, son=1, PRECISION="tf32", GROUP_M=8, USE_TMA=False, W_T=False,
                    W_NF4=False, QBLOCK=1, NESTED=False)
    # QLoRA: W as 4-bit NF4 codes, dequantized in the main loop (forward W, backward Wᵀ)
    nf4_t = dict(gemm_t, W="*u8", WQ_ABSMAX="*fp32", WQ_PAIRS="*i64", WQ_STATE2="*fp32")
    rows = [
        ("gemm fwd 128x256", L._gemm_kernel, gemm_t,
         dict(gemm_fwd, HAS_BIAS=True, HAS_IDS=False, EPI_DROPOUT=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64,
              BLOCK_R=16), 8, 3),
        ("gemm bwd dx dropout", L._gemm_kernel, gemm_t,
         dict(gemm_bwd, HAS_BIAS=False, HAS_IDS=False, EPI_DROPOUT=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
              BLOCK_R=32), 8, 3),
        # a GPT-2 Conv1D weight ([in, out] read as its transposed view: W's unit stride along N, as the backward's)
        ("gemm fwd conv1d weight", L._gemm_kernel, gemm_t,
         dict(gemm_bwd, HAS_BIAS=True, HAS_IDS=False, EPI_DROPOUT=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64,
              BLOCK_R=16), 8, 3),
        ("shrink fwd dropout", L._shrink_kernel, shrink_t,
         dict(sxk=1, sa_k=1, sor=1, HAS_IDS=False, DROPOUT=True, BLOCK_M=64, BLOCK_K=128, BLOCK_R=16,
              PRECISION="tf32"), 4, 3),
        ("reduce dA multi dropout", L._reduce_kernel, reduce_t,
         dict(syp=1, szr=1, so_r=1, HAS_IDS=True, DROPOUT=True, BLOCK_M=64, BLOCK_P=128, BLOCK_R=64,
              PRECISION="tf32"), 4, 3),
    ]
    for bm, bn, bk, w, st in L._GEMM_NF4_TILES:  # every NF4 candidate (blocksize 64), forward and backward
        tile = dict(W_NF4=True, QBLOCK=64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        rows += [(f"gemm nf4 fwd {bm}x{bn}", L._gemm_kernel, nf4_t,
                  dict(gemm_fwd, **tile, HAS_BIAS=True, HAS_IDS=False, EPI_DROPOUT=False, BLOCK_R=16), w, st),
                 (f"gemm nf4 bwd {bm}x{bn} drop", L._gemm_kernel, nf4_t,
                  dict(gemm_bwd, **tile, W_T=True, HAS_BIAS=False, HAS_IDS=False, EPI_DROPOUT=True, BLOCK_R=32),
                  w, st)]
    # double quantization (8-bit absmax decoded in the main loop), on the largest tile
    rows.append(("gemm nf4 fwd 128x128 dq", L._gemm_kernel, dict(nf4_t, WQ_ABSMAX="*u8"),
                 dict(gemm_fwd, W_NF4=True, NESTED=True, QBLOCK=64, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                      HAS_BIAS=True, HAS_IDS=False, EPI_DROPOUT=False, BLOCK_R=16), 8, 3))
    bm, bn, bk, w, s = L._FIXED_GPU_TMA_TILE
    rows.append(("gemm tma fwd multi", L._gemm_kernel, gemm_t,  # rows in place: the TMA main loop
                 dict(gemm_fwd, USE_TMA=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=True, HAS_IDS=True,
                      EPI_DROPOUT=False, BLOCK_R=16), w, s))
    if everything:
        rows += [
            ("gemm fwd multi", L._gemm_kernel, gemm_t,
             dict(gemm_fwd, HAS_BIAS=True, HAS_IDS=True, EPI_DROPOUT=False, BLOCK_M=128, BLOCK_N=128,
                  BLOCK_K=64, BLOCK_R=16), 8, 3),
            ("shrink dy multi (B^T)", L._shrink_kernel, shrink_t,
             dict(sxk=1, sa_r=1, sor=1, HAS_IDS=True, DROPOUT=False, BLOCK_M=32, BLOCK_K=128, BLOCK_R=64,
                  PRECISION="tf32"), 4, 4),
            ("reduce dB", L._reduce_kernel, reduce_t,
             dict(syp=1, szr=1, so_r=1, HAS_IDS=False, DROPOUT=False, BLOCK_M=128, BLOCK_P=128, BLOCK_R=16,
                  PRECISION="tf32"), 8, 3),
        ]
    for bm, bn, bk, w, s in L._GEMM_TMA_TILES:  # every TMA candidate: the autotuner may pick any
        tile = dict(USE_TMA=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        drop = L._fits_dropout_epilogue(bm, bn, w)  # the dropout backward runs only these tiles
        rows += [(f"gemm tma fwd {bm}x{bn}", L._gemm_kernel, gemm_t,
                  dict(gemm_fwd, **tile, HAS_BIAS=True, HAS_IDS=False, EPI_DROPOUT=False, BLOCK_R=16), w, s),
                 (f"gemm tma bwd {bm}x{bn}" + (" drop" if drop else ""), L._gemm_kernel, gemm_t,
                  dict(gemm_bwd, **tile, W_T=True, HAS_BIAS=False, HAS_IDS=False, EPI_DROPOUT=drop, BLOCK_R=32),
                  w, s)]
    # SASS facts are checked on the TMA rows only (bulk tensor copies feeding the MMA)
    results = compile_many([(fn, types, consts, w, s, 90, bool(consts.get("USE_TMA")))
                            for _, fn, types, consts, w, s in rows])
    for (name, fn, types, consts, w, s), r in zip(rows, results):
        tma = f" utmaldg={r['utmaldg']} hgmma={r['hgmma']}" if consts.get("USE_TMA") else ""
        print(f"{name:26s} sm_90 {dt} warps={w} stages={s}: regs={r['regs']} stack={r['stack']} "
              f"smem={r['smem']} wgmma={r['wgmma']}{tma}", flush=True)
    print("COMPILED-ALL")


def _ptxas_available():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def compiled_table(script, args=(), timeout=300):
    """Run a compile script (`python script [args]` outside the interpreter: TRITON_INTERPRET unset) and
    return its printed table, one line per kernel (the closing COMPILED-ALL line dropped); fails the test
    on an error or a missing COMPILED-ALL."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=timeout)
    assert res.returncode == 0 and "COMPILED-ALL" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
    return [line for line in res.stdout.splitlines() if line != "COMPILED-ALL"]


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_lora_kernels_compile_for_sm90():
    from llmkern.kernels.lora import _GEMM_TMA_TILES

    lines = compiled_table(HERE, ["all"] if os.environ.get("LLMKERN_COMPILE_ALL") == "1" else [])
    fwd = next(line for line in lines if line.startswith("gemm fwd 128x256"))
    assert "wgmma=True" in fwd, fwd  # Hopper's warp-group MMA in the main GEMM
    tma = [line for line in lines if line.startswith("gemm tma")]
    assert len(tma) == 2 * len(_GEMM_TMA_TILES) + 1, tma
    for line in tma:  # bulk tensor copies feeding the warp-group MMA, and no spills at all
        assert "wgmma=True utmaldg=True hgmma=True" in line and "stack=0 " in line, line
    for line in lines:
        m = re.search(r"stack=(\d+)", line)
        assert m is None or int(m.group(1)) <= 256, f"heavy register spills: {line}"
        m = re.search(r"smem=(\d+)", line)
        assert m is None or int(m.group(1)) <= SMEM_LIMIT, f"does not fit in shared memory: {line}"


if __name__ == "__main__":
    main(everything=len(sys.argv) > 1 and sys.argv[1] == "all")
