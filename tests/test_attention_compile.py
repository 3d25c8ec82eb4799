"""Compile the attention kernels for the GPU targets (sm_90 bf16, sm_80 fp16) without a GPU.

Triton ships ptxas, so `triton.compile(..., target=GPUTarget("cuda", cc, 32))` runs the whole
pipeline (TTIR -> TTGIR -> PTX -> cubin) on a CPU-only machine. This catches what the interpreter
cannot (type rules of the compiled frontend, layouts, shared-memory budgets) and reports each
kernel's registers, stack (spills) and shared memory. It runs in a subprocess because the tests
import Triton with TRITON_INTERPRET=1, under which kernels cannot be compiled.

    python tests/test_attention_compile.py [cc] [dtype] [head_dim[/head_dim_v] | mla] [all]    # the resource table

head_dim/head_dim_v (e.g. 192/128, DeepSeek MLA's prefill shape) compiles the kernels with a value head dim
different from the query/key one; "mla" compiles the latent-cache decode kernel (llmkern.mla_decode) at
DeepSeek-V3's 512 + 64 channels with the configs mla_config picks for 16, 32 and 128 packed rows.
"""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

_PTRS = {"Q", "K", "V", "O", "LSE", "KPM", "CU_Q", "CU_K", "DO", "DELTA", "DK", "DV", "DQ", "DLSE",
         "SEQLENS", "OP", "LP", "SEED", "BT", "SINKS", "ALIBI", "KV", "KPE", "KS", "VS", "KC", "VC"}
_F32_PTRS = {"LSE": "fp32", "DELTA": "fp32", "DLSE": "fp32", "KPM": "u8", "CU_Q": "i32", "CU_K": "i32",
             "SEQLENS": "i32", "OP": "fp32", "LP": "fp32", "SEED": "i32", "BT": "i32", "SINKS": "fp32",
             "ALIBI": "fp32", "KS": "fp32", "VS": "fp32"}
_FLOATS = {"qk_scale", "sc_in", "sc_out", "scale", "drop_scale"}


def _compile(fn, dtype, consts, cc, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.startswith("desc_") and consts.get("USE_TMA", True):  # host descriptor [B, heads, T, D]
            from llmkern.kernels.attention import _TMA_COLS, _TMA_ROWS

            rows, cols = consts[_TMA_ROWS[name]], consts.get(_TMA_COLS[name], consts["BLOCK_D"])
            sig[name] = f"tensordesc<{dtype}[1, 1, {rows}, {cols}]>"
        elif name in _PTRS or name.startswith("desc_"):
            sig[name] = "*" + _F32_PTRS.get(name, dtype)
            if consts.get("HAS_KV_SCALE") and name in ("K", "V", "KV", "KPE"):  # a float8 KV cache (sm_89+: e4m3)
                sig[name] = "*fp8e4nv" if cc >= 89 else "*fp8e5"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride") and not name.endswith(("lt", "lpt", "s")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    regs = stack = None
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bindir, "cuobjdump")
    if os.path.exists(cuobjdump):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+)", out)
        regs = int(m.group(1)) if m else None
        m = re.search(r"STACK:(\d+)", out)
        stack = int(m.group(1)) if m else None
    ttgir = k.asm.get("ttgir", "")
    return dict(regs=regs, stack=stack, smem=k.metadata.shared,
                wgmma="warp_group_dot" in ttgir, mma="mma" in ttgir)


SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (opt-in maximum)


