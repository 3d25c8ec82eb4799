"""Bad arguments to the public ops: a clear error naming the argument, or the right answer; never a raw error
from inside torch, a silently wrong result, a NaN for valid input or a hang.

One small CPU input set per op, run on the default (CPU) paths, except the few cases marked "triton": values
that only the Triton path's custom ops / kernels mishandled (tiny, under the interpreter on CPU). For every
parameter: wrong types (str, list, numpy, bool for a number, a float for a tensor and back), dtypes, ranks,
shapes and sizes that disagree between arguments, another device (meta tensors stand in for one), NaN / inf /
negative / zero / huge scalars, empty tensors, strided / transposed / expanded inputs and requires_grad.
(sample, top_k_top_p_filter, top_logprobs, lora_linear(_multi) and generate are audited elsewhere.)

ERR cases expect ValueError / TypeError whose message names the argument; OK cases compare with plain PyTorch
where that is cheap. Each case that was a bug says so (what the old code did) after `# was:`.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmkern
from llmkern.ops.nf4 import NF4Weight

META = torch.device("meta")
_g = torch.Generator().manual_seed(1234)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_g).to(dtype)


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


class _NoopMode(TorchDispatchMode):
    """A dispatch mode that changes nothing: the ops then go through their torch.library custom ops (as under
    torch.compile), whose int arguments are int64."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# ---- inputs (small, fixed) ----------------------------------------------------------------------------------------

Q, K, V = _randn(2, 4, 5, 8), _randn(2, 2, 6, 8), _randn(2, 2, 6, 8)
KPM = torch.ones(2, 6, dtype=torch.bool)
QV, KV_, VV = _randn(7, 4, 8), _randn(9, 2, 8), _randn(9, 2, 8)
CQ, CK = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
QD, KC, VC = _randn(2, 4, 1, 8), _randn(2, 2, 10, 8), _randn(2, 2, 10, 8)
LENS = torch.tensor([3, 5], dtype=torch.int32)
KN, VN = _randn(2, 2, 1, 8), _randn(2, 2, 1, 8)
POOL, VPOOL = _randn(6, 2, 4, 8), _randn(6, 2, 4, 8)
BT = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
QM, KVM = _randn(2, 4, 1, 12), _randn(2, 1, 10, 12)
OA, LA, OB, LB = _randn(2, 4, 3, 8), _randn(2, 4, 3), _randn(2, 4, 3, 8), _randn(2, 4, 3)
X, W, B = _randn(3, 5, 16), _randn(16), _randn(16)
_ANG = _randn(5, 4)
COS, SIN = torch.cat([_ANG, _ANG], -1).cos(), torch.cat([_ANG, _ANG], -1).sin()
QR, KR = _randn(2, 4, 5, 8), _randn(2, 2, 5, 8)
GATE, UP = _randn(3, 5, 16), _randn(3, 5, 16)
LOGITS, LABELS = _randn(2, 5, 11), torch.randint(0, 11, (2, 5), generator=_g)
HID, WLM, BLM = _randn(2, 5, 8), _randn(11, 8), _randn(11)
XM, WGU, WD = _randn(6, 8), _randn(4, 10, 8) * 0.3, _randn(4, 8, 5) * 0.3
RL = _randn(6, 4)
TW, IDS = torch.rand(6, 2, generator=_g), torch.randint(0, 4, (6, 2), generator=_g)
W4 = _randn(6, 16)
DT = torch.randint(0, 7, (3, 2), generator=_g)
DP, TP = torch.rand(3, 2, 7, generator=_g).softmax(-1), torch.rand(3, 3, 7, generator=_g).softmax(-1)


def _sdpa(q, k, v, **kw):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **kw)


