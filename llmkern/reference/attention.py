"""Plain-PyTorch reference of fused attention: the test oracle and the CPU fallback.

Same semantics as llmkern.attention (see llmkern/ops/attention.py):
- layout [batch, heads, seq, head_dim]; GQA/MQA when k/v have fewer heads (dividing q's); v's head dim
  (the output's) may differ from q/k's (DeepSeek MLA: 192 for q/k, 128 for v);
- causal alignment is bottom-right: query i sees keys j <= i + (Tk - Tq);
- window=(left, right): query i sees keys j with i + off - left <= j <= i + off + right,
  off = Tk - Tq (None or a negative value = unbounded on that side);
- softcap: scores = softcap * tanh(q.k * scale / softcap);
- key_padding_mask: bool [batch, Tk], True = attend;
- a query row with no visible key gets a zero output and LSE -inf (never NaN);
- sinks: per-query-head logits [H] that join every row's softmax denominator and add no value
  (gpt-oss): p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink_h)); the LSE is the log of that whole
  denominator, so a row with no visible key gets a zero output and LSE sink_h;
- alibi_slopes: ALiBi, FlashAttention-2's semantics: float32 [H] or [B, H] slopes; the score of query i
  and key j gets -slope * |i + Tk - Tq - j| (bottom-right aligned like the causal mask; for decode,
  Tk is the row's cache length) after scale and softcap, before the masks; never differentiated;
- dropout_p: attention dropout on the softmax weights, kept weights scaled by 1/(1-p), with the
  mask of `attention_dropout_keep` (a hash of the seed, batch row, query head, query and key
  position: the Triton kernels regenerate the same bits); the LSE is that of the undropped softmax.

Computed in float32 (float64 for float64 inputs), returned in the input dtype; the LSE is float32
(float64 for float64 inputs). It materialises the [Tq, Tk] score matrix per head: fine as an
oracle and for short sequences, not as a replacement for the kernel at long lengths.
"""
import math
from typing import Optional, Tuple

import torch

from llmkern.reference.lora import _fmix32, _mul32, dropout_params, seed_keys


def _normalize_window(window, causal):
    left, right = (None, None) if window is None else window
    left = None if left is None or left < 0 else int(left)
    right = None if right is None or right < 0 else int(right)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def visibility_mask(tq: int, tk: int, *, causal: bool = False, window=None,
                    device=None, offset: Optional[int] = None) -> Optional[torch.Tensor]:
    """Bool [tq, tk] mask (True = visible) of causal/window constraints, None when all visible.

    `offset` is the position of query 0 minus the position of key 0 (default tk - tq: bottom-right).
    """
    left, right = _normalize_window(window, causal)
    if left is None and right is None:
        return None
    off = tk - tq if offset is None else offset
    i = torch.arange(tq, device=device)[:, None] + off
    j = torch.arange(tk, device=device)[None, :]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if right is not None:
        mask &= j <= i + right
    if left is not None:
        mask &= j >= i - left
    return mask


def attention_dropout_keep(B, H, Tq, Tk, p, seed, device=None, batch_base=0):
    """Bool [B, H, Tq, Tk]: which softmax weights attention dropout keeps (True = kept).

    Element (b, h, i, j) (query head h, query i, key j, positions within the sequence) is kept when
    hash(seed, (batch_base + b) * H + h, i, j) >> 8 >= round(p * 2^24). seed: an int (its low 64 bits)
    or an int32 [2] tensor of its two words, as for the LoRA dropout. Under torch.compile a tensor seed
    goes through the opaque custom op `llmkern::attention_dropout_keep` (see lora.dropout_keep_mask:
    inlined, Inductor's lowering of the hash ran for many minutes)."""
    if isinstance(seed, torch.Tensor) and torch.compiler.is_compiling():
        return _dropout_keep_op(seed.to(device), B, H, Tq, Tk, float(p), int(batch_base))
    return _dropout_keep(B, H, Tq, Tk, p, seed, device, batch_base)


def _dropout_keep(B, H, Tq, Tk, p, seed, device, batch_base):
    s0, s1, thr = dropout_params(p, seed)
    if isinstance(s0, torch.Tensor):
        s0, s1 = s0.to(device), s1.to(device)
    k0, kc = seed_keys(s0, s1)
    bh = (batch_base * H + torch.arange(B * H, device=device, dtype=torch.int64)) & 0xFFFFFFFF
    kh = _fmix32(k0 ^ _fmix32((_mul32(bh, 0xCC9E2D51) + kc) & 0xFFFFFFFF))  # [B*H]
    rows = torch.arange(Tq, device=device, dtype=torch.int64)
    cols = torch.arange(Tk, device=device, dtype=torch.int64)
    hr = _fmix32(rows[None, :] ^ kh[:, None])                       # [B*H, Tq]
    hc = (_mul32(cols, 0x9E3779B1) + kc) & 0xFFFFFFFF              # [Tk]
    h = _fmix32(hr[:, :, None] ^ hc[None, None, :])
    return ((h >> 8) >= thr).reshape(B, H, Tq, Tk)


