"""What the zoo models share: the attention call (ours or SDPA) and the KV cache.

backend="torch"    F.scaled_dot_product_attention (GQA through enable_gqa).
backend="llmkern"  llmkern.attention / llmkern.attention_with_kvcache when llmkern.ops.attention
                   is importable; otherwise SDPA, with a one-time warning saying so.
Layout everywhere: q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (SDPA's).
"""
import contextlib
import zlib
from typing import NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F

from llmkern._backend import warn_once
from llmkern.ops._checks import bool_arg, eager_fast_path, float32_finite, positive_int, with_data

BACKENDS = ("llmkern", "torch")
_OPS = {}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # (llmkern.ops.attention.FP8_DTYPES: KV-cache storage)


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def llmkern_ops():
    """(attention, attention_with_kvcache) from llmkern.ops.attention, None where missing. Resolved when this
    module is imported (below): a lazy fill while torch.compile traced was a guard that the call broke (a
    process's first compiled forward compiled twice)."""
    if "mod" not in _OPS:
        try:
            from llmkern.ops import attention as mod
        except Exception as exc:  # not landed yet, or broken: fall back, and say so once
            warn_once(("models", "attention-import"),
                      f"llmkern.models: llmkern.ops.attention is not importable ({exc!r}); "
                      f"backend='llmkern' uses torch SDPA for attention")
            mod = None
        _OPS["mod"] = mod
    mod = _OPS["mod"]
    return getattr(mod, "attention", None), getattr(mod, "attention_with_kvcache", None)


llmkern_ops()


def _sdpa(q, k, v, causal, dropout_p=0.0, key_padding_mask=None, sliding_window=None, q_start=None, scale=None,
          softcap=None):
    """SDPA with the zoo's masks. q_start: None, the queries are the last Tq keys (bottom-right); or
    [B] (long), row b's query r sits at key index q_start[b] + r (a cache with per-row lengths; keys
    past a row's last query are then stale slots, hidden by the causal mask). scale: SDPA's (None:
    1/sqrt(head_dim)); softcap: the scaled scores capped first (SDPA has no such option: _eager then)."""
    H, Hkv = q.shape[1], k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    mask = None

    def rows_cols():  # the key index i of each query row ([Tq, 1], or [B, 1, Tq, 1] per row), key indices j
        r = torch.arange(Tq, device=q.device).view(-1, 1)
        i = r + (Tk - Tq) if q_start is None else q_start.view(-1, 1, 1, 1) + r
        return i, torch.arange(Tk, device=q.device).view(1, -1)

    empty = None
    if key_padding_mask is not None:  # bool [B, Tk]
        i, j = rows_cols()
        mask = key_padding_mask[:, None, None, :] & ((j <= i) if causal else True)
        if sliding_window is not None:
            mask = mask & (j > i - sliding_window)
        # a query with no visible key (left padding) returns zeros, as llmkern.attention and transformers
        # do; SDPA would give NaN for it, so it sees its own key and its output is zeroed below
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | (empty & (j == i))
        causal = False
    elif sliding_window is not None:  # the window implies causal here (the zoo's attention always is)
        i, j = rows_cols()
        mask = (j <= i) & (j > i - sliding_window)
        causal = False
    elif causal and q_start is not None:  # per row: even a single query must not see the stale slots
        i, j = rows_cols()
        mask = j <= i
        causal = False
    elif causal and Tq != Tk:  # bottom-right aligned causal mask
        if Tq > 1:
            i, j = rows_cols()
            mask = j <= i
        causal = False
    if softcap is not None:
        if causal:  # (only Tq == Tk is left causal here)
            i, j = rows_cols()
            mask = j <= i
        out = _eager(q, k, v, mask, scale, softcap, dropout_p)
    else:
        kw = {"enable_gqa": True} if H != Hkv else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                             scale=scale, **kw)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _eager(q, k, v, mask, scale, softcap, dropout_p):
    """Attention with soft-capped scores (Gemma 2), transformers' eager order: s = (q k^T) * scale,
    s = softcap * tanh(s / softcap), masked, softmax in float32, rounded to q's dtype, times v.
    mask: bool, broadcastable to [B, H, Tq, Tk], True = visible (every row sees at least one key); None: all."""
    rep = q.shape[1] // k.shape[1]  # GQA: each K/V head serves `rep` query heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(p, dropout_p) if dropout_p > 0 else p, v)


MAX_HEAD_DIM = 256  # llmkern.attention's largest head dim (q/k and v); wider heads fall back to SDPA


def attend(q, k, v, *, backend, dropout_p=0.0, cache=None, layer=None, prefix=None, key_padding_mask=None,
           sliding_window=None, scale=None, softcap=None, context_parallel=None):
    """Causal self-attention of q over k/v; with a KV cache, k/v are appended first.

    prefix: optional (P_K, P_V) [B or 1, Hkv, P, D] prepended to the keys/values and always
    visible (prefix-tuning; the cache holds only the real tokens).
    key_padding_mask: optional bool [B, Tk] over all keys (cached + new), True = real token.
    sliding_window: W, or None: the query at key index i sees keys i-W+1..i only (transformers'
    sliding_window, kv_idx > q_idx - W). Indices count every key: cached, padding and prefix ones,
    as transformers' masks count cache positions.
    scale: the softmax scale (None: 1/sqrt(head_dim)); softcap: tanh soft-capping of the scaled scores,
    softcap * tanh(s / softcap), before the masks (Gemma 2); None: off.
    context_parallel: the sequence is sharded over ranks (llmkern.parallel.context_parallelize sets it):
    q/k/v are this rank's tokens, and the keys of every rank are gathered.
    A cache whose rows hold different lengths (KVCache.uniform False): see _attend_rows.
    Returns [B, H, Tq, D].
    """
    if context_parallel is not None:
        return context_parallel.attend(q, k, v, cache=cache, prefix=prefix, key_padding_mask=key_padding_mask,
                                       sliding_window=sliding_window, dropout_p=dropout_p, scale=scale,
                                       softcap=softcap)
    # llmkern's attention options: the window is (left, right) around the diagonal, W keys = itself + W-1 left
    opts = {} if sliding_window is None else {"window": (sliding_window - 1, 0)}
    opts.update({name: x for name, x in (("scale", scale), ("softcap", softcap)) if x is not None})
    attn_fn = kv_fn = None
    if backend == "llmkern" and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        warn_once(("attend-head-dim", q.shape[-1], v.shape[-1]),
                  f"llmkern: head dims {q.shape[-1]} / {v.shape[-1]} exceed llmkern.attention's 1..{MAX_HEAD_DIM}; "
                  f"this model's attention runs SDPA (plain torch)")
    elif backend == "llmkern":
        attn_fn, kv_fn = llmkern_ops()
        if dropout_p > 0:  # training: the dense kernel drops; the decode kernel has no dropout
            kv_fn = None
    if cache is not None and not cache.uniform:
        return _attend_rows(q, k, v, cache, layer, kv_fn, prefix, key_padding_mask, sliding_window, opts,
                            dropout_p, scale, softcap)
    if cache is not None:
        start = cache.seqlen
        # the split-K decode kernel is for a few new tokens; longer chunks take the prefill kernel
        if kv_fn is not None and 0 < start and q.shape[2] <= 16 and prefix is None:
            return _decode_step(q, k, v, cache, layer, kv_fn, opts, key_padding_mask)
        k, v = cache.append(layer, k, v)
        k, v = cache.read(k[:, :, :start + q.shape[2]], v[:, :, :start + q.shape[2]], q.dtype)
    k, v, key_padding_mask = _with_prefix(q.shape[0], k, v, prefix, key_padding_mask)
    if attn_fn is not None:
        kw = dict(opts, **({"dropout_p": dropout_p} if dropout_p > 0 else {}))
        if key_padding_mask is not None:
            kw["key_padding_mask"] = key_padding_mask
        return attn_fn(q, k, v, causal=True, **kw)
    return _sdpa(q, k, v, True, dropout_p, key_padding_mask, sliding_window, scale=scale, softcap=softcap)