def _rms(x, w, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rot_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def _moe_loop(x, wgu, wd, ids, tw):
    y = torch.zeros_like(x)
    F_ = wgu.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                gu = wgu[e] @ x[t]
                y[t] += tw[t, j] * (wd[e] @ (F.silu(gu[:F_]) * gu[F_:]))
    return y


# ---- ERR: (id, call, the argument the message must name) ----------------------------------------------------------

A, AV, AK, MLA = llmkern.attention, llmkern.attention_varlen, llmkern.attention_with_kvcache, llmkern.mla_decode

ERR = [
    # attention
    ("attention q str", lambda: A("q", K, V), "q"),
    ("attention k numpy", lambda: A(Q, K.numpy(), V), "k"),
    ("attention v float", lambda: A(Q, K, 1.0), "v"),
    ("attention q int", lambda: A(Q.int(), K.int(), V.int()), "q"),
    ("attention q complex", lambda: A(Q.to(torch.complex64), K, V), "q"),
    ("attention k float64 vs q float32", lambda: A(Q, K.double(), V), "k"),
    ("attention q 3-d", lambda: A(Q[0], K, V), "q"),
    ("attention k batch", lambda: A(Q, K[:1], V[:1]), "k"),
    ("attention kv heads 3 of 4", lambda: A(Q, _randn(2, 3, 6, 8), _randn(2, 3, 6, 8)), "heads"),
    ("attention v length", lambda: A(Q, K, V[:, :, :5]), "v"),
    ("attention k head_dim", lambda: A(Q, K[..., :4], V), "k"),
    ("attention head_dim 0", lambda: A(Q[..., :0], K[..., :0], V[..., :0]), "head_dim"),
    ("attention k on meta", lambda: A(Q, K.to(META), V.to(META)), "k"),
    ("attention scale nan", lambda: A(Q, K, V, scale=math.nan), "scale"),
    ("attention scale inf", lambda: A(Q, K, V, scale=math.inf), "scale"),
    ("attention scale str", lambda: A(Q, K, V, scale="1"), "scale"),
    ("attention scale bool", lambda: A(Q, K, V, scale=True), "scale"),
    ("attention scale tensor", lambda: A(Q, K, V, scale=torch.tensor(0.5)), "scale"),
    ("attention softcap nan", lambda: A(Q, K, V, softcap=math.nan), "softcap"),
    ("attention softcap negative", lambda: A(Q, K, V, softcap=-1.0), "softcap"),
    ("attention softcap 1e-40", lambda: A(Q, K, V, softcap=1e-40), "softcap"),
    ("attention softcap 1e39", lambda: A(Q, K, V, softcap=1e39), "softcap"),
    ("attention window -2", lambda: A(Q, K, V, window=(-2, 0)), "window"),
    ("attention window float", lambda: A(Q, K, V, window=(0.5, 1)), "window"),
    ("attention window bool", lambda: A(Q, K, V, window=(True, 0)), "window"),
    ("attention window int", lambda: A(Q, K, V, window=3), "window"),
    ("attention window triple", lambda: A(Q, K, V, window=(1, 2, 3)), "window"),
    ("attention dropout_p 1", lambda: A(Q, K, V, dropout_p=1.0), "dropout_p"),
    ("attention dropout_p nan", lambda: A(Q, K, V, dropout_p=math.nan), "dropout_p"),
    ("attention dropout_p negative", lambda: A(Q, K, V, dropout_p=-0.1), "dropout_p"),
    ("attention dropout_p str", lambda: A(Q, K, V, dropout_p="0.1"), "dropout_p"),
    ("attention dropout_p bool", lambda: A(Q, K, V, dropout_p=True), "dropout_p"),
    ("attention seed float", lambda: A(Q, K, V, dropout_p=0.1, seed=1.5), "seed"),
    ("attention seed 3 words", lambda: A(Q, K, V, dropout_p=0.1, seed=torch.tensor([1, 2, 3])), "seed"),
    ("attention seed float tensor", lambda: A(Q, K, V, dropout_p=0.1, seed=torch.tensor([1.0, 2.0])), "seed"),
    ("attention causal int", lambda: A(Q, K, V, causal=1), "causal"),
    ("attention causal str", lambda: A(Q, K, V, causal="yes"), "causal"),
    ("attention return_lse None", lambda: A(Q, K, V, return_lse=None), "return_lse"),
    ("attention key_padding_mask int", lambda: A(Q, K, V, key_padding_mask=KPM.int()), "key_padding_mask"),
    ("attention key_padding_mask shape", lambda: A(Q, K, V, key_padding_mask=KPM[:, :5]), "key_padding_mask"),
    ("attention key_padding_mask meta", lambda: A(Q, K, V, key_padding_mask=KPM.to(META)), "key_padding_mask"),
    ("attention key_padding_mask list", lambda: A(Q, K, V, key_padding_mask=KPM.tolist()), "key_padding_mask"),
    ("attention sinks int", lambda: A(Q, K, V, sinks=torch.zeros(4, dtype=torch.int32)), "sinks"),
    ("attention sinks shape", lambda: A(Q, K, V, sinks=torch.zeros(2)), "sinks"),
    ("attention sinks nan", lambda: A(Q, K, V, sinks=torch.tensor([0.0, math.nan, 0, 0])), "sinks"),
    ("attention sinks +inf", lambda: A(Q, K, V, sinks=torch.tensor([0.0, math.inf, 0, 0])), "sinks"),
    ("attention sinks meta", lambda: A(Q, K, V, sinks=torch.zeros(4, device=META)), "sinks"),
    ("attention alibi float64", lambda: A(Q, K, V, alibi_slopes=torch.ones(4, dtype=torch.float64)), "alibi_slopes"),
    ("attention alibi shape", lambda: A(Q, K, V, alibi_slopes=torch.ones(3)), "alibi_slopes"),
    ("attention alibi nan", lambda: A(Q, K, V, alibi_slopes=torch.tensor([1.0, math.nan, 1, 1])), "alibi_slopes"),
    ("attention alibi list", lambda: A(Q, K, V, alibi_slopes=[1.0] * 4), "alibi_slopes"),
    # attention_varlen
    ("varlen cu_seqlens_q int64", lambda: AV(QV, KV_, VV, CQ.long(), CK), "cu_seqlens_q"),
    ("varlen cu_seqlens_q list", lambda: AV(QV, KV_, VV, [0, 3, 7], CK), "cu_seqlens_q"),
    ("varlen cu_seqlens_q 2-d", lambda: AV(QV, KV_, VV, CQ[None], CK), "cu_seqlens_q"),
    ("varlen cu_seqlens_q wrong end", lambda: AV(QV, KV_, VV, torch.tensor([0, 3, 6], dtype=torch.int32), CK),
     "cu_seqlens_q"),
    ("varlen cu_seqlens_q decreasing", lambda: AV(QV, KV_, VV, torch.tensor([0, 5, 3, 7], dtype=torch.int32),
                                                  torch.tensor([0, 4, 6, 9], dtype=torch.int32)), "cu_seqlens_q"),
    ("varlen cu_seqlens_q meta", lambda: AV(QV, KV_, VV, CQ.to(META), CK), "cu_seqlens_q"),
    ("varlen cu_seqlens_k length", lambda: AV(QV, KV_, VV, CQ, torch.tensor([0, 9], dtype=torch.int32)),
     "cu_seqlens_k"),
    ("varlen max_seqlen_q -1", lambda: AV(QV, KV_, VV, CQ, CK, -1), "max_seqlen_q"),
    ("varlen max_seqlen_q float", lambda: AV(QV, KV_, VV, CQ, CK, 4.0), "max_seqlen_q"),
    ("varlen max_seqlen_q too small", lambda: AV(QV, KV_, VV, CQ, CK, 2), "max_seqlen_q"),
    ("varlen max_seqlen_k bool", lambda: AV(QV, KV_, VV, CQ, CK, None, True), "max_seqlen_k"),
    ("varlen q 4-d", lambda: AV(QV[None], KV_, VV, CQ, CK), "q"),
    ("varlen alibi batch", lambda: AV(QV, KV_, VV, CQ, CK, alibi_slopes=torch.ones(3, 4)), "alibi_slopes"),
    # attention_with_kvcache
    ("kvcache cache_seqlens float", lambda: AK(QD, KC, VC, 4.0), "cache_seqlens"),
    ("kvcache cache_seqlens bool", lambda: AK(QD, KC, VC, True), "cache_seqlens"),
    ("kvcache cache_seqlens float tensor", lambda: AK(QD, KC, VC, LENS.float()), "cache_seqlens"),
    ("kvcache cache_seqlens shape", lambda: AK(QD, KC, VC, LENS[:1]), "cache_seqlens"),
    ("kvcache cache_seqlens negative", lambda: AK(QD, KC, VC, torch.tensor([-1, 3])), "cache_seqlens"),
    ("kvcache cache_seqlens past Tmax", lambda: AK(QD, KC, VC, torch.tensor([3, 11])), "cache_seqlens"),
    ("kvcache cache_seqlens int past Tmax", lambda: AK(QD, KC, VC, 11), "cache_seqlens"),
    # was: RuntimeError "value cannot be converted to type int without overflow" (torch.full int32)
    ("kvcache cache_seqlens int 2**40", lambda: AK(QD, KC, VC, 2**40), "cache_seqlens"),
    ("kvcache cache_seqlens int -2**40", lambda: AK(QD, KC, VC, -2**40), "cache_seqlens"),
    ("kvcache cache_seqlens meta", lambda: AK(QD, KC, VC, LENS.to(META)), "cache_seqlens"),
    ("kvcache k without v", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN), "v"),
    ("kvcache k overflows cache", lambda: AK(QD, KC.clone(), VC.clone(), torch.tensor([3, 10]), k=KN, v=VN),
     "cache_seqlens"),
    ("kvcache k dtype", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN.double(), v=VN.double()), "k"),
    ("kvcache k heads", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN[:, :1], v=VN[:, :1]), "k"),
    ("kvcache k meta", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN.to(META), v=VN.to(META)), "k"),
    # was: RuntimeError "a leaf Variable that requires grad is being used in an in-place operation"
    ("kvcache k_cache leaf requiring grad", lambda: AK(QD, KC.clone().requires_grad_(), VC.clone(), LENS, k=KN, v=VN),
     "k_cache"),
    ("kvcache v_cache view of a leaf requiring grad",
     lambda: AK(QD, KC.clone(), VC.clone().requires_grad_()[:], LENS, k=KN, v=VN), "v_cache"),
    # was: RuntimeError "more than one element of the written-to tensor refers to a single memory location"
    ("kvcache k_cache expanded", lambda: AK(QD, _randn(1, 2, 10, 8).expand(2, 2, 10, 8), VC.clone(), LENS, k=KN,
                                            v=VN), "k_cache"),
    ("kvcache paged pool expanded", lambda: AK(QD, POOL.clone(), _randn(6, 2, 1, 8).expand(6, 2, 4, 8), LENS, k=KN,
                                               v=VN, block_table=BT), "v_cache"),
    ("kvcache num_splits -1", lambda: AK(QD, KC, VC, LENS, num_splits=-1), "num_splits"),
    ("kvcache num_splits float", lambda: AK(QD, KC, VC, LENS, num_splits=1.5), "num_splits"),
    ("kvcache num_splits bool", lambda: AK(QD, KC, VC, LENS, num_splits=True), "num_splits"),
    ("kvcache block_table int64", lambda: AK(QD, POOL, VPOOL, LENS, block_table=BT.long()), "block_table"),
    ("kvcache block_table negative", lambda: AK(QD, POOL, VPOOL, LENS, block_table=BT - 1), "block_table"),
    ("kvcache block_table past the pool", lambda: AK(QD, POOL, VPOOL, LENS, block_table=BT + 1), "block_table"),
    ("kvcache block_table rows", lambda: AK(QD, POOL, VPOOL, LENS, block_table=BT[:1]), "block_table"),
    ("kvcache block_table meta", lambda: AK(QD, POOL, VPOOL, LENS, block_table=BT.to(META)), "block_table"),
    ("kvcache cache_batch_idx past the cache", lambda: AK(QD, KC, VC, LENS, cache_batch_idx=torch.tensor([2, 0])),
     "cache_batch_idx"),
    ("kvcache cache_batch_idx float", lambda: AK(QD, KC, VC, LENS, cache_batch_idx=torch.tensor([1.0, 0.0])),
     "cache_batch_idx"),
    ("kvcache cache_batch_idx duplicate append",
     lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN, v=VN, cache_batch_idx=torch.tensor([0, 0])),
     "cache_batch_idx"),
    ("kvcache cache_batch_idx with block_table",
     lambda: AK(QD, KC, VC, LENS, cache_batch_idx=torch.tensor([1, 0]), block_table=BT), "cache_batch_idx"),
    ("kvcache k_scale on a float32 cache", lambda: AK(QD, KC, VC, LENS, k_scale=1.0), "k_scale"),
    ("kvcache k_scale 0", lambda: AK(QD, llmkern.quantize_kv(KC), llmkern.quantize_kv(VC), LENS, k_scale=0.0),
     "k_scale"),
    ("kvcache v_scale nan tensor", lambda: AK(QD, llmkern.quantize_kv(KC), llmkern.quantize_kv(VC), LENS,
                                              v_scale=torch.tensor([1.0, math.nan])), "v_scale"),
    ("kvcache k_scale str", lambda: AK(QD, llmkern.quantize_kv(KC), llmkern.quantize_kv(VC), LENS, k_scale="1"),
     "k_scale"),
    # was: RuntimeError "value cannot be converted to type float without overflow"
    ("kvcache k_scale 1e39", lambda: AK(QD, llmkern.quantize_kv(KC), llmkern.quantize_kv(VC), LENS, k_scale=1e39),
     "k_scale"),
    ("kvcache fp8 caches of two formats", lambda: AK(QD, llmkern.quantize_kv(KC),
                                                     llmkern.quantize_kv(VC, torch.float8_e5m2), LENS), "v_cache"),
    ("kvcache rotary without k", lambda: AK(QD, KC.clone(), VC.clone(), LENS, rotary_cos=torch.ones(16, 4),
                                            rotary_sin=torch.zeros(16, 4)), "rotary"),
    ("kvcache rotary_sin missing", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN, v=VN,
                                              rotary_cos=torch.ones(16, 4)), "rotary_sin"),
    ("kvcache rotary_cos too short", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN, v=VN,
                                                rotary_cos=torch.ones(4, 4), rotary_sin=torch.zeros(4, 4)),
     "rotary_cos"),
    ("kvcache rotary_cos too wide", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN, v=VN,
                                               rotary_cos=torch.ones(16, 5), rotary_sin=torch.zeros(16, 5)),
     "rotary_cos"),
    ("kvcache rotary_interleaved int", lambda: AK(QD, KC.clone(), VC.clone(), LENS, k=KN, v=VN,
                                                  rotary_cos=torch.ones(16, 4), rotary_sin=torch.zeros(16, 4),
                                                  rotary_interleaved=1), "rotary_interleaved"),
    ("kvcache key_padding_mask shape", lambda: AK(QD, KC, VC, LENS, key_padding_mask=torch.ones(2, 9, dtype=bool)),
     "key_padding_mask"),
    # quantize_kv
    ("quantize_kv dtype float16", lambda: llmkern.quantize_kv(KC, torch.float16), "dtype"),
    ("quantize_kv x int", lambda: llmkern.quantize_kv(KC.int()), "x"),
    ("quantize_kv x 3-d", lambda: llmkern.quantize_kv(KC[0]), "x"),
    ("quantize_kv x list", lambda: llmkern.quantize_kv([1.0]), "x"),
    ("quantize_kv scale negative", lambda: llmkern.quantize_kv(KC, scale=-1.0), "scale"),
    ("quantize_kv scale shape", lambda: llmkern.quantize_kv(KC, scale=torch.ones(3)), "scale"),
    ("quantize_kv scale int tensor", lambda: llmkern.quantize_kv(KC, scale=torch.tensor([1, 2])), "scale"),
    ("quantize_kv scale meta", lambda: llmkern.quantize_kv(KC, scale=torch.ones(2, device=META)), "scale"),
    # was: a NaN cache (x / 0 for x = 0: 1e-46 is 0 in float32)
    ("quantize_kv scale 1e-46", lambda: llmkern.quantize_kv(KC, scale=1e-46), "scale"),
    ("quantize_kv scale 1e39", lambda: llmkern.quantize_kv(KC, scale=1e39), "scale"),
    # mla_decode
    ("mla head_dim_v 0", lambda: MLA(QM, KVM, LENS, head_dim_v=0), "head_dim_v"),
    ("mla head_dim_v past D", lambda: MLA(QM, KVM, LENS, head_dim_v=13), "head_dim_v"),
    ("mla head_dim_v float", lambda: MLA(QM, KVM, LENS, head_dim_v=8.0), "head_dim_v"),
    ("mla head_dim_v bool", lambda: MLA(QM, KVM, LENS, head_dim_v=True), "head_dim_v"),
    ("mla head_dim_v None", lambda: MLA(QM, KVM, LENS, head_dim_v=None), "head_dim_v"),
    # was: RuntimeError "value cannot be converted to type int without overflow"
    ("mla cache_seqlens int 2**40", lambda: MLA(QM, KVM, 2**40, head_dim_v=8), "cache_seqlens"),
    ("mla cache_seqlens int -1", lambda: MLA(QM, KVM, -1, head_dim_v=8), "cache_seqlens"),
    ("mla cache_seqlens float tensor", lambda: MLA(QM, KVM, LENS.float(), head_dim_v=8), "cache_seqlens"),
    ("mla kv_cache float64", lambda: MLA(QM, KVM.double(), LENS, head_dim_v=8), "kv_cache"),
    ("mla kv_cache head dim", lambda: MLA(QM, KVM[..., :10], LENS, head_dim_v=8), "kv_cache"),
    ("mla kv_cache 3-d", lambda: MLA(QM, KVM[0], LENS, head_dim_v=8), "kv_cache"),
    ("mla kv_cache meta", lambda: MLA(QM, KVM.to(META), LENS, head_dim_v=8), "kv_cache"),
    ("mla kv_cache list", lambda: MLA(QM, [1.0], LENS, head_dim_v=8), "kv_cache"),
    ("mla scale nan", lambda: MLA(QM, KVM, LENS, head_dim_v=8, scale=math.nan), "scale"),
    ("mla num_splits -1", lambda: MLA(QM, KVM, LENS, head_dim_v=8, num_splits=-1), "num_splits"),
    ("mla causal int", lambda: MLA(QM, KVM, LENS, head_dim_v=8, causal=1), "causal"),
    ("mla kpe_cache dtype", lambda: MLA(QM, KVM[..., :8].contiguous(), LENS, head_dim_v=8,
                                        kpe_cache=_randn(2, 1, 10, 4).double()), "kpe_cache"),
    ("mla kpe_cache width", lambda: MLA(QM, KVM[..., :8].contiguous(), LENS, head_dim_v=8,
                                        kpe_cache=_randn(2, 1, 10, 3)), "kpe_cache"),
    ("mla kv_scale on a float32 cache", lambda: MLA(QM, KVM, LENS, head_dim_v=8, kv_scale=1.0), "kv_scale"),
    # was: named k_cache, which mla_decode has not
    ("mla block_table past the pool", lambda: MLA(QM, _randn(6, 1, 4, 12), LENS, head_dim_v=8, block_table=BT + 1),
     "kv_cache's first"),
    # merge_attention_states
    ("merge out_a list", lambda: llmkern.merge_attention_states([1.0], LA, OB, LB), "out_a"),
    ("merge lse_a float", lambda: llmkern.merge_attention_states(OA, 1.0, OB, LB), "lse_a"),
    ("merge out_a int", lambda: llmkern.merge_attention_states(OA.int(), LA, OB.int(), LB), "out_a"),
    ("merge lse_b int", lambda: llmkern.merge_attention_states(OA, LA, OB, LB.int()), "lse_b"),
    ("merge out_b dtype", lambda: llmkern.merge_attention_states(OA, LA, OB.double(), LB), "out_b"),
    ("merge out_b shape", lambda: llmkern.merge_attention_states(OA, LA, OB[:1], LB), "out_b"),
    ("merge lse_a transposed", lambda: llmkern.merge_attention_states(OA, LA.transpose(1, 2), OB, LB), "lse_a"),
    ("merge 0-dim", lambda: llmkern.merge_attention_states(*(torch.tensor(1.0),) * 4), "out_a"),
    ("merge out_b meta", lambda: llmkern.merge_attention_states(OA, LA, OB.to(META), LB), "out_b"),
    ("merge out fp8", lambda: llmkern.merge_attention_states(OA.to(torch.float8_e4m3fn), LA,
                                                             OB.to(torch.float8_e4m3fn), LB), "out_a"),
    # rms_norm / layer_norm
    ("rms_norm x int", lambda: llmkern.rms_norm(X.int(), W), "x"),
    ("rms_norm x 0-dim", lambda: llmkern.rms_norm(torch.tensor(1.0), W), "x"),
    ("rms_norm x hidden 0", lambda: llmkern.rms_norm(X[..., :0], W), "x"),
    ("rms_norm x numpy", lambda: llmkern.rms_norm(X.numpy(), W), "x"),
    ("rms_norm weight shape", lambda: llmkern.rms_norm(X, W[:8]), "weight"),
    ("rms_norm weight int", lambda: llmkern.rms_norm(X, W.int()), "weight"),
    ("rms_norm weight float64", lambda: llmkern.rms_norm(X, W.double()), "weight"),
    ("rms_norm weight meta", lambda: llmkern.rms_norm(X, W.to(META)), "weight"),
    ("rms_norm weight float", lambda: llmkern.rms_norm(X, 1.0), "weight"),
    ("rms_norm eps 0", lambda: llmkern.rms_norm(X, W, 0.0), "eps"),
    ("rms_norm eps nan", lambda: llmkern.rms_norm(X, W, math.nan), "eps"),
    ("rms_norm eps str", lambda: llmkern.rms_norm(X, W, "1e-6"), "eps"),
    ("rms_norm eps tensor", lambda: llmkern.rms_norm(X, W, torch.tensor(1e-6)), "eps"),
    # was: eps 0 in float32, NaN on a row of zeros
    ("rms_norm eps 1e-50", lambda: llmkern.rms_norm(X, W, 1e-50), "eps"),
    ("layer_norm eps 1e-50", lambda: llmkern.layer_norm(X, W, B, 1e-50), "eps"),
    # was: eps inf in float32: y = 0 (x / sqrt(1e39) is 3e-20 x, a float32 number)
    ("rms_norm eps 1e39", lambda: llmkern.rms_norm(X, W, 1e39), "eps"),
    # was: OverflowError "int too large to convert to float", naming nothing (lora_linear_multi's scalings too)
    ("rms_norm eps 10**400", lambda: llmkern.rms_norm(X, W, 10**400), "eps"),
    ("layer_norm eps 10**400", lambda: llmkern.layer_norm(X, W, B, 10**400), "eps"),
    ("rms_norm offset 10**400", lambda: llmkern.rms_norm(X, W, offset=10**400), "offset"),
    ("lora_linear_multi scalings 10**400", lambda: llmkern.lora_linear_multi(
        X, torch.ones(8, 16), None, torch.ones(2, 2, 16), torch.ones(2, 8, 2), [1.0, 10**400],
        torch.zeros(15, dtype=torch.long)), "scalings"),
    ("rms_norm offset nan", lambda: llmkern.rms_norm(X, W, offset=math.nan), "offset"),
    ("rms_norm offset without weight", lambda: llmkern.rms_norm(X, None, offset=1.0), "offset"),
    # was: offset + weight inf in float32, NaN on a row of zeros
    ("rms_norm offset 1e39", lambda: llmkern.rms_norm(X, W, offset=1e39), "offset"),
    ("rms_norm residual shape", lambda: llmkern.rms_norm(X, W, residual=X[:1]), "residual"),
    ("rms_norm residual dtype", lambda: llmkern.rms_norm(X, W, residual=X.double()), "residual"),
    ("rms_norm residual meta", lambda: llmkern.rms_norm(X, W, residual=X.to(META)), "residual"),
    ("rms_norm return_residual int", lambda: llmkern.rms_norm(X, W, residual=X, return_residual=1),
     "return_residual"),
    ("rms_norm return_residual without residual", lambda: llmkern.rms_norm(X, W, return_residual=True),
     "return_residual"),
    ("layer_norm bias shape", lambda: llmkern.layer_norm(X, W, B[:8]), "bias"),
    ("layer_norm bias float16", lambda: llmkern.layer_norm(X, W, B.half()), "bias"),
    ("layer_norm bias list", lambda: llmkern.layer_norm(X, W, [0.0] * 16), "bias"),
    ("layer_norm eps negative", lambda: llmkern.layer_norm(X, W, B, -1e-5), "eps"),
    ("layer_norm eps bool", lambda: llmkern.layer_norm(X, W, B, True), "eps"),
    # rope
    ("rope q int", lambda: llmkern.rope(QR.int(), KR.int(), COS, SIN), "q"),
    ("rope q 3-d", lambda: llmkern.rope(QR[0], KR, COS, SIN), "q"),
    ("rope k dtype", lambda: llmkern.rope(QR, KR.double(), COS, SIN), "k"),
    ("rope k tokens", lambda: llmkern.rope(QR, KR[:, :, :4], COS, SIN), "k"),
    ("rope k meta", lambda: llmkern.rope(QR, KR.to(META), COS, SIN), "k"),
    ("rope cos int", lambda: llmkern.rope(QR, KR, COS.int(), SIN.int()), "cos"),
    ("rope cos list", lambda: llmkern.rope(QR, KR, [1.0], SIN), "cos"),
    ("rope sin shape", lambda: llmkern.rope(QR, KR, COS, SIN[:, :6]), "sin"),
    ("rope cos odd rotary dim", lambda: llmkern.rope(QR, KR, COS[:, :5], SIN[:, :5]), "rotary dim"),
    ("rope cos rotary dim 0", lambda: llmkern.rope(QR, KR, COS[:, :0], SIN[:, :0]), "cos"),
    ("rope cos tokens", lambda: llmkern.rope(QR, KR, COS[:4], SIN[:4]), "cos"),
    ("rope cos batch 3", lambda: llmkern.rope(QR, KR, COS.expand(3, 5, 8), SIN.expand(3, 5, 8)), "cos"),
    ("rope cos meta", lambda: llmkern.rope(QR, KR, COS.to(META), SIN.to(META)), "cos"),
    ("rope cos complex", lambda: llmkern.rope(QR, KR, COS.to(torch.complex64), SIN.to(torch.complex64)), "cos"),
    ("rope interleaved int", lambda: llmkern.rope(QR, KR, COS, SIN, interleaved=1), "interleaved"),
    ("rope odd head_dim", lambda: llmkern.rope(_randn(1, 1, 5, 7), _randn(1, 1, 5, 7), _randn(5, 7), _randn(5, 7)),
     "head_dim"),
    # swiglu / geglu
    ("swiglu gate list", lambda: llmkern.swiglu([1.0], UP), "gate"),
    ("swiglu up float", lambda: llmkern.swiglu(GATE, 1.0), "up"),
    ("swiglu gate int", lambda: llmkern.swiglu(GATE.int(), UP.int()), "gate"),
    ("swiglu up dtype", lambda: llmkern.swiglu(GATE, UP.double()), "up"),
    ("swiglu up shape", lambda: llmkern.swiglu(GATE, UP[:1]), "up"),
    ("swiglu 0-dim", lambda: llmkern.swiglu(torch.tensor(1.0), torch.tensor(2.0)), "gate"),
    ("swiglu up meta", lambda: llmkern.swiglu(GATE, UP.to(META)), "up"),
    ("geglu approximate exact", lambda: llmkern.geglu(GATE, UP, "exact"), "approximate"),
    ("geglu approximate None", lambda: llmkern.geglu(GATE, UP, None), "approximate"),
    # was: TypeError "unhashable type: 'list'" naming nothing
    ("geglu approximate list", lambda: llmkern.geglu(GATE, UP, ["tanh"]), "approximate"),
    ("geglu approximate numpy", lambda: llmkern.geglu(GATE, UP, np.array("tanh")), "approximate"),
    # cross_entropy / linear_cross_entropy
    ("cross_entropy logits int", lambda: llmkern.cross_entropy(LOGITS.int(), LABELS), "logits"),
    ("cross_entropy logits vocab 0", lambda: llmkern.cross_entropy(LOGITS[..., :0], LABELS), "logits"),
    ("cross_entropy logits meta", lambda: llmkern.cross_entropy(LOGITS.to(META), LABELS), "logits"),
    ("cross_entropy labels float", lambda: llmkern.cross_entropy(LOGITS, LABELS.float()), "labels"),
    ("cross_entropy labels int16", lambda: llmkern.cross_entropy(LOGITS, LABELS.short()), "labels"),
    ("cross_entropy labels shape", lambda: llmkern.cross_entropy(LOGITS, LABELS[:1]), "labels"),
    ("cross_entropy labels transposed shape", lambda: llmkern.cross_entropy(LOGITS, LABELS.t()), "labels"),
    ("cross_entropy labels past V", lambda: llmkern.cross_entropy(LOGITS, torch.full((2, 5), 11)), "labels"),
    ("cross_entropy labels -1", lambda: llmkern.cross_entropy(LOGITS, torch.full((2, 5), -1)), "labels"),
    ("cross_entropy labels meta", lambda: llmkern.cross_entropy(LOGITS, LABELS.to(META)), "labels"),
    ("cross_entropy ignore_index float", lambda: llmkern.cross_entropy(LOGITS, LABELS, ignore_index=1.0),
     "ignore_index"),
    ("cross_entropy ignore_index 2**64", lambda: llmkern.cross_entropy(LOGITS, LABELS, ignore_index=2**64),
     "ignore_index"),
    ("cross_entropy reduction avg", lambda: llmkern.cross_entropy(LOGITS, LABELS, reduction="avg"), "reduction"),
    ("cross_entropy reduction list", lambda: llmkern.cross_entropy(LOGITS, LABELS, reduction=["mean"]),
     "reduction"),
    ("cross_entropy softcap negative", lambda: llmkern.cross_entropy(LOGITS, LABELS, softcap=-1.0), "softcap"),
    ("linear_cross_entropy hidden int", lambda: llmkern.linear_cross_entropy(HID.int(), WLM, LABELS), "hidden"),
    # was: "weight must have shape [vocab, ?]" for hidden's problem
    ("linear_cross_entropy hidden 0-dim", lambda: llmkern.linear_cross_entropy(torch.tensor(1.0), WLM, LABELS),
     "hidden"),
    # was: RuntimeError "cannot reshape tensor of 0 elements into shape [-1, 0]"
    ("linear_cross_entropy hidden d 0", lambda: llmkern.linear_cross_entropy(HID[..., :0], WLM[:, :0], LABELS),
     "hidden"),
    ("linear_cross_entropy weight d", lambda: llmkern.linear_cross_entropy(HID, WLM[:, :6], LABELS), "weight"),
    # was: "labels must be in [0, 0)", and with every label ignored RuntimeError "index 0 is out of bounds"
    ("linear_cross_entropy weight vocab 0", lambda: llmkern.linear_cross_entropy(HID, WLM[:0], LABELS), "weight"),
    ("linear_cross_entropy weight vocab 0, labels ignored",
     lambda: llmkern.linear_cross_entropy(HID, WLM[:0], torch.full((2, 5), -100)), "weight"),
    ("linear_cross_entropy weight float64", lambda: llmkern.linear_cross_entropy(HID, WLM.double(), LABELS),
     "weight"),
    ("linear_cross_entropy weight meta", lambda: llmkern.linear_cross_entropy(HID, WLM.to(META), LABELS), "weight"),
    ("linear_cross_entropy bias shape", lambda: llmkern.linear_cross_entropy(HID, WLM, LABELS, bias=BLM[:5]),
     "bias"),
    ("linear_cross_entropy labels past V", lambda: llmkern.linear_cross_entropy(HID, WLM, torch.full((2, 5), 11)),
     "labels"),
    ("linear_cross_entropy chunk_size 0", lambda: llmkern.linear_cross_entropy(HID, WLM, LABELS, chunk_size=0),
     "chunk_size"),
    ("linear_cross_entropy chunk_size float", lambda: llmkern.linear_cross_entropy(HID, WLM, LABELS, chunk_size=1.5),
     "chunk_size"),
    ("linear_cross_entropy reduction none", lambda: llmkern.linear_cross_entropy(HID, WLM, LABELS, reduction="none"),
     "reduction"),
    # moe_mlp / moe_route / moe_capacity
    ("moe_mlp x int", lambda: llmkern.moe_mlp(XM.int(), WGU, WD, IDS, TW), "x"),
    ("moe_mlp x hidden 0", lambda: llmkern.moe_mlp(XM[:, :0], WGU, WD, IDS, TW), "x"),
    ("moe_mlp x meta", lambda: llmkern.moe_mlp(XM.to(META), WGU, WD, IDS, TW), "w_gate_up"),
    ("moe_mlp w_gate_up odd rows", lambda: llmkern.moe_mlp(XM, WGU[:, :9], WD, IDS, TW), "w_gate_up"),
    ("moe_mlp w_gate_up hidden", lambda: llmkern.moe_mlp(XM, WGU[..., :6], WD, IDS, TW), "w_gate_up"),
    ("moe_mlp w_gate_up 0 experts", lambda: llmkern.moe_mlp(XM, WGU[:0], WD[:0], IDS, TW), "w_gate_up"),
    ("moe_mlp w_gate_up float64", lambda: llmkern.moe_mlp(XM, WGU.double(), WD, IDS, TW), "w_gate_up"),
    ("moe_mlp w_down transposed shape", lambda: llmkern.moe_mlp(XM, WGU, WD.transpose(1, 2), IDS, TW), "w_down"),
    ("moe_mlp w_down meta", lambda: llmkern.moe_mlp(XM, WGU, WD.to(META), IDS, TW), "w_down"),
    ("moe_mlp topk_ids float", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS.float(), TW), "topk_ids"),
    ("moe_mlp topk_ids bool", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS.bool(), TW), "topk_ids"),
    ("moe_mlp topk_ids past E", lambda: llmkern.moe_mlp(XM, WGU, WD, torch.full((6, 2), 4), TW), "topk_ids"),
    ("moe_mlp topk_ids -2", lambda: llmkern.moe_mlp(XM, WGU, WD, torch.full((6, 2), -2), TW), "topk_ids"),
    ("moe_mlp topk_ids 2**40", lambda: llmkern.moe_mlp(XM, WGU, WD, torch.full((6, 2), 2**40), TW), "topk_ids"),
    ("moe_mlp topk_ids tokens", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS[:3], TW[:3]), "topk_ids"),
    ("moe_mlp topk_ids k 0", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS[:, :0], TW[:, :0]), "topk_ids"),
    ("moe_mlp topk_weights int", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS, TW.int()), "topk_weights"),
    ("moe_mlp topk_weights shape", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS, TW[:3]), "topk_weights"),
    ("moe_mlp topk_weights meta", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS, TW.to(META)), "topk_weights"),
    ("moe_mlp activation gelu", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS, TW, "gelu"), "activation"),
    # was: TypeError "unhashable type: 'list'" naming nothing
    ("moe_mlp activation list", lambda: llmkern.moe_mlp(XM, WGU, WD, IDS, TW, ["swiglu"]), "activation"),
    ("moe_route router_logits int", lambda: llmkern.moe_route(RL.int(), 2), "router_logits"),
    ("moe_route router_logits 0-dim", lambda: llmkern.moe_route(torch.tensor(1.0), 2), "router_logits"),
    # was: "k must be an int in 1..0" for router_logits' problem
    ("moe_route router_logits 0 experts", lambda: llmkern.moe_route(RL[:, :0], 1), "router_logits"),
    ("moe_route k 0", lambda: llmkern.moe_route(RL, 0), "k"),
    ("moe_route k past E", lambda: llmkern.moe_route(RL, 5), "k"),
    ("moe_route k float", lambda: llmkern.moe_route(RL, 2.0), "k"),
    ("moe_route k bool", lambda: llmkern.moe_route(RL, True), "k"),
    # was: renormalized (bool("False") is True) / not renormalized (None), silently
    ("moe_route renormalize 'False'", lambda: llmkern.moe_route(RL, 2, "False"), "renormalize"),
    ("moe_route renormalize list", lambda: llmkern.moe_route(RL, 2, [False]), "renormalize"),
    ("moe_route renormalize None", lambda: llmkern.moe_route(RL, 2, None), "renormalize"),
    ("moe_capacity topk_ids float", lambda: llmkern.moe_capacity(IDS.float(), TW, 4, 1.0), "topk_ids"),
    ("moe_capacity topk_ids past E", lambda: llmkern.moe_capacity(torch.full((6, 2), 4), TW, 4, 1.0), "topk_ids"),
    ("moe_capacity topk_weights shape", lambda: llmkern.moe_capacity(IDS, TW[:3], 4, 1.0), "topk_weights"),
    ("moe_capacity topk_weights meta", lambda: llmkern.moe_capacity(IDS, TW.to(META), 4, 1.0), "topk_weights"),
    # was: accepted, ranked by the real part with only a warning
    ("moe_capacity topk_weights complex", lambda: llmkern.moe_capacity(IDS, TW.to(torch.complex64), 4, 1.0),
     "topk_weights"),
    ("moe_capacity n_experts 0", lambda: llmkern.moe_capacity(IDS, TW, 0, 1.0), "n_experts"),
    ("moe_capacity n_experts float", lambda: llmkern.moe_capacity(IDS, TW, 4.0, 1.0), "n_experts"),
    ("moe_capacity capacity_factor 0", lambda: llmkern.moe_capacity(IDS, TW, 4, 0.0), "capacity_factor"),
    ("moe_capacity capacity_factor nan", lambda: llmkern.moe_capacity(IDS, TW, 4, math.nan), "capacity_factor"),
    ("moe_capacity capacity_factor inf", lambda: llmkern.moe_capacity(IDS, TW, 4, math.inf), "capacity_factor"),
    ("moe_capacity capacity_factor bool", lambda: llmkern.moe_capacity(IDS, TW, 4, True), "capacity_factor"),
    ("moe_capacity policy", lambda: llmkern.moe_capacity(IDS, TW, 4, 1.0, "prob"), "policy"),
    # nf4
    ("nf4_quantize weight int", lambda: llmkern.nf4_quantize(W4.int()), "weight"),
    ("nf4_quantize weight float64", lambda: llmkern.nf4_quantize(W4.double()), "weight"),
    ("nf4_quantize weight 1-d", lambda: llmkern.nf4_quantize(W4[0]), "weight"),
    ("nf4_quantize weight empty", lambda: llmkern.nf4_quantize(W4[:0]), "weight"),
    ("nf4_quantize weight nan", lambda: llmkern.nf4_quantize(torch.full((2, 4), math.nan)), "weight"),
    ("nf4_quantize blocksize 48", lambda: llmkern.nf4_quantize(W4, 48), "blocksize"),
    ("nf4_quantize blocksize float", lambda: llmkern.nf4_quantize(W4, 64.0), "blocksize"),
    # was: RuntimeError from the allocator (4 TiB of padding)
    ("nf4_quantize blocksize 2**40", lambda: llmkern.nf4_quantize(W4, 2**40), "blocksize"),
    # was: double quantization (bool("False") is True)
    ("nf4_quantize double_quant 'False'", lambda: llmkern.nf4_quantize(W4, 64, "False"), "double_quant"),
    ("nf4_dequantize qweight tensor", lambda: llmkern.nf4_dequantize(W4), "qweight"),
    ("nf4_dequantize dtype int32", lambda: llmkern.nf4_dequantize(llmkern.nf4_quantize(W4), torch.int32),
     "dtype"),
    # was: a falsy dtype took the default
    ("nf4_dequantize dtype 0", lambda: llmkern.nf4_dequantize(llmkern.nf4_quantize(W4), 0), "dtype"),
    ("nf4_linear x int32", lambda: llmkern.nf4_linear(X[0].int(), llmkern.nf4_quantize(W4)), "x"),
    ("nf4_linear x in_features", lambda: llmkern.nf4_linear(_randn(3, 8), llmkern.nf4_quantize(W4)), "x"),
    ("nf4_linear x meta", lambda: llmkern.nf4_linear(_randn(3, 16).to(META), llmkern.nf4_quantize(W4)), "x"),
    ("nf4_linear qweight tensor", lambda: llmkern.nf4_linear(_randn(3, 16), W4), "qweight"),
    ("nf4_linear bias shape", lambda: llmkern.nf4_linear(_randn(3, 16), llmkern.nf4_quantize(W4), _randn(5)), "bias"),
    ("nf4_linear bias float", lambda: llmkern.nf4_linear(_randn(3, 16), llmkern.nf4_quantize(W4), 1.0), "bias"),
    ("NF4Weight packed int8", lambda: NF4Weight(torch.zeros(48, dtype=torch.int8), torch.ones(2), (6, 16)),
     "packed"),
    ("NF4Weight absmax float16", lambda: NF4Weight(torch.zeros(48, dtype=torch.uint8), torch.ones(2).half(),
                                                   (6, 16)), "absmax"),
    ("NF4Weight shape 3 dims", lambda: NF4Weight(torch.zeros(48, dtype=torch.uint8), torch.ones(2), (6, 16, 1)),
     "shape"),
    # was: truncated to (6, 16), silently
    ("NF4Weight shape 6.5", lambda: NF4Weight(torch.zeros(48, dtype=torch.uint8), torch.ones(2), (6.5, 16)),
     "shape"),
    # was: Python's "'int' object is not iterable" / "invalid literal for int()", naming nothing
    ("NF4Weight shape int", lambda: NF4Weight(torch.zeros(48, dtype=torch.uint8), torch.ones(2), 96), "shape"),
    ("NF4Weight shape str", lambda: NF4Weight(torch.zeros(48, dtype=torch.uint8), torch.ones(2), "ab"), "shape"),
    ("NF4Weight shape bool", lambda: NF4Weight(torch.zeros(48, dtype=torch.uint8), torch.ones(2), (True, 96)),
     "shape"),
    # speculative_accept
    ("speculative draft_tokens int32", lambda: llmkern.speculative_accept(DT.int(), DP, TP, seed=1), "draft_tokens"),
    ("speculative draft_tokens 1-d", lambda: llmkern.speculative_accept(DT[0], DP, TP, seed=1), "draft_tokens"),
    ("speculative draft_tokens k 0", lambda: llmkern.speculative_accept(DT[:, :0], DP[:, :0], TP[:, :1], seed=1),
     "draft_tokens"),
    ("speculative draft_tokens past V", lambda: llmkern.speculative_accept(torch.full((3, 2), 7), DP, TP, seed=1),
     "draft_tokens"),
    ("speculative draft_probs int", lambda: llmkern.speculative_accept(DT, DP.int(), TP, seed=1), "draft_probs"),
    ("speculative draft_probs k", lambda: llmkern.speculative_accept(DT, DP[:, :1], TP, seed=1), "draft_probs"),
    ("speculative draft_probs None", lambda: llmkern.speculative_accept(DT, None, TP, seed=1), "draft_probs"),
    ("speculative draft_probs meta", lambda: llmkern.speculative_accept(DT, DP.to(META), TP, seed=1), "draft_probs"),
    # was: "draft_probs must have shape [3, 2, 5]", the target's vocab read as the truth without saying so
    ("speculative target_probs vocab", lambda: llmkern.speculative_accept(DT, DP, TP[..., :5], seed=1),
     "target_probs"),
    ("speculative target_probs k", lambda: llmkern.speculative_accept(DT, DP, TP[:, :2], seed=1), "target_probs"),
    ("speculative target_probs bool", lambda: llmkern.speculative_accept(DT, DP, TP.bool(), seed=1), "target_probs"),
    ("speculative seed str", lambda: llmkern.speculative_accept(DT, DP, TP, seed="1"), "seed"),
    ("speculative seed 2**63", lambda: llmkern.speculative_accept(DT, DP, TP, seed=2**63), "seed"),
    ("speculative seed float tensor", lambda: llmkern.speculative_accept(DT, DP, TP, seed=torch.ones(3)), "seed"),
    ("speculative seed rows", lambda: llmkern.speculative_accept(DT, DP, TP, seed=torch.arange(2)), "seed"),
    ("speculative position -1", lambda: llmkern.speculative_accept(DT, DP, TP, seed=1, position=-1), "position"),
    ("speculative position tensor -1", lambda: llmkern.speculative_accept(DT, DP, TP, seed=1,
                                                                          position=torch.tensor([-1, 0, 0])),
     "position"),
    ("speculative position float", lambda: llmkern.speculative_accept(DT, DP, TP, seed=1, position=1.5), "position"),
    # was: greedy decoding (bool("False") is True), silently
    ("speculative greedy 'False'", lambda: llmkern.speculative_accept(DT, DP, TP, seed=1, greedy="False"), "greedy"),
    ("speculative greedy None", lambda: llmkern.speculative_accept(DT, DP, TP, seed=1, greedy=None), "greedy"),
]


