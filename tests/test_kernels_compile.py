"""Compile the rest of llmkern's Triton kernels for the GPU targets without a GPU (Triton's bundled ptxas), as
tests/test_lora_compile.py does: every @triton.jit kernel that no other compile test builds, and the
launcher-reachable variants of the others that those tests leave out. Catches what the interpreter cannot
(the compiled frontend's type rules, layouts, shared-memory budgets, register spills).

Already compiled elsewhere (not repeated here): attention / decode / MLA (test_attention_compile), the LoRA
and NF4 GEMMs (test_lora_compile), cross-entropy with bf16 logits and int64 labels (test_cross_entropy_compile),
RMSNorm / LayerNorm with a weight at N = 4096 / 8192 (test_norm_compile), RoPE prefill and the three GLU
activations (test_rope_swiglu_compile), every MoE tile at sm_90 with silu / erf gelu (test_moe_compile).

Here, with the block sizes and warps the launchers' config functions pick at realistic shapes (hidden 4096,
vocab 128256, head_dim 128, d_ff 14336, 256 experts) and Triton's default num_stages where a launcher sets none:
- merge_attention_states `_merge`: head dims 64 / 128 / 256 / 512, a float32 and a bf16 LSE;
- nf4 `_dequant_kernel` (QLoRA's dequantize-first path): stored and double-quantized (NESTED) absmax, and an
  int64 element count;
- norm: RMSNorm without residual, Gemma's offset with a float32 weight (no Llama rounding order), LayerNorm
  without affine, the backward of a frozen weight (LoRA: no dweight, no ds), QK-norm rows (N = 128: 16 rows
  per program), a 2048-wide model (4 warps);
- cross-entropy: softcap with aligned rows (Gemma 2), int32 labels, float32 logits (VEC 4), reduction "none"
  (a unit dout stride, specialised to a constexpr);
- rope: decoding's narrow head blocks, interleaved backward, partial rotary (NeoX / Phi; GLM's interleaved
  half), head_dim 256 (Gemma), DeepSeek's 128 heads of 64 rope channels, float32 cos / sin;
- swiglu: the backward with a stride-0 upstream gradient (no unit column stride to specialise);
- moe: the gate-up GEMM without h (inference), the tanh gelu (ACT 1, _common.tanh) in the three kernels with
  an activation, bf16 router weights, the weight gradient into float32 split partials, the unweighted combine
  (dx), and one tile of each kernel for sm_80 (mma.sync instead of the warp-group MMA);
and the @triton.jit helpers of _common.py (tanh, split_rows) through their callers.

Targets: sm_90 bf16 (everything), sm_80 fp16 (a subset). Asserts: every kernel compiles (COMPILED-ALL), stack
(register spills) <= 256 bytes, shared memory within the architecture's per-block limit, the warp-group MMA
for the sm_90 MoE tiles of 64 rows or more, and at most 96 registers for RoPE (warps for its whole row tile).

    python tests/test_kernels_compile.py [90|80]     # prints the resource table (both targets by default)
"""
import os
import re
import sys

import pytest

import test_lora_compile
from test_lora_compile import _compile, _ptxas_available, compiled_table

HERE = os.path.abspath(__file__)
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (opt-in maximum)
TARGETS = ((90, "bf16"), (80, "fp16"))
DEFAULT_STAGES = 3  # triton's default num_stages: what a launch that sets none compiles with
# int arguments a realistic launch makes divisible by 16 (besides pointers and strides): sizes of real models
_DIV16 = {"M", "N", "K", "P", "F", "R", "D", "HALF", "V", "numel"}


