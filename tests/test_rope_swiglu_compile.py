"""Compile the RoPE and SwiGLU/GeGLU kernels for sm_90 (bf16) and sm_80 (fp16) without a GPU (Triton's
bundled ptxas), as tests/test_cross_entropy_compile.py does: catches what the interpreter cannot
(module globals a compiled kernel may not read, constexpr rules, layouts), checks that nothing spills
and that the contiguous loads and stores are 16-byte vectors (LDG.E.128 / STG.E.128).

The signatures are those of a real launch: channel / column strides of 1 are constexpr (Triton
specialises an int argument equal to 1), other strides and the sizes HALF, R, D, F divisible by 16.

    python tests/test_rope_swiglu_compile.py      # prints the resource table
"""
import os

import pytest

import test_lora_compile
from test_lora_compile import _ptxas_available, compile_many, compiled_table

HERE = os.path.abspath(__file__)


def _rope_rows():
    from llmkern.kernels import rope as K

    from llmkern.kernels._common import next_power_of_2

    def launch(R, D, tokens=8192):  # what rope_apply picks for 32 q heads, 8 k heads of head_dim D
        block_pass = next_power_of_2(D - R) if R < D else 0
        bq, bk, bh, warps = K.config(32, 8, R // 2, tokens, block_pass)
        return dict(sq_d=1, sk_d=1, sqo_d=1, sko_d=1, sc_d=1, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=bh,
                    HAS_PASS=R < D, BLOCK_PASS=max(block_pass, 1)), warps

    base, w = launch(128, 128)
    partial, pw = launch(32, 128)  # R = 32 of 128 (GPT-NeoX): the pass-through block counts for the warps
    return [("rope fwd", K._rope, dict(base, INTERLEAVED=False, TRANSPOSE=False), w),
            ("rope bwd", K._rope, dict(base, INTERLEAVED=False, TRANSPOSE=True), w),
            ("rope interleaved fwd", K._rope, dict(base, INTERLEAVED=True, TRANSPOSE=False), w),
            ("rope partial bwd", K._rope, dict(partial, INTERLEAVED=False, TRANSPOSE=True), pw)]


def _glu_rows():
    from llmkern.kernels import swiglu as K

    unit = dict(sg_f=1, su_f=1, sd_f=1)
    rows = []
    for act, code in K.ACTS.items():
        rows.append((f"glu fwd {act}", K._glu_fwd, dict(unit, ACT=code, BLOCK=2048), 8))
        rows.append((f"glu bwd {act}", K._glu_bwd, dict(unit, ACT=code, BLOCK=2048), 8))
    return rows


def main():
    test_lora_compile._DIV16 = test_lora_compile._DIV16 | {"HALF", "R", "D", "F"}  # realistic sizes
    table = []  # (label, compile job)
    for cc, dt in ((90, "bf16"), (80, "fp16")):
        types = {n: f"*{dt}" for n in ("Q", "K", "QO", "KO", "COS", "SIN", "G", "U", "O", "DO", "DG", "DU")}
        for name, fn, consts, warps in _rope_rows() + _glu_rows():
            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
            table.append((f"{name:22s} sm_{cc} {dt} warps={warps}", (fn, types, consts, warps, 1, cc, True)))
    for (label, _), r in zip(table, compile_many([job for _, job in table])):
        print(f"{label}: regs={r['regs']} stack={r['stack']} ldg128={r['ldg128']} stg128={r['stg128']}", flush=True)
    print("COMPILED-ALL")


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_rope_swiglu_kernels_compile():
    lines = compiled_table(HERE)
    assert len(lines) == 2 * 10, lines
    for line in lines:
        assert "stack=0 " in line, f"register spills: {line}"
        assert "ldg128=True stg128=True" in line, f"no 16-byte vectors: {line}"
        if line.startswith("rope"):  # at most 32 elements per thread (the partial row had 160 on 1 warp: 134)
            assert int(line.split("regs=")[1].split()[0]) <= 96, f"too few warps for the tile: {line}"


if __name__ == "__main__":
    main()