@pytest.mark.parametrize("call, name", [c[1:] for c in ERR], ids=[c[0] for c in ERR])
def test_error_names_argument(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), str(info.value)


# ---- OK: (id, check) -- correct output where the input is valid --------------------------------------------------

def _attention_strided():
    qt = _randn(2, 5, 4, 8).transpose(1, 2)
    ke = _randn(1, 2, 6, 8).expand(2, 2, 6, 8)
    vs = _randn(2, 2, 6, 16)[..., ::2]
    for kw in ({}, {"return_lse": True}):
        out = A(qt, ke, vs, **kw)
        _close(out[0] if kw else out, _sdpa(qt, ke, vs))
    _close(A(qt, ke, vs, softcap=1e30), _sdpa(qt, ke, vs))


def _attention_numbers():
    _close(A(Q, K, V, scale=np.float32(0.5)), _sdpa(Q, K, V, scale=0.5))
    _close(A(Q, K, V, scale=1), _sdpa(Q, K, V, scale=1.0))
    _close(A(Q, K, V, scale=0.0), _sdpa(Q, K, V, scale=0.0))
    _close(A(Q, K, V, window=(np.int64(2), None)), A(Q, K, V, window=(2, None)))
    _close(A(Q, K, V, window=[1, 1]), A(Q, K, V, window=(1, 1)))


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("big", [2**62, 2**63 - 1, 2**63, 2**64, 10**20])
def test_attention_huge_window_is_unbounded(big, side, softcap):
    """was: 2**63 - 1 and 2**63 on the right wrapped the reference's int64 mask around (keys hidden: a wrong
    output); 2**64 and up raised OverflowError."""
    w, unbounded = ((big, 0), (None, 0)) if side == "left" else ((0, big), (0, None))
    for causal in (False, True):
        _close(A(Q, K, V, window=w, causal=causal, softcap=softcap),
               A(Q, K, V, window=unbounded, causal=causal, softcap=softcap))
    _close(AV(QV, KV_, VV, CQ, CK, window=w, softcap=softcap), AV(QV, KV_, VV, CQ, CK, window=unbounded,
                                                                  softcap=softcap))
    _close(AK(QD, KC, VC, LENS, window=w, causal=False, softcap=softcap),
           AK(QD, KC, VC, LENS, window=unbounded, causal=False, softcap=softcap))


