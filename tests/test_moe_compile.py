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

    python tests/test_moe_compile.py        # prints the resource table
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


def main():
    test_lora_compile._DIV16 = test_lora_compile._DIV16 | {"F", "R"}
    dt = "bf16"
    types = {n: f"*{dt}" for n in ("X", "W", "A", "H", "IN", "B", "OUT", "DY", "WD", "DH", "Y", "Z", "O")}
    types.update(ORDER="*i32", SEG="*i32", IDS="*i32", TW="*fp32", DWP="*fp32")
    for name, fn, consts, warps, stages in _rows():
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        r = _compile(fn, types, consts, warps, stages)
        print(f"{name:37s} sm_90 {dt} warps={warps} stages={stages}: regs={r['regs']} stack={r['stack']} "
              f"smem={r['smem']} wgmma={r['wgmma']}", flush=True)
    print("COMPILED-ALL")


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_moe_kernels_compile_for_sm90():
    lines = compiled_table(HERE, timeout=600)
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


if __name__ == "__main__":
    main()
