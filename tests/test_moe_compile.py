"""Compile the Mixture-of-Experts kernels for sm_90 without a GPU (Triton's bundled ptxas), as
tests/test_lora_compile.py does: every autotuning candidate of every kernel, in each of its uses
(the gate-up GEMM saving h; the sorted GEMM as the forward down projection (B = w_down, K-contiguous)
and as the backward's dx (B = w_gate_up's [d, 2F] view, N-contiguous); the weight-gradient
reduction for dw_down (dy gathered and scaled, a recomputed from h) and dw_gate_up (dh, x gathered)),
in bf16, with the experts' tile scan sized for 256 experts (one row for 1024). The kernels with the
activation in their epilogue (gate_up, gate_up_bwd, wgrad dw_down) compile with silu and again with the
exact erf gelu ("geglu_exact": tl.math.erf, libdevice's erff; its derivative adds an exp). Checks what the
interpreter cannot (the compiled frontend's type rules, layouts, shared memory) and that nothing
spills.

The signatures are those of a real launch: contiguous operands' unit strides constexpr, other strides
and the sizes F, K, N, P, R divisible by 16 (d = 2048, F = 1408 or 14336, ...).

float32 (`main_fp32`, its own test): with input_precision "ieee" (no TF32) tl.dot has no tensor-core MMA
and the kernels take moe.configs_for(name, "ieee"), whose first candidate is LLMKERN_MOE_AUTOTUNE=0's
choice; every one of those (in its heaviest use; the fixed one in every use) compiles for sm_80 (the fixed one
also for sm_90) with at most 256 bytes of stack and within the target's shared memory.

    python tests/test_moe_compile.py        # prints the resource table
    python tests/test_moe_compile.py fp32   # the float32 "ieee" table, sm_80 and sm_90
    python tests/test_moe_compile.py both   # both, the float32 one after a "== fp32" line (what the tests run)
"""
import os
import re

import pytest

import test_lora_compile
from test_lora_compile import SMEM_LIMIT, _compile, _ptxas_available, compiled_table

HERE = os.path.abspath(__file__)
BLOCK_E = 256


def _mnk(tile):
    bm, bn, bk, w, s = tile
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, s


def _rows():
    from llmkern.kernels import moe as K

    rows = _tile_rows(K)
    c, w, s = _mnk(K.GATE_UP_TILES[1])
    rows.append(("gate_up E=1024 128x128x64", K._gate_up_kernel,
                 dict(c, PRECISION="tf32", BLOCK_E=1024, sw_k=1, ACT=0, SAVE_H=True), w, s))
    rows.append(("combine 1024", K._combine_kernel, dict(HAS_W=True, BLOCK=1024), 4, 1))
    return rows + _erf_rows(rows)


def _erf_rows(rows):
    """The tile rows of the kernels with an activation (silu there) again with the exact gelu, "... gelu"."""
    from llmkern.kernels.swiglu import ACTS

    return [(f"{name} gelu", fn, dict(consts, ACT=ACTS["gelu"]), w, s) for name, fn, consts, w, s in rows
            if "ACT" in consts and "dw_gate_up" not in name and "E=1024" not in name]


def _tile_rows(K):
    common = dict(PRECISION="tf32", BLOCK_E=BLOCK_E)
    rows = []
    for t in K.GATE_UP_TILES:
        c, w, s = _mnk(t)
        rows.append((f"gate_up {t[0]}x{t[1]}x{t[2]}", K._gate_up_kernel, dict(c, **common, sw_k=1, ACT=0, SAVE_H=True),
                     w, s))
    for t in K.GEMM_TILES:
        c, w, s = _mnk(t)
        rows.append((f"down {t[0]}x{t[1]}x{t[2]}", K._sorted_gemm_kernel, dict(c, **common, sb_k=1), w, s))
        rows.append((f"dx {t[0]}x{t[1]}x{t[2]}", K._sorted_gemm_kernel, dict(c, **common, sb_n=1), w, s))
    for t in K.GATE_UP_BWD_TILES:
        c, w, s = _mnk(t)
        rows.append((f"gate_up_bwd {t[0]}x{t[1]}x{t[2]}", K._gate_up_bwd_kernel,
                     dict(c, **common, sw_n=1, ACT=0, SLOT_N=K.GPU_SLOT_N), w, s))
    for bp, br, bm, w, s in K.WGRAD_TILES:
        c = dict(BLOCK_P=bp, BLOCK_R=br, BLOCK_M=bm, PRECISION="tf32", ACT=0)
        rows.append((f"wgrad dw_down {bp}x{br}x{bm}", K._wgrad_kernel, dict(c, Y_TOKEN=True, Z_TOKEN=False), w, s))
        rows.append((f"wgrad dw_gate_up {bp}x{br}x{bm}", K._wgrad_kernel, dict(c, Y_TOKEN=False, Z_TOKEN=True), w, s))
    return rows


SMEM_LIMITS = {90: SMEM_LIMIT, 80: 166912}  # bytes of shared memory one block may use (opt-in maximum)
_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_PRM = ("BLOCK_P", "BLOCK_R", "BLOCK_M")