def _attention_empty():
    assert A(Q[:, :, :0], K, V).shape == (2, 4, 0, 8)
    out, lse = A(Q, K[:, :, :0], V[:, :, :0], return_lse=True)
    assert not out.any() and bool(torch.isneginf(lse).all())
    assert A(Q[:0], K[:0], V[:0]).shape == (0, 4, 5, 8)
    _close(A(Q, K, V[..., :4]), _sdpa(Q, K, V[..., :4]))  # a value head dim of its own (and a strided v)


def _attention_grads():
    q = Q.clone().requires_grad_()
    k = _randn(1, 2, 6, 8).requires_grad_()
    A(q, k.expand(2, 2, 6, 8), V, softcap=30.0).sum().backward()
    assert q.grad.shape == Q.shape and k.grad.shape == (1, 2, 6, 8)
    sinks = torch.zeros(4, requires_grad=True)
    A(Q, K, V, sinks=sinks).sum().backward()
    assert sinks.grad.shape == (4,)
    A(Q, K, V, alibi_slopes=torch.ones(4, requires_grad=True))  # (no gradient for the slopes: fine to ask)
    A(Q, K, V, dropout_p=torch.tensor(0.1), seed=np.int64(3))


def _varlen_checks():
    out = AV(QV, KV_, VV, CQ, CK, causal=True)
    ref0 = A(QV[None, :3].transpose(1, 2), KV_[None, :4].transpose(1, 2), VV[None, :4].transpose(1, 2),
             causal=True)[0].transpose(0, 1)
    _close(out[:3], ref0)
    _close(AV(QV, KV_, VV, CQ, CK, np.int64(4), 10**30), AV(QV, KV_, VV, CQ, CK))
    _close(AV(QV, KV_, VV, torch.tensor([0, 0, 3, 0, 7, 0], dtype=torch.int32)[::2], CK), AV(QV, KV_, VV, CQ, CK))
    out, lse = AV(QV[:0], KV_[:0], VV[:0], torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32),
                  return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)