@torch.library.custom_op("llmkern::attention_dropout_keep", mutates_args=())
def _dropout_keep_op(seed: torch.Tensor, B: int, H: int, Tq: int, Tk: int, p: float,
                     batch_base: int) -> torch.Tensor:
    return _dropout_keep(B, H, Tq, Tk, p, seed, seed.device, batch_base)


@_dropout_keep_op.register_fake
def _(seed, B, H, Tq, Tk, p, batch_base):
    return seed.new_empty((B, H, Tq, Tk), dtype=torch.bool)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def alibi_bias(alibi_slopes, q_pos, tk, dtype=torch.float32):
    """ALiBi bias -slope * |q_pos - j| for keys j < tk: [B or 1, H, Tq, tk] in `dtype`.

    alibi_slopes: [H] or [B, H]; q_pos: the queries' positions among the keys, [Tq] or [B, Tq]
    (bottom-right alignment: i + Tk - Tq). The slopes are detached: ALiBi is not trained
    (FlashAttention gives them no gradient either)."""
    slopes = alibi_slopes.detach().to(device=q_pos.device, dtype=dtype)
    # explicit sizes (not -1: ambiguous for an empty tensor, e.g. Tq = 0)
    slopes = slopes.reshape(slopes.shape[0] if slopes.dim() == 2 else 1, slopes.shape[-1], 1, 1)
    pos = q_pos.reshape(q_pos.shape[0] if q_pos.dim() == 2 else 1, 1, q_pos.shape[-1], 1)
    j = torch.arange(tk, device=q_pos.device)
    return -slopes * (pos - j).abs().to(dtype)


def attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None,
              key_padding_mask=None, return_lse=False, mask=None, dropout_p=0.0, seed=0, batch_base=0,
              sinks=None, alibi_slopes=None, bias=None):
    """Reference attention. q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv]; returns out [B, H, Tq, Dv]
    (, lse [B, H, Tq]).

    `mask` (extra, reference only): bool [B or 1, 1 or H, Tq, Tk] ANDed with the other masks.
    alibi_slopes: [H] or [B, H] (see the module docstring; not differentiated).
    `bias` (extra, reference only): float [B or 1, H, Tq, Tk] added where ALiBi's bias goes (after
    softcap, before the masks): how the decode reference places its per-row ALiBi positions.
    dropout_p, seed, batch_base: attention dropout (see attention_dropout_keep).
    sinks: [H] per-head sink logits (any float dtype, computed in the compute dtype, differentiable).
    """
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    G = H // Hk
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cd = _compute_dtype(q.dtype)
    sink = None if sinks is None else sinks.to(device=q.device, dtype=cd).reshape(1, Hk, G, 1, 1)
    if Tk == 0:  # nothing to attend to: zeros and LSE -inf, or the sink's (still connected to the graph)
        out = q[..., :1].mul(0).expand(B, H, Tq, v.shape[-1]) + (k.sum() + v.sum()) * 0
        lse = torch.full((B, H, Tq), float("-inf"), dtype=cd, device=q.device)
        if sink is not None:
            # (a -inf sink, "no sink", would make * 0 NaN: masked to 0 first, keeping the graph)
            sk = sink.reshape(1, H, 1, 1)
            out = out + sk.masked_fill(torch.isneginf(sk), 0.0).to(out.dtype) * 0
            lse = sink.reshape(1, H, 1).expand(B, H, Tq)
        return (out, lse) if return_lse else out
    qf = q.to(cd).reshape(B, Hk, G, Tq, D)
    kf = k.to(cd)[:, :, None]
    vf = v.to(cd)[:, :, None]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hk, G, Tq, Tk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, torch.arange(Tq, device=q.device) + (Tk - Tq), Tk, cd)
    if bias is not None:
        s = s + bias.to(cd).expand(B, H, Tq, Tk).reshape(B, Hk, G, Tq, Tk)
    visible = visibility_mask(Tq, Tk, causal=causal, window=window, device=q.device)
    full = None
    if visible is not None:
        full = visible.view(1, 1, 1, Tq, Tk)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool).view(B, 1, 1, 1, Tk)
        full = kpm if full is None else (full & kpm)
    if mask is not None:
        m = mask.to(torch.bool)
        m = m.expand(B, H, Tq, Tk).reshape(B, Hk, G, Tq, Tk)
        full = m if full is None else (full & m)
    if full is not None:
        s = s.masked_fill(~full, float("-inf"))
        vf = _unseen_values_zeroed(vf, full, B, Hk, G, Tq, Tk)
    m = s.amax(dim=-1, keepdim=True).detach()
    if sink is not None:  # the sink takes part in the running max, as one more (value-less) key
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    if dropout_p > 0:
        keep = attention_dropout_keep(B, H, Tq, Tk, dropout_p, seed, q.device, batch_base)
        p = torch.where(keep.reshape(B, Hk, G, Tq, Tk), p * (1.0 / (1.0 - dropout_p)), 0.0)
    empty = denom == 0  # a row that sees no key (and has no sink, or a -inf one)
    safe = torch.where(empty, torch.ones_like(denom), denom)
    out = torch.matmul(p, vf) / safe
    out = out.reshape(B, H, Tq, v.shape[-1]).to(q.dtype)
    if not return_lse:
        return out
    # LSE -inf for empty rows, through a safe log: log(0)'s gradient inf times exp(-inf - m)'s 0 would make a
    # -inf sink's gradient NaN
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), m + torch.log(safe)).reshape(B, H, Tq)
    return out, lse