def _merge_rows(dt, full):
    from llmkern.kernels import merge_attention_states as K
    from llmkern.kernels._common import next_power_of_2

    rows = []
    for D in ((64, 128, 256, 512) if full else (128,)):
        bd = max(16, next_power_of_2(D))  # as merge_attention_states picks them
        br = max(1, min(64, 2048 // bd))
        types = dict(OA=f"*{dt}", OB=f"*{dt}", O=f"*{dt}", LA="*fp32", LB="*fp32", L="*fp32")
        rows.append((f"merge D={D}", K._merge, types, dict(BLOCK_R=br, BLOCK_D=bd), 4, DEFAULT_STAGES))
    if full:  # the LSE of a 16-bit attention state ("any float dtype")
        types = dict(OA=f"*{dt}", OB=f"*{dt}", O=f"*{dt}", LA=f"*{dt}", LB=f"*{dt}", L="*fp32")
        rows.append((f"merge D=128 lse {dt}", K._merge, types, dict(BLOCK_R=16, BLOCK_D=128), 4, DEFAULT_STAGES))
    return rows


def _nf4_rows(dt, full):
    from llmkern.kernels import nf4 as K

    block = 1024  # nf4.dequantize's bytes per program (4 warps: the launch sets none)
    types = dict(WQ="*u8", ABSMAX="*fp32", PAIRS="*i64", STATE2="*fp32", OUT=f"*{dt}")
    rows = [("nf4 dequant", K._dequant_kernel, types, dict(QBLOCK=64, BLOCK=block, NESTED=False), 4, DEFAULT_STAGES),
            ("nf4 dequant nested", K._dequant_kernel, dict(types, ABSMAX="*u8"),
             dict(QBLOCK=64, BLOCK=block, NESTED=True), 4, DEFAULT_STAGES)]
    if full:  # a weight of 2^31 elements or more (an int64 numel), bitsandbytes' blocksize 128
        rows.append(("nf4 dequant numel i64 q128", K._dequant_kernel, dict(types, numel="i64"),
                     dict(QBLOCK=128, BLOCK=block, NESTED=False), 4, DEFAULT_STAGES))
    return rows


def _norm_rows(dt, full):
    from llmkern.kernels import norm as K

    types = {name: f"*{dt}" for name in ("X", "R", "W", "B", "Y", "S", "DY", "DS", "DX")}
    types.update(MEAN="*fp32", RSTD="*fp32", DWP="*fp32", DBP="*fp32", eps="fp32", offset="fp32")
    w32 = dict(types, W="*fp32")  # a float32 weight with 16-bit activations (mixed precision)
    fwd = dict(IS_RMS=True, HAS_W=True, HAS_B=False, HAS_RES=False, CAST_XN=True)
    bwd = dict(IS_RMS=True, HAS_W=True, HAS_DS=False, NEED_DW=True, NEED_DB=False, CAST_XN=True)
    variants = [  # (name, kernel, types, flags, N)
        ("rms fwd", K._norm_fwd, types, fwd, 4096),
        ("rms fwd res gemma w32", K._norm_fwd, w32, dict(fwd, HAS_RES=True, CAST_XN=False), 4096),
        ("ln fwd no affine", K._norm_fwd, types, dict(fwd, IS_RMS=False, HAS_W=False, CAST_XN=False), 4096),
        ("rms bwd frozen w", K._norm_bwd, types, dict(bwd, NEED_DW=False), 4096),
        ("rms bwd ds dw gemma w32", K._norm_bwd, w32, dict(bwd, HAS_DS=True, CAST_XN=False), 4096),
        ("ln bwd no affine ds", K._norm_bwd, types,
         dict(bwd, IS_RMS=False, HAS_W=False, HAS_DS=True, NEED_DW=False, CAST_XN=False), 4096),
        ("rms fwd qk-norm", K._norm_fwd, types, fwd, 128),
        ("rms bwd dw qk-norm", K._norm_bwd, types, bwd, 128),
        ("rms fwd res", K._norm_fwd, types, dict(fwd, HAS_RES=True), 2048),
        ("rms bwd ds dw", K._norm_bwd, types, dict(bwd, HAS_DS=True), 2048),
    ]
    if not full:
        variants = [v for v in variants if v[0] in ("rms fwd", "rms bwd frozen w", "rms fwd qk-norm")]
    rows = []
    for name, fn, ty, flags, N in variants:
        bm, bn, nw = K.config(N)
        rows.append((f"norm {name} N={N}", fn, ty, dict(flags, BLOCK_M=bm, BLOCK_N=bn), nw, DEFAULT_STAGES))
    return rows


def _ce_rows(dt, full):
    from llmkern.kernels import cross_entropy as C

    V = 128256  # Llama 3's vocabulary
    types = dict(X=f"*{dt}", DX=f"*{dt}", LABELS="*i64", LOSS="*fp32", LSE="*fp32", BAD="*i32", DOUT="*fp32",
                 NVALID="*i64", sc_in="fp32", sc_out="fp32", eps="fp32", target="fp32", uniform="fp32", z2="fp32")
    f32 = dict(types, X="*fp32", DX="*fp32")
    variants = [  # (name, kernel, types, flags, element size)
        ("fwd softcap aligned", C._ce_fwd, types, dict(HAS_SOFTCAP=True, SMOOTH=False, ALIGNED=True), 2),
        ("fwd labels i32", C._ce_fwd, dict(types, LABELS="*i32"), dict(HAS_SOFTCAP=False, SMOOTH=False, ALIGNED=True),
         2),
        ("bwd none aligned", C._ce_bwd, types, dict(HAS_SOFTCAP=False, MEAN=False, ALIGNED=True, stride_dout=1), 2),
        ("bwd softcap aligned mean", C._ce_bwd, types, dict(HAS_SOFTCAP=True, MEAN=True, ALIGNED=True), 2),
        ("fwd fp32 logits", C._ce_fwd, f32, dict(HAS_SOFTCAP=False, SMOOTH=False, ALIGNED=True), 4),
        ("bwd fp32 logits mean", C._ce_bwd, f32, dict(HAS_SOFTCAP=False, MEAN=True, ALIGNED=True), 4),
    ]
    if not full:  # test_cross_entropy_compile builds bf16 at sm_80; fp16 here
        variants = [v for v in variants if v[0] in ("fwd labels i32", "bwd none aligned")]
    rows = []
    for name, fn, ty, flags, esize in variants:
        vec = 16 // esize
        bv, nw = C.config(V, vec)
        rows.append((f"ce {name}", fn, ty, dict(flags, BLOCK_V=bv, VEC=vec), nw, DEFAULT_STAGES))
    return rows


def _rope_rows(dt, full):
    from llmkern.kernels import rope as K
    from llmkern.kernels._common import next_power_of_2

    types = {n: f"*{dt}" for n in ("Q", "K", "QO", "KO", "COS", "SIN")}
    unit = dict(sq_d=1, sk_d=1, sqo_d=1, sko_d=1, sc_d=1)  # channel strides of 1: Triton's constexpr
    variants = [  # (name, types, Hq, Hk, D, R, tokens, interleaved, transpose)
        ("decode fwd", types, 32, 8, 128, 128, 8, False, False),
        ("interleaved bwd", types, 32, 8, 128, 128, 8192, True, True),
        ("partial fwd R=32", types, 32, 32, 128, 32, 8192, False, False),
        ("glm interleaved partial R=64", types, 32, 2, 128, 64, 8192, True, False),
        ("gemma D=256 bwd", types, 16, 16, 256, 256, 8192, False, True),
        ("deepseek 128 heads D=64 interleaved", types, 128, 1, 64, 64, 8192, True, False),
        ("cos/sin fp32 fwd", dict(types, COS="*fp32", SIN="*fp32"), 32, 8, 128, 128, 8192, False, False),
    ]
    if not full:
        variants = [v for v in variants if v[0] in ("decode fwd", "interleaved bwd")]
    rows = []
    for name, ty, hq, hk, D, R, tokens, inter, trans in variants:
        block_pass = next_power_of_2(D - R) if R < D else 0  # as rope_apply passes it
        bq, bk, bh, warps = K.config(hq, hk, R // 2, tokens, block_pass)
        consts = dict(unit, INTERLEAVED=inter, TRANSPOSE=trans, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=bh,
                      HAS_PASS=R < D, BLOCK_PASS=max(block_pass, 1))
        rows.append((f"rope {name}", K._rope, ty, consts, warps, DEFAULT_STAGES))
    return rows


def _glu_rows(dt, full):
    from llmkern.kernels import swiglu as K

    types = {n: f"*{dt}" for n in ("G", "U", "O", "DO", "DG", "DU")}
    block, warps = K.config(14336)
    # a stride-0 dout (the gradient of .sum()): sd_m, sd_f are runtime 0, not the unit stride constexpr
    return [("glu bwd silu dout stride 0", K._glu_bwd, types, dict(sg_f=1, su_f=1, ACT=K.ACTS["silu"], BLOCK=block),
             warps, DEFAULT_STAGES)]


def _moe_rows(dt, full):
    from llmkern.kernels import moe as K
    from llmkern.kernels.swiglu import ACTS

    types = {n: f"*{dt}" for n in ("X", "W", "A", "H", "IN", "B", "OUT", "DY", "WD", "DH", "Y", "Z", "O")}
    types.update(ORDER="*i32", SEG="*i32", IDS="*i32", TW="*fp32", DWP="*fp32")
    tw16 = dict(types, TW=f"*{dt}")  # router weights in the activations' dtype (Mixtral, Qwen-MoE)
    common = dict(PRECISION="tf32", BLOCK_E=256)

    def mnk(t):
        return dict(BLOCK_M=t[0], BLOCK_N=t[1], BLOCK_K=t[2]), t[3], t[4]

    def prm(t):
        return dict(BLOCK_P=t[0], BLOCK_R=t[1], BLOCK_M=t[2]), t[3], t[4]

    gu, gu_w, gu_s = mnk(K.GATE_UP_TILES[0])
    dec, dec_w, dec_s = mnk(K.GATE_UP_TILES[-1])  # the decoding tile (16 rows)
    gm, gm_w, gm_s = mnk(K.GEMM_TILES[0])
    bw, bw_w, bw_s = mnk(K.GATE_UP_BWD_TILES[0])
    wg, wg_w, wg_s = prm(K.WGRAD_TILES[0])
    tanh = ACTS["gelu_tanh"]
    rows = [
        ("gate_up no h", K._gate_up_kernel, types, dict(gu, **common, sw_k=1, ACT=0, SAVE_H=False), gu_w, gu_s),
        ("gate_up no h decode", K._gate_up_kernel, types, dict(dec, **common, sw_k=1, ACT=0, SAVE_H=False),
         dec_w, dec_s),
        ("gate_up gelu_tanh", K._gate_up_kernel, types, dict(gu, **common, sw_k=1, ACT=tanh, SAVE_H=True),
         gu_w, gu_s),
        ("gate_up_bwd gelu_tanh tw16", K._gate_up_bwd_kernel, tw16,
         dict(bw, **common, sw_n=1, ACT=tanh, SLOT_N=K.GPU_SLOT_N), bw_w, bw_s),
        ("wgrad dw_down gelu_tanh tw16 out32", K._wgrad_kernel, dict(tw16, OUT="*fp32"),
         dict(wg, PRECISION="tf32", ACT=tanh, Y_TOKEN=True, Z_TOKEN=False), wg_w, wg_s),
        ("wgrad dw_gate_up out32", K._wgrad_kernel, dict(types, OUT="*fp32"),
         dict(wg, PRECISION="tf32", ACT=0, Y_TOKEN=False, Z_TOKEN=True), wg_w, wg_s),
        ("combine dx (no weights)", K._combine_kernel, types, dict(HAS_W=False, BLOCK=1024), 4, DEFAULT_STAGES),
        ("combine tw16", K._combine_kernel, tw16, dict(HAS_W=True, BLOCK=1024), 4, DEFAULT_STAGES),
    ]
    if not full:  # sm_80: the first (LLMKERN_MOE_AUTOTUNE=0) tile of each kernel, silu, as the forward/backward run
        rows = [("gate_up", K._gate_up_kernel, types, dict(gu, **common, sw_k=1, ACT=0, SAVE_H=True), gu_w, gu_s),
                ("down", K._sorted_gemm_kernel, types, dict(gm, **common, sb_k=1), gm_w, gm_s),
                ("dx", K._sorted_gemm_kernel, types, dict(gm, **common, sb_n=1), gm_w, gm_s),
                ("gate_up_bwd", K._gate_up_bwd_kernel, types,
                 dict(bw, **common, sw_n=1, ACT=0, SLOT_N=K.GPU_SLOT_N), bw_w, bw_s),
                ("wgrad dw_down", K._wgrad_kernel, types,
                 dict(wg, PRECISION="tf32", ACT=0, Y_TOKEN=True, Z_TOKEN=False), wg_w, wg_s),
                ("wgrad dw_gate_up", K._wgrad_kernel, types,
                 dict(wg, PRECISION="tf32", ACT=0, Y_TOKEN=False, Z_TOKEN=True), wg_w, wg_s),
                ("combine", K._combine_kernel, types, dict(HAS_W=True, BLOCK=1024), 4, DEFAULT_STAGES)]
    out = []
    for name, fn, ty, consts, w, s in rows:  # named with the tile: "moe gate_up 64x128x64"
        dims = ("BLOCK_P", "BLOCK_R", "BLOCK_M") if "BLOCK_P" in consts else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
        tile = "x".join(str(consts[k]) for k in dims if k in consts)
        out.append((f"moe {name} {tile}".rstrip(), fn, ty, consts, w, s))
    return out


def rows(cc):
    """(name, kernel, types, constexprs, num_warps, num_stages) of target cc: everything at sm_90, a subset at
    sm_80."""
    dt = dict(TARGETS)[cc]
    full = cc == 90
    return [r for make in (_merge_rows, _nf4_rows, _norm_rows, _ce_rows, _rope_rows, _glu_rows, _moe_rows)
            for r in make(dt, full)]


def main(ccs=(90, 80)):
    test_lora_compile._DIV16 = _DIV16
    for cc in ccs:
        dt = dict(TARGETS)[cc]
        for name, fn, types, consts, warps, stages in rows(cc):
            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
            r = _compile(fn, types, consts, warps, stages, cc=cc, sass=False)  # (no SASS facts checked)
            print(f"{name:44s} sm_{cc} {dt} warps={warps} stages={stages}: regs={r['regs']} stack={r['stack']} "
                  f"smem={r['smem']} wgmma={r['wgmma']}", flush=True)
    print("COMPILED-ALL")


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's bundled ptxas")
def test_other_kernels_compile_for_gpu_targets():
    lines = compiled_table(HERE, timeout=600)
    want = [f"{name} sm_{cc}" for cc, _ in TARGETS for name, *_ in rows(cc)]
    assert [re.sub(r" +(sm_\d+) .*", r" \1", line) for line in lines] == want, "\n".join(lines)
    for line in lines:
        cc = int(re.search(r" sm_(\d+) ", line).group(1))
        stack = int(re.search(r"stack=(\d+)", line).group(1))
        assert stack <= 256, f"heavy register spills: {line}"
        smem = int(re.search(r"smem=(\d+)", line).group(1))
        assert smem <= SMEM_LIMIT[cc], f"does not fit in shared memory: {line}"
        if line.startswith("rope "):  # warps for the whole row tile, pass-through included: <= 32 elements a thread
            assert int(re.search(r"regs=(\d+)", line).group(1)) <= 96, f"too few warps for the tile: {line}"
        tile = re.search(r"^moe .* (\d+)x\d+x\d+ +sm_90 ", line)
        if tile and int(tile.group(1)) >= 64:
            assert "wgmma=True" in line, f"no warp-group MMA: {line}"


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (90, 80))