def _kvcache_checks():
    ref_ = AK(QD, KC, VC, LENS, causal=False)
    r0 = _sdpa(QD[:1], KC[:1, :, :3], VC[:1, :, :3])
    _close(ref_[:1], r0)
    _close(AK(QD, KC, VC, np.int64(5), causal=False), AK(QD, KC, VC, torch.tensor([5, 5]), causal=False))
    # NaN in the slots past each row's length is never read
    kn, vn = KC.clone(), VC.clone()
    kn[:, :, 6:] = math.nan
    vn[:, :, 6:] = math.nan
    for kw in ({}, {"softcap": 5.0}, {"return_lse": True}):
        out = AK(QD, kn, vn, LENS, **kw)
        assert not (out[0] if kw.get("return_lse") else out).isnan().any()
    # a transposed (token-major) paged pool and a non-leaf requiring-grad cache under no_grad
    pool = _randn(6, 4, 2, 8).transpose(1, 2)
    _close(AK(QD, pool, VPOOL, LENS, block_table=BT), AK(QD, pool.contiguous(), VPOOL, LENS, block_table=BT))
    with torch.no_grad():
        AK(QD, KC.clone().requires_grad_(), VC.clone(), LENS, k=KN, v=VN)
    # k requiring grad writes into a plain cache
    AK(QD, KC.clone(), VC.clone(), LENS, k=KN.clone().requires_grad_(), v=VN)
    # fp8 caches with numpy / tensor / per-head scales
    k8, v8 = llmkern.quantize_kv(KC), llmkern.quantize_kv(VC)
    _close(AK(QD, k8, v8, LENS, k_scale=np.float32(2.0)), AK(QD, k8, v8, LENS, k_scale=torch.tensor([2.0, 2.0])))
    assert AK(QD, KC, VC, torch.zeros(2, dtype=torch.int32), return_lse=True)[1].isneginf().all()