def _unseen_values_zeroed(vf, full, B, Hk, G, Tq, Tk):
    """vf [B, Hk, 1, Tk, Dv] with the values of keys no query of the row sees set to 0: their weight is 0, but
    0 * NaN is NaN, and hidden cache slots (past a row's length, padding) may hold anything (torch.empty)."""
    seen = full.expand(B, Hk, G, Tq, Tk).any(dim=3).any(dim=2)  # [B, Hk, Tk]
    if not torch.compiler.is_compiling() and bool(seen.all()):  # (traced: no data-dependent branch)
        return vf
    return vf.masked_fill(~seen[:, :, None, :, None], 0.0)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=False, scale=None, window=None, softcap=None, return_lse=False,
                     dropout_p=0.0, seed=0, sinks=None, alibi_slopes=None):
    """Reference varlen attention: q [total_q, H, D], k [total_k, Hk, D], v [total_k, Hk, Dv], int32
    cumulative lengths.
    alibi_slopes [H] or [batch, H]: each sequence's Tq/Tk align its bias.

    Returns out [total_q, H, Dv] (, lse [H, total_q])."""
    outs, lses = [], []
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = attention(qb, kb, vb, causal=causal, scale=scale, window=window, softcap=softcap,
                           return_lse=True, dropout_p=dropout_p, seed=seed, batch_base=b, sinks=sinks,
                           alibi_slopes=slopes)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=1)


def attention_varlen_dense(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, window=None,
                           softcap=None, return_lse=False, sinks=None, alibi_slopes=None):
    """attention_varlen as one attention over all packed tokens with a block-diagonal mask: no host
    read of cu_seqlens (torch.compile traces it whole) at the price of a [total_q, total_k] score
    matrix. No dropout (its mask is keyed on each sequence's own row index: see attention_varlen)."""
    cu_q, cu_k = cu_seqlens_q.to(torch.long), cu_seqlens_k.to(torch.long)
    tq, tk = q.shape[0], k.shape[0]
    # each token's sequence and its position in it; sequences' lengths broadcast to their tokens
    seq_q = torch.searchsorted(cu_q[1:], torch.arange(tq, device=q.device), right=True)  # [tq]
    seq_k = torch.searchsorted(cu_k[1:], torch.arange(tk, device=q.device), right=True)  # [tk]
    len_q, len_k = (cu_q[1:] - cu_q[:-1])[seq_q], (cu_k[1:] - cu_k[:-1])[seq_q]
    pos = torch.arange(tq, device=q.device) - cu_q[seq_q] + len_k - len_q  # bottom-right, among its keys
    j = torch.arange(tk, device=q.device) - cu_k[seq_k]                    # [tk]
    vis = seq_q[:, None] == seq_k[None, :]
    left, right = _normalize_window(window, causal)
    if right is not None:
        vis = vis & (j[None, :] <= pos[:, None] + right)
    if left is not None:
        vis = vis & (j[None, :] >= pos[:, None] - left)
    bias = None
    if alibi_slopes is not None:  # -slope * |pos - j| with each sequence's (or the shared) slopes
        slopes = alibi_slopes.detach().to(_compute_dtype(q.dtype))
        slopes = slopes[seq_q] if slopes.dim() == 2 else slopes[None, :].expand(tq, -1)  # [tq, H]
        dist = (pos[:, None] - j[None, :]).abs().to(slopes.dtype)                      # [tq, tk]
        bias = (-slopes.t()[:, :, None] * dist[None])[None]                            # [1, H, tq, tk]
    out, lse = attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale,
                         softcap=softcap, return_lse=True, mask=vis[None, None], sinks=sinks, bias=bias)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, causal=True, scale=None,
                           window=None, softcap=None, return_lse=False, sinks=None, key_padding_mask=None,
                           alibi_slopes=None):
    """Reference decode: q [B, H, Tq, D] are the last Tq positions of each row's cache_seqlens[b]
    keys in k_cache [B, Hk, Tmax, D] / v_cache [B, Hk, Tmax, Dv] (the new tokens already written there);
    key_padding_mask [B, Tmax] bool (True = attend) hides cache slots, e.g. a left-padded prompt's;
    alibi_slopes [H] or [B, H]: the bias of each row's query positions (Tk = the row's length)."""
    B, H, Tq, D = q.shape
    Tmax = k_cache.shape[2]
    lens = cache_seqlens.to(torch.long).to(q.device)
    j = torch.arange(Tmax, device=q.device)
    kpm = j[None, :] < lens[:, None]  # [B, Tmax]
    left, right = _normalize_window(window, causal)
    pos = lens[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # [B, Tq]
    vis = torch.ones(B, Tq, Tmax, dtype=torch.bool, device=q.device)
    if right is not None:
        vis &= j[None, None, :] <= pos[:, :, None] + right
    if left is not None:
        vis &= j[None, None, :] >= pos[:, :, None] - left
    if key_padding_mask is not None:
        kpm = kpm & key_padding_mask.to(torch.bool)
    vis &= kpm[:, None, :]
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, pos, Tmax, _compute_dtype(q.dtype))
    return attention(q, k_cache, v_cache, scale=scale, softcap=softcap, return_lse=return_lse,
                     mask=vis[:, None], sinks=sinks, bias=bias)