def _fp32_rows(fixed_only=False):
    """Every float32 "ieee" candidate of each kernel, silu, in its heaviest use (the sorted GEMM as the down
    projection, the weight gradient as dw_down: the most registers), and the fixed choice (the first, named
    "fixed") in the other uses too (dx, dw_gate_up); fixed_only: the fixed choice only (sm_90, where the old
    tiles spilled little: the A100 is the target that shows the spills). About 1 s of compile each."""
    from llmkern.kernels import moe as K

    common = dict(PRECISION="ieee", BLOCK_E=BLOCK_E)
    uses = {"gate_up": [("gate_up", K._gate_up_kernel, dict(common, sw_k=1, ACT=0, SAVE_H=True))],
            "gemm": [("down", K._sorted_gemm_kernel, dict(common, sb_k=1)),
                     ("dx", K._sorted_gemm_kernel, dict(common, sb_n=1))],
            "gate_up_bwd": [("gate_up_bwd", K._gate_up_bwd_kernel,
                             dict(common, sw_n=1, ACT=0, SLOT_N=K.GPU_SLOT_N))],
            "wgrad": [("wgrad dw_down", K._wgrad_kernel, dict(PRECISION="ieee", ACT=0, Y_TOKEN=True, Z_TOKEN=False)),
                      ("wgrad dw_gate_up", K._wgrad_kernel,
                       dict(PRECISION="ieee", ACT=0, Y_TOKEN=False, Z_TOKEN=True))]}
    rows = []
    for name, kernel_uses in uses.items():
        for i, c in enumerate(K.configs_for(name, "ieee")[:1 if fixed_only else None]):
            tile = "x".join(str(c.kwargs[d]) for d in (_PRM if name == "wgrad" else _MNK))
            for use, fn, consts in kernel_uses[:None if i == 0 else 1]:
                rows.append((f"{use} {tile}{' fixed' if i == 0 else ''}", fn, dict(c.kwargs, **consts),
                             c.num_warps, c.num_stages))
    return rows


def main_fp32():
    test_lora_compile._DIV16 = test_lora_compile._DIV16 | {"F", "R"}
    types = {n: "*fp32" for n in ("X", "W", "A", "H", "IN", "B", "OUT", "DY", "WD", "DH", "Y", "Z", "O")}
    types.update(ORDER="*i32", SEG="*i32", IDS="*i32", TW="*fp32", DWP="*fp32")
    for cc in (80, 90):
        for name, fn, consts, warps, stages in _fp32_rows(fixed_only=cc == 90):
            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
            r = _compile(fn, types, consts, warps, stages, cc=cc, sass=False)  # (no SASS facts checked)
            print(f"{name:37s} sm_{cc} fp32 ieee warps={warps} stages={stages}: regs={r['regs']} stack={r['stack']} "
                  f"smem={r['smem']}", flush=True)
    print("COMPILED-ALL")


def main():
    test_lora_compile._DIV16 = test_lora_compile._DIV16 | {"F", "R"}
    dt = "bf16"
    types = {n: f"*{dt}" for n in ("X", "W", "A", "H", "IN", "B", "OUT", "DY", "WD", "DH", "Y", "Z", "O")}
    types.update(ORDER="*i32", SEG="*i32", IDS="*i32", TW="*fp32", DWP="*fp32")
    for name, fn, consts, warps, stages in _rows():
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        r = _compile(fn, types, consts, warps, stages, sass=False)  # (no SASS facts checked)
        print(f"{name:37s} sm_90 {dt} warps={warps} stages={stages}: regs={r['regs']} stack={r['stack']} "
              f"smem={r['smem']} wgmma={r['wgmma']}", flush=True)
    print("COMPILED-ALL")


@pytest.fixture(scope="module")
def tables():
    """{"bf16": the sm_90 table, "fp32": the float32 one}, from one subprocess (one llmkern import for both)."""
    lines = compiled_table(HERE, ["both"], timeout=1200)
    split = lines.index("== fp32")
    return {"bf16": lines[:split], "fp32": lines[split + 1:]}


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_moe_kernels_compile_for_sm90(tables):
    lines = tables["bf16"]
    from llmkern.kernels import moe as K

    with_act = len(K.GATE_UP_TILES) + len(K.GATE_UP_BWD_TILES) + len(K.WGRAD_TILES)  # each has a gelu copy
    want = len(K.GATE_UP_TILES) + 2 * len(K.GEMM_TILES) + len(K.GATE_UP_BWD_TILES) + 2 * len(K.WGRAD_TILES) + 2
    want += with_act
    assert len(lines) == want, lines
    assert sum(" gelu " in line for line in lines) == with_act, lines
    for line in lines:
        assert "stack=0 " in line, f"register spills: {line}"
        smem = int(line.split("smem=")[1].split()[0])
        assert smem <= SMEM_LIMIT, f"does not fit in shared memory: {line}"
        # the warp-group MMA needs 64 rows per warp group in the dot (BLOCK_M; wgrad: BLOCK_P)
        tile = re.search(r" (\d+)x\d+x\d+ ", line)
        if tile and int(tile.group(1)) >= 64:
            assert "wgmma=True" in line, f"no warp-group MMA: {line}"


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_moe_float32_ieee_kernels_compile_for_sm80_and_sm90(tables):
    """float32 without TF32 (FMA dots): no heavy spill and within shared memory on the A100 and the H100, for
    the fixed choice (the first candidate, "fixed") and every autotuning candidate."""
    lines = tables["fp32"]
    want = [f"{name} sm_{cc}" for cc in (80, 90) for name, *_ in _fp32_rows(fixed_only=cc == 90)]
    assert [re.sub(r" +(sm_\d+) .*", r" \1", line) for line in lines] == want, "\n".join(lines)
    assert sum(" fixed " in line for line in lines) == 2 * 6, lines  # the six uses, per target
    for line in lines:
        stack = int(re.search(r"stack=(\d+)", line).group(1))
        assert stack <= 256, f"heavy register spills: {line}"
        smem = int(re.search(r"smem=(\d+)", line).group(1))
        assert smem <= SMEM_LIMITS[int(re.search(r" sm_(\d+) ", line).group(1))], f"over shared memory: {line}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["fp32"]:
        main_fp32()
    elif sys.argv[1:] == ["both"]:
        main()
        print("== fp32", flush=True)
        main_fp32()
    else:
        main()