def _kvcache_tiny_scale():
    """1e-45 is float32's smallest subnormal (it worked and still does)."""
    x = torch.zeros(1, 2, 3, 4)
    x[0, 0, 0, 0] = 1.0
    y = llmkern.quantize_kv(x, scale=1e-45).float()
    assert not y.isnan().any() and y[0, 0, 0, 0] == 448.0 and y.sum() == 448.0


def _mla_checks():
    out = MLA(QM, KVM, LENS, head_dim_v=8, causal=False)
    _close(out, AK(QM, KVM, KVM[..., :8], LENS, causal=False))
    _close(MLA(QM, KVM, LENS, head_dim_v=np.int64(8)), MLA(QM, KVM, LENS, head_dim_v=8))
    qt = _randn(2, 1, 4, 12).transpose(1, 2)
    _close(MLA(qt, KVM, LENS, head_dim_v=8), MLA(qt.contiguous(), KVM, LENS, head_dim_v=8))
    ke = _randn(1, 1, 10, 12).expand(2, 1, 10, 12)
    _close(MLA(QM, ke, LENS, head_dim_v=8), MLA(QM, ke.contiguous(), LENS, head_dim_v=8))
    out, lse = MLA(QM, KVM, 0, head_dim_v=8, return_lse=True)
    assert not out.any() and lse.isneginf().all()