def shared_input(x, *modules):
    """[m(x) for m in modules], for projections that read the same input (q / k / v, gate / up). A module
    class may run them together through its `forward_shared_input(x, modules)` (the tensor-parallel column
    layers do: one collective for all of them, as a fused QKV layer has); the model code stays the same."""
    run = getattr(type(modules[0]), "forward_shared_input", None)
    if run is not None and all(type(m) is type(modules[0]) for m in modules):
        return run(x, modules)
    return tuple(m(x) for m in modules)


def _with_prefix(B, k, v, prefix, key_padding_mask):
    """Prefix-tuning's keys/values prepended (bottom-right causal alignment keeps them visible to every
    query), and the padding mask extended over them."""
    if prefix is None:
        return k, v, key_padding_mask
    pk, pv = prefix
    k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    if key_padding_mask is not None:
        key_padding_mask = torch.cat([key_padding_mask.new_ones(B, pk.shape[2]), key_padding_mask], 1)
    return k, v, key_padding_mask


def _cache_mask(key_padding_mask, width):
    """attention_with_kvcache's key_padding_mask argument: the model's mask [B, keys so far] widened to the
    cache's `width` (the slots past it are beyond every row's length anyway); none without a mask."""
    if key_padding_mask is None:
        return {}
    extra = width - key_padding_mask.shape[1]
    return {"key_padding_mask": torch.nn.functional.pad(key_padding_mask.to(torch.bool), (0, extra), value=False)}


def _decode_step(q, k, v, cache, layer, kv_fn, opts, key_padding_mask):
    """A decode step (a few new tokens, every row at cache.seqlen) on attention_with_kvcache, which writes the new
    k / v itself (k=, v=: one Triton launch on the kernels' backend, where the cache's slice copies were two and
    the row lengths one more fill, per layer and step) at cache.lengths, every row's seqlen here."""
    if not _kernel_appends(cache, layer, k):
        k_cache, v_cache = cache.append(layer, k, v)
        if not cache.fp8:  # (a cache made in another dtype: read cast, as the op reads only q's dtype or float8)
            k_cache, v_cache = cache.read(k_cache, v_cache, q.dtype)
        lens = torch.full((q.shape[0],), cache.seqlen + k.shape[2], dtype=torch.int32, device=q.device)
        return kv_fn(q, k_cache, v_cache, lens, causal=True, **opts, **cache.scales(),
                     **_cache_mask(key_padding_mask, k_cache.shape[2]))
    cache.check_room(k.shape[2])
    return kv_fn(q, cache.k[layer], cache.v[layer], cache.lengths.to(q.device), k=k, v=v, causal=True, **opts,
                 **cache.scales(), **_cache_mask(key_padding_mask, cache.max_len))


def _kernel_appends(cache, layer, k):
    """Whether attention_with_kvcache may write this step's keys into the cache itself: the layer's buffers exist
    (its first append allocates them) and hold k's dtype (or are float8: the op quantizes as the cache does; a
    cache in another dtype is cast by KVCache.append's copy instead)."""
    k_cache = cache.k[layer]
    return k_cache is not None and (cache.fp8 or k_cache.dtype == k.dtype)


def _attend_rows(q, k, v, cache, layer, kv_fn, prefix, key_padding_mask, sliding_window, opts, dropout_p,
                 scale=None, softcap=None):
    """attend() over a cache whose rows hold different lengths (speculative decoding's per-row rollback):
    row b's T new keys go to slots lengths[b] .. lengths[b] + T - 1, and its query r sits at slot
    lengths[b] + r, seeing the slots up to its own (those past it, up to cache.seqlen + T, are stale).
    The llmkern backend runs llmkern.attention_with_kvcache with per-row cache_seqlens and the key padding
    mask, whatever the number of new tokens (the dense kernel has one causal offset for all rows)."""
    T = q.shape[2]
    span = cache.seqlen + T
    if kv_fn is not None and prefix is None and _kernel_appends(cache, layer, k):  # (the op appends: see _decode_step)
        cache.check_room(T)
        return kv_fn(q, cache.k[layer][:, :, :span], cache.v[layer][:, :, :span], cache.lengths.to(q.device), k=k,
                     v=v, causal=True, **opts, **cache.scales(), **_cache_mask(key_padding_mask, span))
    starts = cache.lengths.to(device=q.device, dtype=torch.long)  # before this forward's append
    k_cache, v_cache = cache.append(layer, k, v)
    k, v, scales = k_cache[:, :, :span], v_cache[:, :, :span], cache.scales()
    if not scales or kv_fn is None or prefix is not None:  # (only the decode kernel reads an fp8 cache itself)
        k, v, scales = *cache.read(k, v, q.dtype), {}
    k, v, key_padding_mask = _with_prefix(q.shape[0], k, v, prefix, key_padding_mask)
    if prefix is not None:
        starts = starts + prefix[0].shape[2]
    if kv_fn is not None:
        return kv_fn(q, k, v, (starts + T).to(torch.int32), causal=True, **opts, **scales,
                     **_cache_mask(key_padding_mask, k.shape[2]))
    return _sdpa(q, k, v, True, dropout_p, key_padding_mask, sliding_window, q_start=starts, scale=scale,
                 softcap=softcap)


def _quantize(x, dtype, scale):
    """llmkern.quantize_kv (imported on first use, like the attention ops)."""
    from llmkern.ops.attention import quantize_kv

    return quantize_kv(x, dtype, scale)


def _bytes(t):
    """A float8 tensor as its bytes (scatter_ has no float8 kernel on the CPU)."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def _shift(labels):
    """Labels aligned with input_ids -> the next token's label at every position (-100 at the last)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def _check_labels_dtype(labels):
    """labels as the zoo's losses take them: an int64 / int32 tensor (float labels were truncated to other tokens on
    the torch backend, bool ones made the ignored last position label 1: refused on every backend, as
    F.cross_entropy refuses them)."""
    if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 or int32 tensor of token ids (-100: ignored), got "
                         f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}")


def _trusted_if(checked):
    """llmkern.ops._checks.trusted() where the zoo has read the labels' values already (ZooModel._check_label_values),
    so the loss op does not read them again; else no block."""
    if not checked:
        return contextlib.nullcontext()
    from llmkern.ops import _checks

    return _checks.trusted()