def dequantize_kv(cache, scale, dtype):
    """A float8 KV cache [*, Hk, T, D] read back as `dtype`: x * scale (float32 [Hk], or None: 1) in float32."""
    x = cache.to(torch.float32)
    if scale is not None:
        x = x * scale.view(1, -1, 1, 1)
    return x.to(dtype)


def attention_float64(q, k, v, **kw) -> Tuple[torch.Tensor, ...]:
    """The reference evaluated on float64 copies of the inputs (the test oracle)."""
    return attention(q.double(), k.double(), v.double(), **kw)


def attention_backward(dout, q, k, v, out, lse, causal, scale, window, softcap):
    """(dq, dk, dv) of attention(q, k, v) from the forward's out and LSE, without autograd through a
    recomputed forward (FlashAttention's backward formulas, in the reference's compute dtype; no masks,
    dropout or sinks; window as visibility_mask takes it): P = exp(S - LSE), dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO * O)), chained through softcap. v, out and dout may be Dv wide."""
    B, H, Tq, D = q.shape
    Hk, Tk, G = k.shape[1], k.shape[2], H // k.shape[1]
    cd = _compute_dtype(q.dtype)
    qf, do, of = (t.to(cd).reshape(B, Hk, G, Tq, t.shape[-1]) for t in (q, dout, out))
    kf, vf = k.to(cd)[:, :, None], v.to(cd)[:, :, None]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap:
        tanh = torch.tanh(s / softcap)
        s = softcap * tanh
    visible = visibility_mask(Tq, Tk, causal=causal, window=window, device=q.device)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    lse = lse.to(cd).reshape(B, Hk, G, Tq, 1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0))  # a row with no key: all -inf, P = 0
    ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - (do * of).sum(-1, keepdim=True))
    if softcap:
        ds = ds * (1 - tanh * tanh)
    ds = ds * scale
    dq = torch.matmul(ds, kf).reshape(B, H, Tq, D)
    dk = torch.matmul(ds.transpose(-1, -2), qf).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Two attention states of the same queries over disjoint key sets -> the state over their union:
    out [..., D] = (w_a out_a + w_b out_b) / (w_a + w_b) with w = exp(lse - max(lse_a, lse_b)), lse [...] =
    logsumexp(lse_a, lse_b); a side with LSE -inf weighs nothing, both -inf give zeros and -inf. Computed in
    float32 (float64 for float64 inputs), differentiable in all four; returns (out in out_a's dtype, lse)."""
    cd = _compute_dtype(out_a.dtype)
    la, lb = lse_a.to(cd), lse_b.to(cd)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m).detach()  # (a constant shift: no gradient)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    s = wa + wb
    empty = s == 0
    safe = torch.where(empty, torch.ones_like(s), s)
    out = (out_a.to(cd) * (wa / safe)[..., None] + out_b.to(cd) * (wb / safe)[..., None]).to(out_a.dtype)
    lse = torch.where(empty, torch.full_like(s, float("-inf")), m + torch.log(safe))
    return out, lse