def _merge_checks():
    o, lse = llmkern.merge_attention_states(OA, LA, OB, LB)
    wa = torch.exp(LA - torch.logaddexp(LA, LB))[..., None]
    _close(o, wa * OA + (1 - wa) * OB)
    _close(lse, torch.logaddexp(LA, LB))
    ninf = torch.full_like(LA, -math.inf)
    o, lse = llmkern.merge_attention_states(OA, ninf, OB, ninf)
    assert not o.any() and lse.isneginf().all()
    oe = _randn(1, 4, 3, 8).expand(2, 4, 3, 8)
    lt = _randn(2, 3, 4).transpose(1, 2)
    _close(llmkern.merge_attention_states(oe, lt, OB, LB)[0],
           llmkern.merge_attention_states(oe.contiguous(), lt.contiguous(), OB, LB)[0])
    oa = OA.clone().requires_grad_()
    llmkern.merge_attention_states(oa, ninf, OB, ninf)[0].sum().backward()
    assert not oa.grad.isnan().any()


def _norm_checks():
    _close(llmkern.rms_norm(X, W), _rms(X, W))
    _close(llmkern.layer_norm(X, W, B), F.layer_norm(X, [16], W, B, 1e-5))
    xt = _randn(16, 5, 3).transpose(0, 2)
    _close(llmkern.rms_norm(xt, W), _rms(xt, W))
    ws, bs = _randn(1).expand(16), _randn(32)[::2]  # (an expanded weight, a strided bias)
    _close(llmkern.layer_norm(xt, ws, bs), F.layer_norm(xt, [16], ws.contiguous(), bs.contiguous(), 1e-5))
    _close(llmkern.rms_norm(X, W, np.float32(1e-5)), _rms(X, W, 1e-5))
    _close(llmkern.rms_norm(X, W, 1), _rms(X, W, 1.0))
    _close(llmkern.rms_norm(X.double(), W), _rms(X.double(), W.double()))
    _close(llmkern.rms_norm(X.double(), W.double(), 1e-300), _rms(X.double(), W.double(), 1e-300))
    _close(llmkern.rms_norm(X.double(), W.double(), 1e39), _rms(X.double(), W.double(), 1e39))
    # the float32 extremes that still work: 1e-45 (float32's smallest subnormal) on rows of zeros, 3e38
    zeros = torch.zeros(2, 16)
    for f in (lambda e: llmkern.rms_norm(zeros, W[:16], e), lambda e: llmkern.layer_norm(zeros, W, B, e)):
        assert not f(1e-45).isnan().any() and not f(3e38).isnan().any()
    xe = _randn(1, 5, 16).expand(3, 5, 16)
    r = _randn(3, 5, 16)
    _close(llmkern.rms_norm(xe, W, residual=r), _rms(xe + r, W))
    xx, rr = xe.clone().requires_grad_(), r.clone().requires_grad_()
    y, s = llmkern.rms_norm(xx, W, residual=rr, return_residual=True)
    (y.sum() + s.sum()).backward()
    assert xx.grad.shape == rr.grad.shape == (3, 5, 16)
    assert llmkern.rms_norm(X[:0], W).shape == (0, 5, 16)
    assert not llmkern.layer_norm(torch.ones(2, 16), W, B).isnan().any()


def _rope_checks():
    qo, ko = llmkern.rope(QR, KR, COS, SIN)
    _close(qo, QR * COS + _rot_half(QR) * SIN)
    _close(ko, KR * COS + _rot_half(KR) * SIN)
    qt, ke = _randn(2, 5, 4, 8).transpose(1, 2), _randn(1, 2, 5, 8).expand(2, 2, 5, 8)
    sin16 = SIN.half()  # (cos / sin of any float dtype, used in float32)
    qo, ko = llmkern.rope(qt, ke, COS.double(), sin16)
    _close(qo, qt * COS + _rot_half(qt) * sin16.float())
    _close(ko, ke * COS + _rot_half(ke) * sin16.float())
    qo, ko = llmkern.rope(QR, KR[:, :0], COS[None, None], SIN[None, None])
    assert ko.shape == (2, 0, 5, 8)
    sin = SIN.clone().requires_grad_()
    llmkern.rope(QR, KR, COS, sin)[0].sum().backward()
    assert sin.grad.shape == SIN.shape


def _glu_checks():
    _close(llmkern.swiglu(GATE, UP), F.silu(GATE) * UP)
    _close(llmkern.geglu(GATE, UP), F.gelu(GATE, approximate="tanh") * UP)
    _close(llmkern.geglu(GATE, UP, "none"), F.gelu(GATE) * UP)
    gt = _randn(16, 5, 3).transpose(0, 2)
    ge = _randn(1, 5, 16).expand(3, 5, 16)
    _close(llmkern.swiglu(gt, ge), F.silu(gt) * ge)
    fused = _randn(3, 5, 32)
    _close(llmkern.swiglu(fused[..., :16], fused[..., 16:]), F.silu(fused[..., :16]) * fused[..., 16:])
    assert llmkern.swiglu(GATE[:0], UP[:0]).shape == (0, 5, 16)
    assert llmkern.swiglu(GATE[..., :0], UP[..., :0]).shape == (3, 5, 0)


def _ce_checks():
    ref_ = F.cross_entropy(LOGITS.reshape(-1, 11), LABELS.reshape(-1))
    _close(llmkern.cross_entropy(LOGITS, LABELS), ref_)
    _close(llmkern.cross_entropy(LOGITS, LABELS.int().reshape(-1)), ref_)
    lt = _randn(11, 5, 2).transpose(0, 2)
    _close(llmkern.cross_entropy(lt, LABELS), F.cross_entropy(lt.reshape(-1, 11), LABELS.reshape(-1)))
    _close(llmkern.cross_entropy(LOGITS, LABELS, ignore_index=np.int64(3)),
           F.cross_entropy(LOGITS.reshape(-1, 11), LABELS.reshape(-1), ignore_index=3))
    # an ignore_index beyond int32 ignores nothing with int32 labels
    _close(llmkern.cross_entropy(LOGITS, LABELS.int(), ignore_index=2**40), ref_)
    x = LOGITS.clone().requires_grad_()
    loss = llmkern.cross_entropy(x, torch.full((2, 5), -100))
    loss.backward()
    assert loss.isnan() and not x.grad.isnan().any()  # (mean over no row: NaN, like PyTorch; zero gradient)
    assert llmkern.cross_entropy(LOGITS[:0], LABELS[:0], reduction="none").shape == (0, 5)