def main(cc=90, dtype="bf16", D=128, every_config=False, Dv=None):
    """Compile each attention kernel for (cc, dtype, D, Dv = the value head dim, default D) with the
    configs the autotuner would try there (the first candidate of the head-dim bucket; every
    candidate with every_config)."""
    import triton

    from llmkern.kernels import attention as A
    from llmkern.kernels import attention_decode as DEC

    Dv = D if Dv is None else Dv
    BD, BDV = triton.next_power_of_2(D), triton.next_power_of_2(Dv)
    dims = dict(HEAD_DIM=D, BLOCK_D=BD, HEAD_DIM_V=Dv, BLOCK_DV=BDV)
    base = dict(dims, IS_VARLEN=False, HAS_KPM=False, HAS_SOFTCAP=False,
                PREC="tf32", USE_TMA=False, DROPOUT=False, HAS_SINKS=False, HAS_ALIBI=False)
    bucket = A._d_bucket(D, Dv)
    rows = []
    for kname, fn in [("fwd", A._attn_fwd), ("bwd dkdv", A._attn_bwd_dkdv), ("bwd dq", A._attn_bwd_dq)]:
        cands = A._CONFIGS[kname.split()[-1]][cc][bucket]
        for bm, bn, w, s in (cands if every_config else cands[:1]):
            rows.append((kname, fn, dict(base, BLOCK_M=bm, BLOCK_N=bn), w, s))
    if cc >= 90:  # the TMA variants (dense fp16/bf16 on sm_90+)
        tma = dict(base, USE_TMA=True)
        for kname, fn in [("fwd tma", A._attn_fwd_tma), ("bwd dkdv tma", A._attn_bwd_dkdv),
                          ("bwd dq tma", A._attn_bwd_dq)]:
            cands = A._CONFIGS[kname.split()[-2] + "_tma"][90][bucket]
            for bm, bn, w, s in (cands if every_config else cands[:1]):
                rows.append((kname, fn, dict(tma, BLOCK_M=bm, BLOCK_N=bn), w, s))
        bm, bn, w, s = A._CONFIGS["fwd_tma"][90][bucket][0]
        rows.append(("fwd tma kpm+softcap", A._attn_fwd_tma,
                     dict(tma, BLOCK_M=bm, BLOCK_N=bn, HAS_KPM=True, HAS_SOFTCAP=True), w, s))
        rows.append(("fwd tma dropout", A._attn_fwd_tma, dict(tma, BLOCK_M=bm, BLOCK_N=bn, DROPOUT=True), w, s))
        rows.append(("fwd tma sinks", A._attn_fwd_tma, dict(tma, BLOCK_M=bm, BLOCK_N=bn, HAS_SINKS=True), w, s))
        # ALiBi: a per-tile bias in every kernel that shares the inner loops (softcap first, as FlashAttention)
        rows.append(("fwd tma alibi+softcap", A._attn_fwd_tma,
                     dict(tma, BLOCK_M=bm, BLOCK_N=bn, HAS_ALIBI=True, HAS_SOFTCAP=True), w, s))
        for kname, fn in [("bwd dkdv tma", A._attn_bwd_dkdv), ("bwd dq tma", A._attn_bwd_dq)]:
            bm_, bn_, w_, s_ = A._CONFIGS[kname.split()[-2] + "_tma"][90][bucket][0]
            rows.append((kname + " alibi", fn, dict(tma, BLOCK_M=bm_, BLOCK_N=bn_, HAS_ALIBI=True), w_, s_))
    for kname, fn in [("fwd", A._attn_fwd), ("bwd dkdv", A._attn_bwd_dkdv), ("bwd dq", A._attn_bwd_dq)]:
        bm, bn, w, s = A._CONFIGS[kname.split()[-1]][cc][bucket][0]  # attention dropout (training)
        rows.append((kname + " dropout", fn, dict(base, BLOCK_M=bm, BLOCK_N=bn, DROPOUT=True), w, s))
        rows.append((kname + " alibi", fn, dict(base, BLOCK_M=bm, BLOCK_N=bn, HAS_ALIBI=True), w, s))
    bm, bn, w, s = A._CONFIGS["fwd"][cc][bucket][0]
    _, dec_bn, dec_w, dec_s = DEC._decode_config(max(D, Dv), 16)  # the split kernel's launch config
    rows += [
        ("fwd varlen+kpm+softcap", A._attn_fwd,
         dict(base, BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=True, HAS_KPM=True, HAS_SOFTCAP=True), w, s),
        # attention sinks (gpt-oss): the forward's softmax starts from the sink; the backward is unchanged
        ("fwd sinks", A._attn_fwd, dict(base, BLOCK_M=bm, BLOCK_N=bn, HAS_SINKS=True), w, s),
        ("fwd varlen+sinks+dropout", A._attn_fwd,
         dict(base, BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=True, HAS_SINKS=True, DROPOUT=True), w, s),
        ("fwd varlen+alibi", A._attn_fwd, dict(base, BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=True, HAS_ALIBI=True), w, s),
        ("bwd preprocess", A._attn_bwd_preprocess,  # rowsum(dO * O): Dv wide
         dict(HEAD_DIM=Dv, BLOCK_D=BDV, IS_VARLEN=False, HAS_DLSE=True, BLOCK_M=64), 4, 1),
        ("decode split", DEC._decode_split,
         dict(dims, HAS_SOFTCAP=False, PREC="tf32", PAGE=0, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=False, HAS_ALIBI=False, HAS_KV_SCALE=False), dec_w, dec_s),
        ("decode split paged", DEC._decode_split,
         dict(dims, HAS_SOFTCAP=False, PREC="tf32", PAGE=16, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=False, HAS_ALIBI=False, HAS_KV_SCALE=False), dec_w, dec_s),
        ("decode split padded", DEC._decode_split,  # a key padding mask (left-padded batches)
         dict(dims, HAS_SOFTCAP=False, PREC="tf32", PAGE=0, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=True, HAS_ALIBI=False, HAS_KV_SCALE=False), dec_w, dec_s),
        ("decode split alibi", DEC._decode_split,
         dict(dims, HAS_SOFTCAP=True, PREC="tf32", PAGE=0, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=False, HAS_ALIBI=True, HAS_KV_SCALE=False), dec_w, dec_s),
        ("decode split paged alibi", DEC._decode_split,
         dict(dims, HAS_SOFTCAP=False, PREC="tf32", PAGE=16, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=False, HAS_ALIBI=True, HAS_KV_SCALE=False), dec_w, dec_s),
        # a float8 KV cache (e4m3 on sm_90, e5m2 on sm_80), read as stored and widened in registers
        ("decode split fp8", DEC._decode_split,
         dict(dims, HAS_SOFTCAP=False, PREC="tf32", PAGE=0, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=False, HAS_ALIBI=False, HAS_KV_SCALE=True), dec_w, dec_s),
        ("decode split paged fp8", DEC._decode_split,
         dict(dims, HAS_SOFTCAP=True, PREC="tf32", PAGE=16, BLOCK_M=16, BLOCK_N=dec_bn,
              HAS_KPM=True, HAS_ALIBI=False, HAS_KV_SCALE=True), dec_w, dec_s),
        # appending the new k / v (attention_with_kvcache's k=, v=): dense and paged caches
        ("kv append", DEC._kv_append, dict(PAGED=False, BLOCK_D=BD, BLOCK_DV=BDV), 1, 1),
        ("kv append paged", DEC._kv_append, dict(PAGED=True, BLOCK_D=BD, BLOCK_DV=BDV), 1, 1),
        ("decode combine", DEC._decode_combine, dict(HEAD_DIM=Dv, BLOCK_D=BDV, BLOCK_S=16, HAS_SINKS=False), 4, 1),
        ("decode combine sinks", DEC._decode_combine, dict(HEAD_DIM=Dv, BLOCK_D=BDV, BLOCK_S=16, HAS_SINKS=True),
         4, 1),
    ]
    for name, fn, consts, w, s in rows:
        r = _compile(fn, dtype, consts, cc, w, s)
        blocks = " ".join(f"{k[6:]}={v}" for k, v in consts.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_S"))
        dim = f"D={D}" if Dv == D else f"D={D}/{Dv}"
        print(f"{name:24s} sm_{cc} {dtype} {dim} {blocks} warps={w} stages={s}: regs={r['regs']} "
              f"stack={r['stack']} smem={r['smem']} wgmma={r['wgmma']} mma={r['mma']}", flush=True)
    print("COMPILED-ALL")


def main_mla(cc=90, dtype="bf16"):
    """The MLA decode split kernel at Dv 512 + 64 rotary channels: contiguous, paged, and paged with a padding
    mask, for each packed-row count's config."""
    from llmkern.kernels import mla_decode as MLA

    for rows in (16, 32, 128):
        for page, kpm, fp8 in ((0, False, False), (16, False, False), (64, True, False), (0, False, True),
                               (16, True, True)):  # (fp8: a float8 latent cache, its own configs)
            bm, bn, w, s = MLA.mla_config(512, rows, fp8)
            consts = dict(DV=512, BLOCK_DV=512, DR=64, BLOCK_DR=64, PREC="tf32", PAGE=page, BLOCK_M=bm, BLOCK_N=bn,
                          HAS_KPM=kpm, HAS_KV_SCALE=fp8)
            r = _compile(MLA._mla_split, dtype, consts, cc, w, s)
            print(f"mla split rows={rows} page={page} kpm={kpm} fp8={fp8} sm_{cc} {dtype} M={bm} N={bn} warps={w} "
                  f"stages={s}: "
                  f"regs={r['regs']} stack={r['stack']} smem={r['smem']} wgmma={r['wgmma']} mma={r['mma']}", flush=True)
    print("COMPILED-ALL")


def main_targets(targets, every_config=False):
    """Each target's table (main / main_mla) in this one process, after a "== cc dtype D" header line: one
    interpreter start and llmkern import for all of them."""
    for cc, dtype, D in targets:
        print(f"== {cc} {dtype} {D}", flush=True)
        if D == "mla":
            main_mla(cc, dtype)
        else:
            d, _, dv = str(D).partition("/")
            main(cc, dtype, int(d), every_config=every_config, Dv=int(dv) if dv else None)


def _run_all(targets, every_config):
    """({(cc, dtype, D): that target's printed lines}, return code, stderr) of one subprocess running
    main_targets (a target whose table does not end with COMPILED-ALL, or that a crash left out, fails its
    test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    code = (f"import test_attention_compile as t; t.main_targets({[tuple(t) for t in targets]!r}, "
            f"every_config={every_config!r})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900 * len(targets))
    tables, lines = {}, None
    for line in res.stdout.splitlines():
        if line.startswith("== "):
            cc, dtype, D = line[3:].split()
            lines = tables[(int(cc), dtype, D)] = []
        elif lines is not None:
            lines.append(line)
    return tables, res.returncode, res.stderr


def _ptxas_available():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


# 192/128: DeepSeek MLA's prefill/training shape (q/k 128 nope + 64 rope, v 128), TMA and pointer variants
_TARGETS = [(90, "bf16", 128), (90, "bf16", "192/128"), (90, "bf16", "mla")]
_EVERY = os.environ.get("LLMKERN_COMPILE_ALL") == "1"
if _EVERY:  # more targets, every candidate config: about 15 s of CPU each
    _TARGETS += [(80, "fp16", 80), (90, "fp16", 64), (90, "bf16", 256), (80, "bf16", 256)]


@pytest.fixture(scope="module")
def tables():
    return _run_all(_TARGETS, _EVERY)


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
@pytest.mark.parametrize("cc,dtype,D", _TARGETS)
def test_kernels_compile_for_gpu_targets(cc, dtype, D, tables):
    by_target, returncode, stderr = tables
    lines = by_target.get((cc, dtype, str(D)), [])
    assert returncode == 0 and "COMPILED-ALL" in lines, "\n".join(lines)[-3000:] + stderr[-5000:]
    if cc == 90 and D != "mla":
        fwd = next(line for line in lines if line.startswith("fwd "))
        assert "wgmma=True" in fwd, fwd  # Hopper's warp-group MMA, not the sm_80 path
    for line in lines:
        m = re.search(r"stack=(\d+)", line)
        assert m is None or int(m.group(1)) <= 256, f"heavy register spills: {line}"
        m = re.search(r"smem=(\d+)", line)
        assert m is None or int(m.group(1)) <= SMEM_LIMIT[cc], f"does not fit in shared memory: {line}"


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) > 2 and a[2] == "mla":
        main_mla(int(a[0]), a[1])
        sys.exit(0)
    d, _, dv = (a[2] if len(a) > 2 else "128").partition("/")
    main(int(a[0]) if a else 90, a[1] if len(a) > 1 else "bf16", int(d),
         every_config=len(a) > 3 and a[3] == "all", Dv=int(dv) if dv else None)
