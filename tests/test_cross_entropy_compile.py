"""Compile the cross-entropy kernels for sm_90 and sm_80 without a GPU (Triton's bundled ptxas),
as tests/test_lora_compile.py does for LoRA: catches what the interpreter cannot (module globals
a compiled kernel may not read, layouts) and checks that the whole chunks of a row move in
16-byte vectors (LDG.E.128 / STG.E.128) when the launcher claims alignment.

    python tests/test_cross_entropy_compile.py      # prints the resource table
"""
import os

import pytest

from test_lora_compile import _compile, _ptxas_available, compiled_table

HERE = os.path.abspath(__file__)


def main():
    from llmkern.kernels import cross_entropy as C

    types = dict(X="*bf16", DX="*bf16", LABELS="*i64", LOSS="*fp32", LSE="*fp32", BAD="*i32", DOUT="*fp32",
                 NVALID="*i64", sc_in="fp32", sc_out="fp32", eps="fp32", target="fp32", uniform="fp32", z2="fp32")
    rows = [("fwd aligned", C._ce_fwd, dict(HAS_SOFTCAP=False, SMOOTH=False, ALIGNED=True)),
            ("fwd softcap unaligned", C._ce_fwd, dict(HAS_SOFTCAP=True, SMOOTH=False, ALIGNED=False)),
            ("fwd smoothing aligned", C._ce_fwd, dict(HAS_SOFTCAP=False, SMOOTH=True, ALIGNED=True)),
            ("fwd smoothing softcap", C._ce_fwd, dict(HAS_SOFTCAP=True, SMOOTH=True, ALIGNED=False)),
            ("bwd aligned mean", C._ce_bwd, dict(HAS_SOFTCAP=False, MEAN=True, ALIGNED=True)),
            ("bwd softcap unaligned", C._ce_bwd, dict(HAS_SOFTCAP=True, MEAN=False, ALIGNED=False))]
    for cc in (90, 80):
        for name, fn, consts in rows:
            r = _compile(fn, types, dict(consts, BLOCK_V=4096, VEC=8), 8, 3, cc=cc)
            print(f"{name:24s} sm_{cc}: regs={r['regs']} stack={r['stack']} ldg128={r['ldg128']} "
                  f"stg128={r['stg128']}", flush=True)
    print("COMPILED-ALL")


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_cross_entropy_kernels_compile():
    lines = compiled_table(HERE)
    for line in lines:
        assert "stack=0 " in line or "stack=8 " in line, f"register spills: {line}"
        if "fwd aligned" in line:
            assert "ldg128=True" in line, line
        if "bwd aligned" in line:
            assert "ldg128=True stg128=True" in line, line


if __name__ == "__main__":
    main()