class KVCache:
    """Static per-layer key/value buffers [B, Hkv, max_len, D] and each row's filled length (the values'
    buffers take the width of the first values written: multi-head latent attention's Dv < D).

    lengths  int32 [B] on the cache's device: row b holds keys at slots [0, lengths[b]).
    seqlen   a host int >= every row's length: the slots a forward reads are [0, seqlen + T).
    uniform  True while every row is known to hold exactly seqlen tokens (a new cache, crop(0), and a
             uniform cache after crop(int), advance or reorder): a forward then writes all rows at one
             offset (a slice) and the attention has one causal offset for the batch. After a per-row
             crop it is False: row b writes its T new keys at its own offset lengths[b] (a scatter),
             its queries see the slots up to their own (zoo attention: _attend_rows) and its positions
             count from lengths[b]; seqlen is then an upper bound (exact when crop was given max_n).

    The model advances every row by its T new tokens once per forward (advance), with no host
    sync. `reorder(idx)` gathers batch rows (beam search) with their lengths; `crop(n)` cuts lengths
    back (speculative decoding's rollback; n an int for all rows or a [B] tensor per row).

    dtype float8_e4m3fn / float8_e5m2: an fp8 cache (half a 16-bit cache's bytes, vLLM's kv_cache_dtype="fp8"):
    keys are stored as llmkern.quantize_kv(k, dtype, k_scale) (values: v_scale; floats, per tensor, default 1.0
    as vLLM's without calibrated scales) and every attention reads them back as stored: the decode kernel
    directly (attention_with_kvcache's k_scale / v_scale), the other paths through a dequantized copy (read()).
    """

    latent = False  # (LatentKVCache: multi-head latent attention's compressed cache)

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype=None, device=None, k_scale=1.0,
                 v_scale=1.0):
        n_layer, batch, n_kv_head, max_len, head_dim = (positive_int(f"KVCache: {name}", v) for name, v in (
            ("n_layer", n_layer), ("batch", batch), ("n_kv_head", n_kv_head), ("max_len", max_len),
            ("head_dim", head_dim)))
        self.shape = (batch, n_kv_head, max_len, head_dim)
        if batch * n_kv_head * max_len * head_dim >= 2 ** 63:  # (torch.zeros overflowed at the first write)
            raise ValueError(f"KVCache: its buffers (batch, n_kv_head, max_len, head_dim) = {self.shape} would hold "
                             f"2**63 elements or more; max_len={max_len} is too large")
        # (an integer dtype truncated the keys silently, bool or a string failed in torch.zeros at the first write)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"KVCache: dtype must be None (the keys' own) or a floating-point torch.dtype, "
                             f"got {dtype!r}")
        if device is not None:  # (a bad name raised torch's device-string error, which names no argument)
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f"KVCache: device must be None or a torch device, got {device!r} ({e})") from None
        self.dtype, self.device = dtype, device  # None: those of the first keys written (autocast-safe)
        self.fp8 = dtype in FP8_DTYPES
        for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
            # (the scales are float32 in the kernels: 1e39 is inf there, 1e-46 zero)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < float("inf") \
                    or not float32_finite(x, nonzero=True):
                raise ValueError(f"KVCache: {name} must be a finite positive float (in float32's range), got {x!r}")
        if not self.fp8 and (k_scale != 1.0 or v_scale != 1.0):
            raise ValueError(f"KVCache: k_scale / v_scale are for a float8 cache (dtype {FP8_DTYPES}), got dtype {dtype}")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.max_len = max_len
        self.seqlen = 0
        self.uniform = True
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def check_room(self, T):
        """Raise where T more tokens would not fit (before anything is written)."""
        if self.seqlen + T > self.max_len:
            raise ValueError(f"KVCache: {self.seqlen} + {T} tokens exceed max_len={self.max_len}")

    def append(self, layer, k, v):
        """Write k/v [B, Hkv, T, D] at each row's offset; returns the layer's whole buffers."""
        T = k.shape[2]
        self.check_room(T)
        if self.k[layer] is None:
            kw = dict(dtype=self.dtype or k.dtype, device=self.device or k.device)
            self.k[layer] = torch.zeros(self.shape, **kw)
            self.v[layer] = torch.zeros(self.shape[:3] + v.shape[3:], **kw)
        kc, vc = self.k[layer], self.v[layer]
        if self.fp8:
            k, v = _quantize(k, kc.dtype, self.k_scale), _quantize(v, vc.dtype, self.v_scale)
        if self.uniform:
            kc[:, :, self.seqlen:self.seqlen + T] = k
            vc[:, :, self.seqlen:self.seqlen + T] = v
        else:
            slots = self.lengths.to(device=kc.device, dtype=torch.long)[:, None] + torch.arange(T, device=kc.device)
            idx = slots[:, None, :, None]
            _bytes(kc).scatter_(2, idx.expand(k.shape), _bytes(k.to(kc.dtype)))
            _bytes(vc).scatter_(2, idx.expand(v.shape), _bytes(v.to(vc.dtype)))
        return kc, vc

    def read(self, k, v, dtype):
        """Cached keys/values (buffers or slices of them) as attention reads them: in `dtype`, an fp8 cache's
        dequantized (x * scale), a cache made in another dtype (new_cache(dtype=)) cast."""
        if not self.fp8:
            return (k, v) if k.dtype == dtype else (k.to(dtype), v.to(dtype))
        return ((k.to(torch.float32) * self.k_scale).to(dtype), (v.to(torch.float32) * self.v_scale).to(dtype))

    def scales(self):
        """attention_with_kvcache's scale arguments for this cache ({} unless fp8): float32 [kv_heads] tensors made
        once on the buffers' device (floats would cost two fills per layer and decode step)."""
        if not self.fp8:
            return {}
        dev = next(t.device for t in self.k if t is not None)
        if getattr(self, "_scale_t", None) is None or self._scale_t[0].device != dev:
            self._scale_t = tuple(torch.full((self.shape[1],), x, dtype=torch.float32, device=dev)
                                  for x in (self.k_scale, self.v_scale))
        return {"k_scale": self._scale_t[0], "v_scale": self._scale_t[1]}

    def advance(self, T):
        self.seqlen += T
        self.lengths = self.lengths + T  # (not in place: a crop may have been given the caller's tensor)

    def crop(self, n, max_n=None):
        """Keep the first n cached tokens (speculative decoding's rollback of rejected drafts): a length
        update, no copy; the next append overwrites what lay past n. transformers' Cache.crop.

        n: an int, every row (rows holding fewer keep theirs), in [0, seqlen]; or an int tensor [B],
        row b keeps n[b] <= lengths[b] tokens (checked where the cache is on the CPU; on a GPU that
        would cost a host sync). max_n: a host int >= max(n), the new seqlen (the caller usually knows
        it); None keeps seqlen as the bound (or takes max(n) on the CPU)."""
        if torch.is_tensor(n):
            return self._crop_rows(with_data("KVCache.crop: n", n), max_n)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.seqlen:
            raise ValueError(f"KVCache.crop: n must be an int in [0, {self.seqlen}] or a tensor [batch], got {n!r}")
        self.lengths = self.lengths.clamp(max=n) if not self.uniform else torch.full_like(self.lengths, n)
        self.seqlen = n
        self.uniform = self.uniform or n == 0

    def _crop_rows(self, n, max_n):
        B = self.shape[0]
        if tuple(n.shape) != (B,) or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
            raise ValueError(f"KVCache.crop: per-row n must be an int tensor [{B}], got {n.dtype} {tuple(n.shape)}")
        n = n.to(device=self.lengths.device, dtype=torch.int32, copy=True)
        if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, int)
                                  or not 0 <= max_n <= self.seqlen):
            raise ValueError(f"KVCache.crop: max_n must be an int in [0, {self.seqlen}], got {max_n!r}")
        if n.device.type == "cpu" and B:  # values checked where that needs no device sync
            top = int(n.max())
            if bool((n < 0).any()) or bool((n > self.lengths).any()) or (max_n is not None and top > max_n):
                raise ValueError(f"KVCache.crop: n must lie in [0, lengths] per row (and <= max_n={max_n}); "
                                 f"lengths {self.lengths.tolist()}, got {n.tolist()}")
            max_n = top if max_n is None else max_n
        self.lengths = n
        self.seqlen = self.seqlen if max_n is None else max_n
        self.uniform = False

    def reorder(self, idx):
        """Row i becomes row idx[i] (a 1-D integer tensor; its length is the new batch: beam search spreads
        each prompt's row over its beams). Indices outside [0, batch) raise ValueError where idx is on the
        CPU (on a GPU the check would cost a host sync)."""
        B = self.lengths.shape[0]
        if not torch.is_tensor(idx) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"KVCache.reorder: idx must be a 1-D int64 / int32 tensor, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        with_data("KVCache.reorder: idx", idx)
        if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= B):
            raise ValueError(f"KVCache.reorder: idx must hold row indices in [0, {B}) (the cache's batch), got "
                             f"values in [{int(idx.min())}, {int(idx.max())}]")
        self.k = [None if t is None else t.index_select(0, idx.to(t.device)) for t in self.k]
        self.v = [None if t is None else t.index_select(0, idx.to(t.device)) for t in self.v]
        self.lengths = self.lengths.index_select(0, idx.to(self.lengths.device))
        self.shape = (idx.shape[0],) + tuple(self.shape[1:])  # (the layers allocated later take the new batch)

    @property
    def nbytes(self):
        """Bytes of the buffers allocated so far (a layer's are allocated at its first append)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class LatentKVCache(KVCache):
    """Multi-head latent attention's compressed cache (DeepSeek-V2/V3; FlashMLA's layout): per layer one buffer
    [B, 1, max_len, R + Dr] holding each token's normalised latent c_kv [R] and its rotated shared key k_pe [Dr]:
    R + Dr numbers per token and layer instead of the full cache's H * (nope + rope + Dv) (DeepSeek-V3: 576
    against 40960). MLAttention (deepseek.py) decodes against it with kv_b_proj absorbed into the query and
    the output: the keys are the buffer itself (one head, MQA), the values its first R channels, a view.

    Lengths, crop, advance and reorder are KVCache's (the per-row semantics hold as they are); only append
    differs: it writes the latent alone and returns (buffer, buffer[..., :R])."""

    latent = True

    def __init__(self, n_layer, batch, max_len, kv_rank, rope_dim, dtype=None, device=None, kv_scale=1.0):
        # (a float8 latent: one scale for the latent and its rotary part, mla_decode's kv_scale; read() and
        # scales() see it as both k_scale and v_scale, the values being the latent's first channels)
        # (the widths are checked apart: a negative kv_rank summed into a valid width sliced the values wrongly)
        kv_rank, rope_dim = (positive_int(f"LatentKVCache: {name}", v) for name, v in (("kv_rank", kv_rank),
                                                                                        ("rope_dim", rope_dim)))
        super().__init__(n_layer, batch, 1, max_len, kv_rank + rope_dim, dtype, device, kv_scale, kv_scale)
        self.kv_rank = kv_rank

    def append(self, layer, k, v=None):
        """Write the latent k [B, 1, T, R + Dr] at each row's offset (v, if given, must be k's first R channels,
        which the buffer already holds: it is not written). Returns (keys [B, 1, max_len, R + Dr], values
        [B, 1, max_len, R], a strided view of the keys: no copy)."""
        if k.dim() != 4 or tuple(k.shape[1::2]) != self.shape[1::2]:
            raise ValueError(f"LatentKVCache: the latent must be [batch, 1, T, {self.shape[3]}], got {tuple(k.shape)}")
        T = k.shape[2]
        self.check_room(T)
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, dtype=self.dtype or k.dtype, device=self.device or k.device)
        kc = self.k[layer]
        if self.fp8:
            k = _quantize(k, kc.dtype, self.k_scale)
        if self.uniform:
            kc[:, :, self.seqlen:self.seqlen + T] = k
        else:
            slots = self.lengths.to(device=kc.device, dtype=torch.long)[:, None] + torch.arange(T, device=kc.device)
            _bytes(kc).scatter_(2, slots[:, None, :, None].expand(k.shape), _bytes(k.to(kc.dtype)))
        return kc, kc[..., :self.kv_rank]


HEAD_ALIGN = 64  # LM-head rows are padded to a multiple of this on CUDA (see ZooModel.head_logits)


def padded_linear(h, weight, multiple=HEAD_ALIGN):
    """F.linear(h, weight) [..., N] computed as h times a copy of weight padded with zero rows to a
    multiple of `multiple`, returned as a view with the padded row stride (same values and
    gradients; see ZooModel.head_logits for why)."""
    N = weight.shape[0]
    return F.linear(h, F.pad(weight, (0, 0, 0, -N % multiple)))[..., :N]


class HFModule(NamedTuple):
    """Where a zoo nn.Linear lives in the equivalent transformers model (see GPT/Llama.hf_module_names).

    name    the module's name in GPT2LMHeadModel / LlamaForCausalLM
    rows    None: the zoo layer is that whole module. A slice: the zoo layer is these output rows
            of it (GPT-2's c_attn computes q, k and v in one layer: rows [0, d), [d, 2d), [2d, 3d)).
            A tuple of row indices, ascending: the zoo layer's row j is the module's row rows[j] (GPT-NeoX's
            query_key_value interleaves q, k and v per head)
    conv1d  the HF module is a GPT-2 Conv1D (weight stored [in, out]; PEFT's fan_in_fan_out)
    """
    name: str
    rows: Union[None, slice, Tuple[int, ...]] = None
    conv1d: bool = False


class ZooModel(torch.nn.Module):
    """What GPT and Llama share: the backend switch, the KV cache, the loss, optimizer groups, activation
    recomputation."""

    gradient_checkpointing = False  # (an instance attribute once enabled)

    def gradient_checkpointing_enable(self, enable=True):
        """Full activation recomputation (transformers' name for it): in training, each block keeps only its
        input for the backward and runs its forward again there (torch.utils.checkpoint, non-reentrant),
        so activation memory is one [B, T, d] tensor per layer plus one block's working set, for a second
        forward's FLOPs (llmkern.flops.hfu counts them). The RNG state is replayed, so dropout masks
        (llmkern's seeds are drawn from torch's generator) are the same in both forwards. Off in eval,
        under torch.no_grad and with a KV cache. Returns the model."""
        if not isinstance(enable, bool):
            raise TypeError(f"gradient_checkpointing_enable: enable must be a bool, got {type(enable).__name__}")
        self.gradient_checkpointing = enable
        return self

    def gradient_checkpointing_disable(self):
        return self.gradient_checkpointing_enable(False)

    def run_block(self, block, *args, cache=None, **kwargs):
        """block(*args, cache=cache, **kwargs), recomputed in the backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, cache=None, use_reentrant=False, **kwargs)
        return block(*args, cache=cache, **kwargs)

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = check_backend(value)
        for m in self.modules():
            if m is not self and hasattr(m, "backend_name"):
                m.backend_name = value

    def attach_prefix(self, prefix):
        """Attach prefix-tuning: `prefix(batch)` returns per layer (P_K, P_V) [batch, n_kv_head, P,
        head_dim] (llmkern.peft.PrefixTuning does); None detaches. The prefix's parameters become
        the model's (train them, freeze the rest)."""
        if prefix is not None and not callable(prefix):
            raise ValueError(f"attach_prefix: prefix must be callable(batch) -> [(P_K, P_V)] * n_layer, got {prefix!r}")
        self.prefix_tuning = prefix
        return self

    @staticmethod
    def prefix_length(prefixes):
        """P, the prefix-tuning positions in front of every row (0 without a prefix)."""
        return 0 if not prefixes or prefixes[0] is None else int(prefixes[0][0].shape[2])

    def prefixes(self, batch):
        prefix = getattr(self, "prefix_tuning", None)
        if prefix is None:
            return [None] * self.config.n_layer
        c = self.config
        if self._cache_kv_heads() != c.n_kv_head:  # (each rank holds 1/p of the heads; the prefixes all of them)
            raise NotImplementedError("prefix tuning on a tensor-parallel model (tensor_parallelize) is not supported: "
                                      "the prefixes hold every key/value head, each rank only its share of them")
        kvs = list(prefix(batch))
        if len(kvs) != c.n_layer:
            raise ValueError(f"prefix_tuning gave {len(kvs)} layers of prefixes, the model has {c.n_layer}")
        for pk, pv in kvs:
            if pk.dim() != 4 or pk.shape[1] != c.n_kv_head or pk.shape[3] != c.head_dim or pv.shape != pk.shape:
                raise ValueError(f"prefix_tuning: P_K/P_V must be [batch, n_kv_head={c.n_kv_head}, P, "
                                 f"head_dim={c.head_dim}], got {tuple(pk.shape)} / {tuple(pv.shape)}")
        return kvs

    # new_cache's default for `latent` (set it on a model with multi-head latent attention, e.g.
    # `model.latent_cache = True`, and generate() and every other new_cache caller get the compressed cache)
    latent_cache = False
    # new_cache's default dtype (None: the keys' own); torch.float8_e4m3fn / float8_e5m2 gives generate() and
    # every other new_cache caller an fp8 KV cache, read by the decode kernel with kv_cache_scales
    kv_cache_dtype = None
    kv_cache_scales = (1.0, 1.0)

    def new_cache(self, batch, max_len=None, dtype=None, device=None, latent=None):
        """An empty KVCache for `batch` sequences of up to `max_len` tokens (default block_size);
        its dtype is `dtype` (default: the model's `kv_cache_dtype` attribute, None), or that of the first keys
        written (the autocast dtype under autocast). A float8 dtype gives an fp8 cache (KVCache) whose scales
        are the model's `kv_cache_scales` (k_scale, v_scale), default (1.0, 1.0); a float8 latent cache takes
        k_scale for the whole latent row.
        latent=True (default: the model's `latent_cache` attribute, False): multi-head latent attention's
        compressed LatentKVCache, kv_lora_rank + rope channels per token and layer (DeepSeek; ValueError
        for a model without MLA). Under tensor parallelism it is the same on every rank: the latent is
        not per head."""
        c = self.config
        p = next(self.parameters())
        batch = positive_int("new_cache: batch", batch)
        max_len = c.block_size if max_len is None else positive_int("new_cache: max_len", max_len)
        latent = self.latent_cache if latent is None else bool_arg("new_cache: latent", latent)
        dtype = self.kv_cache_dtype if dtype is None else dtype
        if not isinstance(latent, bool):
            raise TypeError(f"new_cache: latent must be a bool, got {type(latent).__name__}")
        if latent:
            if not getattr(c, "kv_lora_rank", 0):
                raise ValueError("new_cache: latent=True needs multi-head latent attention (config.kv_lora_rank > 0, "
                                 "DeepSeek); this model caches per-head keys and values")
            return LatentKVCache(c.n_layer, batch, max_len, c.kv_lora_rank, c.rope_dim,
                                 dtype, device or p.device, self.kv_cache_scales[0] if dtype in FP8_DTYPES else 1.0)
        kv_heads = self._cache_kv_heads()
        scales = self.kv_cache_scales if dtype in FP8_DTYPES else (1.0, 1.0)
        if not isinstance(scales, (tuple, list)) or len(scales) != 2:
            raise ValueError(f"new_cache: kv_cache_scales must be (k_scale, v_scale), got {scales!r}")
        return KVCache(c.n_layer, batch, kv_heads, max_len, c.head_dim,
                       dtype, device or p.device, *scales)

    def _cache_kv_heads(self):
        """The key/value heads a (full) KVCache of this model holds: per rank, as tensor_parallelize divides the
        attention modules' n_kv_head."""
        return next((m.n_kv_head for m in self.modules() if m is not self and hasattr(m, "n_kv_head")),
                    self.config.n_kv_head)

    def _check_cache(self, cache, B, device):
        """A cache passed to forward must fit the model and the batch (else torch fails deep inside, or a
        batch-1 input broadcasts over a larger cache's rows)."""
        c = self.config
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache (model.new_cache(batch, max_len)), got {type(cache).__name__}")
        rows = cache.lengths.shape[0]
        if rows != B:
            raise ValueError(f"cache: its batch is {rows}, input_ids' {B} (model.new_cache(batch={B}, ...))")
        if cache.device is not None and cache.lengths.device != device:  # (failed inside the attention)
            raise ValueError(f"cache: it is on {cache.lengths.device}, input_ids on {device} "
                             f"(model.new_cache(..., device=))")
        if getattr(cache, "_fits_model", None) == id(self):  # (checked at its first forward: a decode step is
            return                                                # host-bound, and the walk below visits every module)
        if len(cache.k) != c.n_layer:
            raise ValueError(f"cache: it has {len(cache.k)} layers, the model {c.n_layer}")
        if cache.latent:
            if not getattr(c, "kv_lora_rank", 0):
                raise ValueError("cache: a LatentKVCache needs a model with multi-head latent attention "
                                 "(config.kv_lora_rank > 0)")
            want = (1, c.kv_lora_rank + c.rope_dim)
            what = "1 head of kv_lora_rank + qk_rope_head_dim channels"
        else:
            want = (self._cache_kv_heads(), c.head_dim)
            what = "n_kv_head heads of head_dim channels"
        got = (cache.shape[1], cache.shape[3])
        if got != want:
            raise ValueError(f"cache: it holds {got[0]} key/value heads of {got[1]} channels, the model needs "
                             f"{want[0]} of {want[1]} ({what}); make it with model.new_cache")
        cache._fits_model = id(self)

    def head_logits(self, h):
        """lm_head(h) [..., V]. On CUDA, when V is not a multiple of 64 (GPT-2's 50257), the product
        runs against a zero-padded copy of the weight and the logits come back as a view with the
        padded row stride: cuBLAS picks its fast kernels only for 16-byte aligned leading
        dimensions. On an H100, an unpadded GPT-2 124M training step (B=8, T=1024) spent 15.4 of its
        43 ms of kernel time in three align-1 GEMMs of the LM head (logits, dlogits W, dlogitsᵀ h);
        the padding costs a copy of the weight and of the logits' gradient. config.logit_softcap (Gemma 2/3):
        the logits come back soft-capped, c * tanh(logits / c), as transformers returns them;
        config.logits_scaling (Granite): divided by it first."""
        head = self.lm_head
        V = head.weight.shape[0]
        if (not h.is_cuda or type(head) is not torch.nn.Linear or head.bias is not None or V % HEAD_ALIGN == 0
                or h.numel() // h.shape[-1] < 512):
            logits = head(h)
        else:
            logits = padded_linear(h, head.weight)
        div = getattr(self.config, "logits_scaling", 1.0)
        if div != 1.0:
            logits = logits / div
        cap = getattr(self.config, "logit_softcap", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def lm_loss(self, logits, labels):
        """Next-token cross entropy, Hugging Face style: labels align with input_ids and are shifted
        here; -100 is ignored. backend="llmkern": llmkern.cross_entropy, which reads the (bf16)
        logits once in the forward and once in the backward instead of upcasting a float32 copy."""
        shifted = self.next_token_labels(labels)
        V = logits.shape[-1]
        checked = self._check_label_values(shifted, V)
        if getattr(self, "_backend", "torch") == "llmkern":
            from llmkern.ops.cross_entropy import cross_entropy

            with _trusted_if(checked):
                loss = cross_entropy(logits, shifted, ignore_index=-100)
            return self.global_loss(loss, shifted)
        flat = logits.reshape(-1, V)  # a view: no copy of the [B, T, V] logits
        if flat.dtype in (torch.float16, torch.bfloat16):  # (autocast would upcast it all the same; float64 stays)
            flat = flat.float()
        return self.global_loss(F.cross_entropy(flat, shifted.reshape(-1).long(), ignore_index=-100), shifted)

    def fused_lm_loss(self, h, labels):
        """lm_loss(head_logits(h), labels) without the logits: llmkern.linear_cross_entropy over the
        LM head's weight (backend="llmkern", a plain nn.Linear head), the vocabulary-parallel loss of a
        sharded head (llmkern.parallel.vocab); otherwise the logits path."""
        head = self.lm_head
        cap = getattr(self.config, "logit_softcap", None)
        div = getattr(self.config, "logits_scaling", 1.0)
        if div != 1.0 and (hasattr(head, "vocab_parallel_loss") or (
                getattr(self, "_backend", "torch") == "llmkern" and type(head) is torch.nn.Linear)):
            # Granite (the Llama's head has no bias): the fused losses take no logit scale, and (h / s) W equals
            # (h W) / s up to rounding without holding the logits
            h = h / div
        if hasattr(head, "vocab_parallel_loss"):  # tensor_parallelize(..., vocab_parallel=True)
            shifted = self.next_token_labels(labels)
            return self.global_loss(head.vocab_parallel_loss(h, shifted, softcap=cap), shifted)
        if getattr(self, "_backend", "torch") != "llmkern" or type(head) is not torch.nn.Linear:
            return self.lm_loss(self.head_logits(h), labels)
        from llmkern.ops.cross_entropy import linear_cross_entropy

        shifted = self.next_token_labels(labels)
        with _trusted_if(self._check_label_values(shifted, head.weight.shape[0])):
            loss = linear_cross_entropy(h, head.weight, shifted, bias=head.bias, ignore_index=-100, softcap=cap)
        return self.global_loss(loss, shifted)

    @staticmethod
    def _check_label_values(shifted, V):
        """The one check of the (shifted) labels' values, on both backends, before the loss: token ids in
        [0, vocab_size) or -100. The torch backend's F.cross_entropy raised IndexError "Target 89 is out of bounds"
        (no argument named), and llmkern.cross_entropy's own check worded it differently ("labels must be in
        [0, 50) or equal ignore_index (-100)"): one message for the same mistake on either backend. Read on the CPU
        only, as input_ids are (a host sync on CUDA), in eager mode. Returns whether the values were read (the
        llmkern ops then run inside _checks.trusted(): no second pass over them)."""
        if shifted.device.type != "cpu" or not shifted.numel() or not eager_fast_path(shifted):
            return False
        bad = (shifted != -100) & ((shifted < 0) | (shifted >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must be token ids in [0, vocab_size={V}) or -100 (ignored), got "
                             f"{int(shifted[bad][0])}")
        return True

    # Hook points of context parallelism (llmkern.parallel.context_parallelize sets `context_parallel`:
    # the sequence is sharded over ranks); without it, the plain single-sequence behaviour.
    context_parallel = None

    def positions(self, start, T, device):
        """Positions [T] of the T new tokens after `start` cached ones; under context parallelism, the
        absolute positions of this rank's shard of the sequence."""
        if self.context_parallel is not None:
            return self.context_parallel.positions(T, self.config.block_size, device)
        return torch.arange(start, start + T, device=device)

    def next_token_labels(self, labels):
        """The next token's label at every position (-100 at the last; across the shards under context
        parallelism)."""
        _check_labels_dtype(labels)  # (also for callers that skip forward: PipelineParallel calls the losses)
        return _shift(labels) if self.context_parallel is None else self.context_parallel.next_token_labels(labels)

    def global_loss(self, loss, shifted):
        """The mean loss over this rank's tokens -> over all tokens (context parallelism; else unchanged)."""
        return loss if self.context_parallel is None else self.context_parallel.global_mean(loss, shifted)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, torch.nn.Embedding)
                     and getattr(m, "_position", False))
        return n

    def configure_optimizer(self, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=None):
        """AdamW with weight decay on matrices only (nanoGPT); fused on CUDA by default."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if fused is None:
            fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    # ---- meta-device construction (torchtitan's flow; from_hf's loading) -----------------------------------
    #
    #     with torch.device("meta"):
    #         model = Llama(cfg)                 # no memory, no random init
    #     model.to_empty(device="cuda")          # the buffers (RoPE frequencies) are computed again here
    #     model.init_weights()                   # training from scratch; or model.load_state_dict(sd)
    #
    # to_empty gives every module a new parameter, which unties a tied LM head, and leaves the non-persistent
    # buffers (never in a state dict) garbage: _apply ties the head again and recomputes the buffers, and so does
    # load_state_dict(assign=True) straight from the meta device.

    def _buffer_values(self):
        """{name: tensor} of the model's non-persistent buffers as the constructor computes them (a subclass's)."""
        return {}

    def init_buffers(self, device=None):
        """Compute the non-persistent buffers again, as the constructor does (Llama's RoPE frequencies inv_freq /
        inv_freq_local / inv_freq_long, float32; Gemma's embed_scale, in the dtype the model cast it to), on `device`
        (default: the parameters'). to_empty and load_state_dict(assign=True) from the meta device call it; call it
        yourself after materialising the parameters some other way. Returns the model."""
        if device is None:
            device = self._parameter_device()
        else:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f"init_buffers: device must be None or a torch device, got {device!r} ({e})") from None
        with torch.device("cpu"):  # (where the constructor computes them, whatever the default device)
            values = self._buffer_values()
        for name, value in values.items():
            old = self._buffers.get(name)
            self._buffers[name] = value.to(device=device, dtype=value.dtype if old is None else old.dtype)
        return self

    def init_weights(self, seed=None):
        """The constructor's initialisation of every parameter, drawn again, and the buffers (init_buffers): for a model
        built on the meta device and materialised with to_empty, to train from scratch. Returns the model.

        seed None: drawn from torch's default generator, module by module in the constructor's order. seed an int:
        each parameter from a generator of its own, seeded by `seed` and the parameter's name (a tied LM head: the
        embedding's), so that the weights are the same however the model is split: a pipeline stage
        (pipeline_parallelize keeps the names) gets the unsharded model's init of its own layers, and the tied
        embedding's copies on the first and last stage are equal. A pipeline stage needs seed (drawn in module
        order, stages seeded alike would hold equal layers and unequal tied copies). Tensor-, expert- or
        vocabulary-parallel layers: NotImplementedError (a shard must be its part of one draw of the whole weight:
        initialise before parallelising, or load a checkpoint). Adapter modules (LoRA / DoRA, llmkern.peft's or
        PEFT's): ValueError (their inits start from the base weights: initialise first, then add them)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"init_weights: seed must be None or an int >= 0, got {seed!r}")
        sharded = sorted({type(m).__name__ for m in self.modules()
                          if type(m).__module__.startswith("llmkern.parallel")})
        if sharded:
            raise NotImplementedError(f"init_weights: the model holds parallel layers ({', '.join(sharded)}): "
                                      f"initialise it before parallelising it, or load a checkpoint (to_empty + "
                                      f"load_state_dict)")
        adapters = sorted({type(m).__name__ for m in self.modules()
                           if type(m).__module__.startswith(("llmkern.peft", "peft."))})
        if adapters:  # (their own inits, e.g. DoRA's magnitude from the base weight, PiSSA's from its SVD, an
            # adapter's zero up-projection, would no longer hold after the base weights are drawn again)
            raise ValueError(f"init_weights: the model holds adapter modules ({', '.join(adapters)}): initialise "
                             f"the model first, then add the adapters")
        if seed is None and getattr(self, "pipeline_parallel", None) is not None:
            raise ValueError("init_weights: a pipeline stage needs seed= (an int, the same on every rank): drawn in "
                             "module order, stages seeded alike would hold equal layers and unequal tied copies")
        with torch.no_grad():
            self._init_parameters(seed)
        return self.init_buffers()

    def _init_parameters(self, seed):
        raise NotImplementedError(f"{type(self).__name__} does not implement init_weights")

    def _init_dense_modules(self, seed):
        """normal(0, 0.02) weights of the linear layers and embeddings, zero biases, LayerNorms of gain 1 and bias 0
        (GPT's and NeoX's constructor init)."""
        for name, m in self.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                self._normal_(m.weight, 0.02, seed, name + ".weight")
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.LayerNorm):  # (ones and zeros: drawn from no generator)
                m.reset_parameters()

    def _normal_(self, tensor, std, seed, name):
        """normal(0, std) into `tensor`, from torch's default generator (seed None) or from one seeded by `seed` and
        the parameter name `name` (a tied LM head's: the embedding's). A LoRA / DoRA wrapper's base layer draws under
        the unwrapped name: the weights must not depend on which layers carry adapters (a pipeline's two copies of a
        tied embedding, one wrapped, would differ)."""
        gen = None
        if seed is not None and tensor.device.type != "meta":
            name = name.replace(".base_layer", "")
            if name == "lm_head.weight" and self.config.tie_embeddings:
                name = "wte.weight" if hasattr(self, "wte") else "embed_tokens.weight"
            gen = torch.Generator(device=tensor.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()))
                                                                    % 2 ** 63)
        torch.nn.init.normal_(tensor, mean=0.0, std=std, generator=gen)

    def tie_weights(self):
        """Make the LM head's weight the token embedding's parameter again (config.tie_embeddings; transformers'
        name). Nothing when the model is untied or holds only one of the two (a pipeline stage). Returns the model."""
        if self.config.tie_embeddings:
            self._tie()
        return self

    def _tie(self):
        emb, head = self._embedding_and_head()
        if emb is not None and head is not None and head.weight is not emb.weight:
            head.weight = emb.weight

    def _embedding_and_head(self):
        """(the module holding the token embedding's weight, the one holding the LM head's), each None where absent
        (a pipeline stage); LoRA / DoRA wrappers are looked through to their base layers."""
        def owner(m):
            while m is not None and "weight" not in m._parameters and hasattr(m, "base_layer"):
                m = m.base_layer
            return m if m is not None and "weight" in m._parameters else None

        emb = getattr(self, "wte", None) if hasattr(self, "wte") else getattr(self, "embed_tokens", None)
        return owner(emb), owner(getattr(self, "lm_head", None))

    def _weights_tied(self):
        emb, head = self._embedding_and_head()
        return emb is not None and head is not None and head.weight is emb.weight

    def _parameter_device(self):
        """The device of the first parameter not on the meta device (meta when all are; CPU without parameters)."""
        first = None
        for p in self.parameters():
            if p.device.type != "meta":
                return p.device
            first = p.device if first is None else first
        return torch.device("cpu") if first is None else first

    def _meta_buffers(self):
        """Whether a non-persistent buffer is on the meta device."""
        return any(b is not None and b.is_meta for n, b in self._buffers.items()
                   if n in self._non_persistent_buffers_set)

    def _apply(self, fn, *args, **kwargs):
        tied, meta = self._weights_tied(), self._meta_buffers()
        super()._apply(fn, *args, **kwargs)
        if tied:  # (to_empty makes one new parameter per module: the head's is no longer the embedding's)
            self._tie()
        if meta and not self._meta_buffers():  # (materialised from meta, e.g. to_empty within a parent's: garbage)
            self.init_buffers()
        return self

    def to_empty(self, *, device, recurse=True):
        """nn.Module's, then the buffers computed on `device` (init_buffers): to_empty leaves them uninitialised
        memory, and they are in no state dict a load would fill them from."""
        super().to_empty(device=device, recurse=recurse)
        return self.init_buffers(device)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's; with assign=True the tied LM head stays tied (to the embedding's new parameter) and buffers
        left on the meta device are computed (init_buffers)."""
        tied = self._weights_tied()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if tied:  # (assign=True gives each module its own new parameter)
            self._tie()
        if self._meta_buffers() and self._parameter_device().type != "meta":
            self.init_buffers()
        return result

    # position_ids index a table of learned positions (GPT): integer ids in [0, block_size); else (RoPE) any real
    # positions
    _table_positions = False

    def _token_embedding_weight(self):
        """The token embedding's weight (its device is the one input_ids must be on), or None where that is not
        known: no such module, or parameters not materialised (meta: offloaded, or placed by hooks)."""
        emb = getattr(self, "wte", None) if hasattr(self, "wte") else getattr(self, "embed_tokens", None)
        w = getattr(emb, "weight", None)
        if not torch.is_tensor(w) or w.device.type == "meta" or hasattr(emb, "_hf_hook"):
            return None
        return w

    def _check_position_ids(self, position_ids, input_ids):
        """The caller's position_ids: a real tensor on input_ids' device; integer ids in [0, block_size) for a
        learned position table (checked on the CPU, as input_ids are). A list raised AttributeError, a float or
        out-of-range one torch's embedding errors (GPT), a bool one was taken as positions 0 / 1 (Llama)."""
        p = position_ids
        if not torch.is_tensor(p) or p.dtype == torch.bool or p.is_complex() or (
                self._table_positions and p.is_floating_point()):
            kind = "an integer" if self._table_positions else "an integer or floating-point"
            raise ValueError(f"position_ids must be {kind} tensor [batch, seq], got "
                             f"{p.dtype if torch.is_tensor(p) else type(p).__name__}")
        if p.device != input_ids.device:
            raise ValueError(f"position_ids is on {p.device}, input_ids on {input_ids.device}")
        if self._table_positions and p.device.type == "cpu" and p.numel() and eager_fast_path(p):
            lo, hi = (int(v) for v in p.aminmax())
            if lo < 0 or hi >= self.config.block_size:
                raise ValueError(f"position_ids must lie in [0, block_size={self.config.block_size}), got values in "
                                 f"[{lo}, {hi}]")

    def _check_loss_args(self, input_ids, labels, last_only, return_logits):
        """forward's flags as bools (bool() read last_only="False" as True), and labels checked against input_ids:
        shaped like it (other shapes failed in the loss without naming labels), on its device, and not with
        last_only (one position's logits have no loss over the sequence). Returns (last_only, return_logits)."""
        last_only, return_logits = bool_arg("last_only", last_only), bool_arg("return_logits", return_logits)
        if labels is None:
            if not return_logits:  # (was ignored: the logits came back)
                raise ValueError("return_logits=False applies with labels (it returns (None, loss)); without labels "
                                 "the forward returns the logits")
            return last_only, return_logits
        _check_labels_dtype(labels)
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape)}")
        if labels.device != input_ids.device:
            raise ValueError(f"labels is on {labels.device}, input_ids on {input_ids.device}")
        if last_only:
            raise ValueError("last_only=True computes the last position's logits only: it does not take labels "
                             "(the loss needs every position)")
        return last_only, return_logits

    def _check_input(self, input_ids, cache, attention_mask=None, position_ids=None, offset=0):
        """Validates the inputs; returns (start, position_ids [B, T] or None, key mask [B, Tk] or None).

        offset: the prefix-tuning keys in front of every row (they take positions 0..offset-1, as with
        transformers + PEFT, where the prefix fills the first cache slots): derived positions start after them.

        attention_mask (Hugging Face semantics): [B, start + T], 1 = real token, 0 = padding (left
        padding for generation), over the cached and the new tokens. Without position_ids, positions
        count real tokens only (cumsum(mask) - 1), as transformers' generate does (a plain
        transformers GPT-2 forward numbers 0..T-1 unless given position_ids; Llama's RoPE gives the
        same scores either way).
        A cache with per-row lengths (KVCache.uniform False): row b's new tokens sit at key slots
        lengths[b] + 0..T-1 and take those positions (or, with attention_mask, the mask's positions at
        those columns; start is then cache.seqlen, an upper bound, and the columns past a row's new
        tokens are ignored)."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        B, T = input_ids.shape
        emb = self._token_embedding_weight()
        if emb is not None and input_ids.device != emb.device:
            # (a meta input_ids made GPT return meta logits silently; another device failed inside torch)
            raise ValueError(f"input_ids is on {input_ids.device}, the model's token embedding on {emb.device}")
        derived = position_ids is None
        if position_ids is not None:
            self._check_position_ids(position_ids, input_ids)
        if cache is not None:
            self._check_cache(cache, B, input_ids.device)
        start = cache.seqlen if cache is not None else 0
        V = self.config.vocab_size
        # ids outside the vocabulary: an IndexError in the embedding on the CPU (checked here), a device-side
        # assert on CUDA (not checked: reading the ids would be a host sync per forward; nor where they cannot be
        # read: torch.compile / export traces, fake tensors, torch.func transforms)
        if input_ids.device.type == "cpu" and input_ids.numel() and eager_fast_path(input_ids):
            lo, hi = input_ids.aminmax()
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids: token ids must lie in [0, vocab_size={V}), got values in [{lo}, {hi}]")
        if offset + start + T > self.config.block_size:
            raise ValueError(f"input_ids: {start} + {T} tokens exceed "
                             f"block_size={self.config.block_size}"
                             + (f" with the {offset} prefix-tuning positions" if offset else ""))
        # a cache with per-row lengths: row b's new tokens sit at key slots lengths[b] + 0..T-1
        slots = None
        if cache is not None and not cache.uniform:
            rows = cache.lengths.to(device=input_ids.device, dtype=torch.long)
            slots = rows[:, None] + torch.arange(T, device=input_ids.device)
        kpm = None
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != (B, start + T):
                raise ValueError(f"attention_mask must be a tensor [batch, cached + new tokens] = "
                                 f"[{B}, {start + T}], got {tuple(getattr(attention_mask, 'shape', ()))}")
            if attention_mask.is_complex():
                raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token) values, got "
                                 f"{attention_mask.dtype}")
            kpm = with_data("attention_mask", attention_mask).to(device=input_ids.device)
            # no padding: drop the mask (the unmasked kernels are faster). Reading that is a host sync on CUDA: done
            # for a prompt (no cache yet), not for the forwards that continue a cache (decoding, speculative drafts
            # and verifies: the decode kernel and the per-row path take the mask at ~no cost). The same read checks
            # the values (bool() made 2, -1, 0.5 or NaN a token, where transformers counts them in its positions).
            # Traced (torch.compile) the mask stays: its values cannot decide the graph.
            full = False
            if not torch.compiler.is_compiling() and (start == 0 or kpm.device.type == "cpu"):
                ok, full = torch.stack([((kpm == 0) | (kpm == 1)).all(), (kpm != 0).all()]).tolist()
                if not ok:
                    raise ValueError("attention_mask values must be 0 (padding) or 1 (token)")
            kpm = kpm.bool()
            if position_ids is None:
                pos = kpm.long().cumsum(-1) - 1
                pos = pos.masked_fill(~kpm, 1)
                position_ids = pos[:, start:] if slots is None else pos.gather(1, slots)
            if full:
                kpm = None
        if position_ids is None:
            position_ids = slots
        if derived and position_ids is not None and offset:  # (the caller's own positions are taken as given)
            position_ids = position_ids + offset
        if position_ids is not None and tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be [batch, seq] = [{B}, {T}], got {tuple(position_ids.shape)}")
        return start, position_ids, kpm