def _lce_checks():
    ref_ = F.cross_entropy(F.linear(HID, WLM, BLM).reshape(-1, 11), LABELS.reshape(-1))
    _close(llmkern.linear_cross_entropy(HID, WLM, LABELS, bias=BLM), ref_)
    _close(llmkern.linear_cross_entropy(HID, WLM, LABELS, bias=BLM, chunk_size=np.int64(3)), ref_)
    _close(llmkern.linear_cross_entropy(HID, WLM, LABELS, bias=BLM, chunk_size=2**70), ref_)
    ht, wt = _randn(8, 5, 2).transpose(0, 2), _randn(8, 11).t()
    _close(llmkern.linear_cross_entropy(ht, wt, LABELS),
           F.cross_entropy(F.linear(ht, wt).reshape(-1, 11), LABELS.reshape(-1)))
    h = _randn(1, 5, 8).requires_grad_()
    llmkern.linear_cross_entropy(h.expand(2, 5, 8), WLM, LABELS).backward()
    assert h.grad.shape == (1, 5, 8)


def _lce_huge_chunk_through_the_op():
    """was: under a dispatch mode (as under torch.compile) chunk_size >= 2**63 overflowed the custom op's int
    argument: RuntimeError "Expected a value of type 'int' for argument 'chunk_size'"."""
    ref_ = llmkern.linear_cross_entropy(HID, WLM, LABELS)
    with _NoopMode():
        for c in (3, 2**63, 2**70):
            _close(llmkern.linear_cross_entropy(HID, WLM, LABELS, chunk_size=c), ref_)


def _moe_checks():
    _close(llmkern.moe_mlp(XM, WGU, WD, IDS, TW), _moe_loop(XM, WGU, WD, IDS, TW))
    ids = IDS.clone()
    ids[0, 0] = -1
    _close(llmkern.moe_mlp(XM, WGU, WD, ids.to(torch.int8), TW.double()), _moe_loop(XM, WGU, WD, ids, TW))
    xt = _randn(8, 6).t()
    wt = WGU.transpose(1, 2).contiguous().transpose(1, 2)
    _close(llmkern.moe_mlp(xt, wt, WD, IDS.t().contiguous().t(), TW), _moe_loop(xt, WGU, WD, IDS, TW))
    assert llmkern.moe_mlp(XM[:0], WGU, WD, IDS[:0], TW[:0]).shape == (0, 8)
    tw = TW.clone().requires_grad_()
    llmkern.moe_mlp(XM, WGU, WD, IDS, tw).sum().backward()
    assert tw.grad.shape == TW.shape


def _moe_route_flags():
    w_on, ids_on = llmkern.moe_route(RL, 2)
    w_off, ids_off = llmkern.moe_route(RL, 2, False)
    _close(w_on.sum(-1), torch.ones(6))
    assert not torch.allclose(w_off.sum(-1), torch.ones(6))
    # flags that bool() reads as meant keep working
    for flag, want in ((1, w_on), (0, w_off), (np.bool_(False), w_off), (np.True_, w_on), (torch.tensor(False), w_off)):
        _close(llmkern.moe_route(RL, np.int64(2), flag)[0], want)
    assert llmkern.moe_route(RL[:0], 2)[0].shape == (0, 2)


def _moe_capacity_checks():
    """was: n_experts past int64 raised OverflowError comparing it with the ids tensor."""
    want = llmkern.moe_capacity(IDS, TW, 4, 1.0)
    big = llmkern.moe_capacity(IDS, TW, 2**70, 1.0)  # capacity 1 pair per expert
    assert big.shape == IDS.shape and ((big == IDS) | (big == -1)).all()
    _close(llmkern.moe_capacity(IDS, TW.int(), 4, 1.0, "position").float(), llmkern.moe_capacity(
        IDS, TW, 4, 1.0, "position").float())
    assert (llmkern.moe_capacity(IDS, TW, 4, 1e308) == IDS).all()
    assert want.dtype == torch.int64 and llmkern.moe_capacity(IDS, TW, np.int64(4), np.float64(1.0)).shape == (6, 2)


def _nf4_checks():
    qw = llmkern.nf4_quantize(W4)
    assert (llmkern.nf4_dequantize(qw) - W4).abs().max() < 0.3 * W4.abs().max()
    _close(llmkern.nf4_dequantize(llmkern.nf4_quantize(W4.t().contiguous().t())), llmkern.nf4_dequantize(qw))
    x = _randn(3, 16)
    _close(llmkern.nf4_linear(x, qw), x @ llmkern.nf4_dequantize(qw).t())
    xe = _randn(1, 16).expand(3, 16)
    _close(llmkern.nf4_linear(xe, qw), xe @ llmkern.nf4_dequantize(qw).t())
    assert llmkern.nf4_dequantize(qw, None).dtype == torch.float32
    assert llmkern.nf4_quantize(W4, 64, 1).nested is not None and llmkern.nf4_quantize(W4, 64, 0).nested is None
    assert llmkern.nf4_quantize(W4, 4096).blocksize == 4096
    # shapes given as floats with integral values, tensors and numpy arrays keep working
    for shape in ((6.0, 16.0), torch.tensor([6, 16]), np.array([6, 16]), torch.Size([6, 16]), [6, 16]):
        w = NF4Weight(qw.packed, qw.absmax, shape)
        assert w.shape == (6, 16)
        _close(w.dequantize(), llmkern.nf4_dequantize(qw))


def _speculative_checks():
    a = llmkern.speculative_accept(DT, DP, TP, seed=5, position=3)
    b = llmkern.speculative_accept(DT, DP.double(), TP.double(), seed=torch.tensor([5, 6, 7]), position=3)
    assert torch.equal(a[0], b[0])
    out, n = llmkern.speculative_accept(DT, None, TP, greedy=True)
    choice = TP.argmax(-1)
    for r in range(3):
        m = int(n[r])
        assert torch.equal(out[r, :m], DT[r, :m]) and out[r, m] == choice[r, m]
    # flags that bool() reads as meant keep working
    for flag in (1, np.True_):
        assert torch.equal(llmkern.speculative_accept(DT, None, TP, greedy=flag)[0], out)
    assert torch.equal(llmkern.speculative_accept(DT, DP, TP, seed=5, position=3, greedy=0)[0], a[0])
    out, n = llmkern.speculative_accept(DT[:0], DP[:0], TP[:0], seed=1)
    assert out.shape == (0, 3)


OK = [
    ("attention strided / expanded", _attention_strided),
    ("attention numpy and int scalars", _attention_numbers),
    ("attention empty", _attention_empty),
    ("attention grads", _attention_grads),
    ("attention_varlen", _varlen_checks),
    ("attention_with_kvcache", _kvcache_checks),
    ("quantize_kv scale 1e-45", _kvcache_tiny_scale),
    ("mla_decode", _mla_checks),
    ("merge_attention_states", _merge_checks),
    ("rms_norm / layer_norm", _norm_checks),
    ("rope", _rope_checks),
    ("swiglu / geglu", _glu_checks),
    ("cross_entropy", _ce_checks),
    ("linear_cross_entropy", _lce_checks),
    ("linear_cross_entropy huge chunk_size through the custom op", _lce_huge_chunk_through_the_op),
    ("moe_mlp", _moe_checks),
    ("moe_route flags", _moe_route_flags),
    ("moe_capacity", _moe_capacity_checks),
    ("nf4", _nf4_checks),
    ("speculative_accept", _speculative_checks),
]


@pytest.mark.parametrize("check", [c[1] for c in OK], ids=[c[0] for c in OK])
def test_valid_input_right_answer(check):
    check()


# ---- the Triton path (tiny inputs, the interpreter on CPU) -------------------------------------------------------

def test_kernel_paths_take_huge_counts(triton_backend):
    """was: num_splits >= 2**63 overflowed the decode custom ops' int argument (RuntimeError "Expected a value of
    type 'int' for argument 'num_splits'"), and max_seqlen_q/k = 2**40 the varlen kernels' int32 grid arithmetic
    (OverflowError "out of bounds for int32"). A bound past int32 is no bound (cu_seqlens are int32); the kernels
    never use more splits than key blocks."""
    q, kc, vc = _randn(1, 2, 1, 16), _randn(1, 1, 8, 16), _randn(1, 1, 8, 16)
    lens = torch.tensor([5], dtype=torch.int32)
    want, want_mla = AK(q, kc, vc, lens), MLA(q, kc, lens, head_dim_v=8)
    for n in (2**63, 2**70):
        _close(AK(q, kc, vc, lens, num_splits=n), want)
        _close(MLA(q, kc, lens, head_dim_v=8, num_splits=n), want_mla)
    qv, kv = _randn(5, 2, 16), _randn(5, 1, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    want = AV(qv, kv, kv, cu, cu)
    for m in (2**31, 2**40, 2**63):
        _close(AV(qv, kv, kv, cu, cu, m, m), want)
    _close(A(q, kc, vc, window=(2**64, 0)), A(q, kc, vc, window=(None, 0)))
