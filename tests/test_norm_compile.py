"""Compile the RMSNorm / LayerNorm kernels for sm_90 (bf16) and sm_80 (fp16) without a GPU (Triton's
bundled ptxas), at Llama's hidden sizes 4096 and 8192 with the launchers' GPU configuration: catches
what the interpreter cannot (module globals a compiled kernel may not read, layouts) and checks that
the whole row held in registers does not spill, and that rows move in 16-byte vectors.

    python tests/test_norm_compile.py      # prints the resource table
"""
import os

import pytest

from test_lora_compile import _ptxas_available, compile_many, compiled_table

HERE = os.path.abspath(__file__)


def main():
    from llmkern.kernels import norm as K

    rows = [("rms fwd residual", K._norm_fwd, dict(IS_RMS=True, HAS_W=True, HAS_B=False, HAS_RES=True, CAST_XN=True)),
            ("ln fwd bias residual", K._norm_fwd, dict(IS_RMS=False, HAS_W=True, HAS_B=True, HAS_RES=True,
                                                        CAST_XN=False)),
            ("rms bwd ds dw", K._norm_bwd, dict(IS_RMS=True, HAS_W=True, HAS_DS=True, NEED_DW=True, NEED_DB=False,
                                                CAST_XN=True)),
            ("ln bwd ds dw db", K._norm_bwd, dict(IS_RMS=False, HAS_W=True, HAS_DS=True, NEED_DW=True, NEED_DB=True,
                                                  CAST_XN=False))]
    table = []  # (label, compile job)
    for cc, dt in ((90, "bf16"), (80, "fp16")):
        types = {name: f"*{dt}" for name in ("X", "R", "W", "B", "Y", "S", "DY", "DS", "DX")}
        types.update(MEAN="*fp32", RSTD="*fp32", DWP="*fp32", DBP="*fp32", eps="fp32", offset="fp32")
        for N in (4096, 8192):
            bm, bn, nw = K.config(N)
            for name, fn, consts in rows:
                table.append((f"{name:22s} sm_{cc} {dt} N={N} warps={nw}",
                              (fn, types, dict(consts, BLOCK_M=bm, BLOCK_N=bn), nw, 1, cc, True)))
    for (label, _), r in zip(table, compile_many([job for _, job in table])):
        print(f"{label}: regs={r['regs']} stack={r['stack']} ldg128={r['ldg128']} stg128={r['stg128']}", flush=True)
    print("COMPILED-ALL")


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_norm_kernels_compile():
    lines = compiled_table(HERE)
    assert len(lines) == 16, "\n".join(lines)
    for line in lines:
        assert "stack=0 " in line, f"register spills: {line}"
        assert "ldg128=True stg128=True" in line, f"rows not moved in 16-byte vectors: {line}"


if __name__ == "__main__":
    main()
