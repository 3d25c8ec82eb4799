"""Reference of llmkern.sample / top_k_top_p_filter: sort-based, float64, obviously correct.

Semantics (shared with the C++ and CUDA kernels):
  processed logits y = (logits + bias, disallowed -> -inf, NaN -> -inf) / temperature
  top-k keeps y >= the k-th largest value (ties kept); top-p then keeps the values v whose
  mass strictly above v is < top_p (renormalised over the top-k survivors, whole tie groups
  kept); min-p keeps p >= min_p * p_max. The draw is the first token, in vocabulary order,
  whose cumulative kept probability exceeds one uniform u(seed, position).
"""
import torch

_M32 = 0xFFFFFFFF


def _philox4x32(c, k0, k1):
    c = list(c)
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        hi0, lo0 = p0 >> 32, p0 & _M32
        hi1, lo1 = p1 >> 32, p1 & _M32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c


def philox_uniform(seed, position):
    """The row's uniform in [0, 1) (53 bits), exactly as the kernels compute it."""
    s, p = int(seed) & 0xFFFFFFFFFFFFFFFF, int(position) & 0xFFFFFFFFFFFFFFFF
    c = _philox4x32([p & _M32, p >> 32, 0x5A4D504C, 0], s & _M32, s >> 32)
    return ((c[0] >> 5) * 67108864 + (c[1] >> 6)) / 9007199254740992.0


def _mulhilo(a, b):
    """(hi, lo) 32-bit words of the 64-bit product of the constant a < 2^32 and b (int64 tensor of 32-bit
    values), in int64 arithmetic that never overflows (b split into 16-bit halves): a wrapping int64
    product would be signed overflow in the C++ that torch.compile generates, undefined behaviour that an
    optimiser may use to drop the masks that undo it."""
    t1 = a * (b & 0xFFFF)           # < 2^48
    t2 = a * (b >> 16)              # < 2^48
    s = ((t2 & 0xFFFF) << 16) + t1  # a * b = (t2 >> 16) * 2^32 + s, s < 2^49
    return (t2 >> 16) + (s >> 32), s & _M32


def philox_uniform_tensor(seed, position, stream=0):
    """philox_uniform elementwise over int64 tensors (seed and position broadcast; a seed is its uint64
    bit pattern, as philox_uniform's int(seed) & (2^64 - 1)): float64 uniforms in [0, 1), bit-identical to
    the scalar function. uint32 words are int64 values in [0, 2^32): masks keep them there, and
    (x >> 32) & 0xFFFFFFFF is the logical shift of a negative int64's bits. stream: the counter's last word
    (0: llmkern.sample's uniform; speculative decoding draws its other uniforms from streams 1-3)."""
    seed, position = torch.broadcast_tensors(seed.long(), position.long())
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = position & _M32, (position >> 32) & _M32
    c2, c3 = torch.full_like(c0, 0x5A4D504C), torch.full_like(c0, int(stream) & _M32)
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    # 27 + 26 bits < 2^53: exact in float64, and the division by 2^53 is exact too
    return ((c0 >> 5) * 67108864 + (c1 >> 6)).double() / 9007199254740992.0


def _row_uniforms(seed, position):
    """philox_uniform_tensor(seed, position), for sample. While torch.compile traces (or under a dispatch mode)
    it goes through the opaque custom op llmkern::philox_uniform (llmkern.ops.speculative, stream 0: the same
    words, the same bits; tested): inlined, Inductor's lowering of the ten rounds did not finish in minutes
    when the seeds or positions were computed inside the graph (an arange, a scalar's torch.full)."""
    from llmkern.ops import _checks

    if _checks.eager_fast_path(seed, position):
        return philox_uniform_tensor(seed, position)
    from llmkern.ops.speculative import philox_uniform as philox_op

    return philox_op(seed, position)


def apply_penalties(logits, prev_tokens, repetition_penalty, presence_penalty, frequency_penalty,
                    output_start=None):
    """Hugging Face's repetition penalty, then OpenAI's / vLLM's presence and frequency penalties.

    prev_tokens: [B, L] int64, -1 = padding: the tokens seen so far (prompt, then output).
    output_start: None, an int or a [B] int64 tensor in [0, L]: row b's output (generated) tokens are
    prev_tokens[b, output_start[b]:]; None = 0 (every token counts as output).
    Penalty arguments are [B] float tensors. What each penalty counts:
      repetition_penalty: every token of prev_tokens (prompt and output, as HF and vLLM): a seen
        token's logit is divided by the penalty when positive, multiplied when negative.
      presence_penalty, frequency_penalty: the output tokens only (OpenAI's and vLLM's definition):
        logit -= presence_penalty * (count > 0) + frequency_penalty * count, where count is the
        number of times the token occurs in prev_tokens[b, output_start[b]:].
    Returns a new float32 tensor (the input is not modified).
    """
    out = logits.float().clone()
    if prev_tokens is None or prev_tokens.numel() == 0:
        return out
    B, V = out.shape
    valid = prev_tokens >= 0
    ids = torch.where(valid, prev_tokens, torch.zeros_like(prev_tokens))
    counts = torch.zeros(B, V, dtype=torch.float32, device=out.device)
    counts.scatter_add_(1, ids, valid.float())
    seen = counts > 0
    if output_start is not None:  # presence / frequency count the output part only
        start = torch.as_tensor(output_start, dtype=torch.long, device=out.device).expand(B).reshape(B, 1)
        in_output = valid & (torch.arange(prev_tokens.shape[1], device=out.device) >= start)
        counts = torch.zeros_like(counts).scatter_add_(1, ids, in_output.float())
    rp = repetition_penalty.float().view(B, 1)
    penalised = torch.where(out < 0, out * rp, out / rp)
    out = torch.where(seen, penalised, out)
    # only where counted: an infinite penalty times a zero count would be NaN
    counted = counts > 0
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    out = out - torch.where(counted, presence_penalty.float().view(B, 1), zero)
    out = out - torch.where(counted, frequency_penalty.float().view(B, 1) * counts, zero)
    return out


def _process(logits, temperature, bias, allowed):
    # in float32, as the kernels (and as documented: a temperature so small that logits / T
    # overflows float32 makes those logits +-inf)
    y = logits.float()
    if bias is not None:
        y = y + bias.float()
    if allowed is not None:
        y = y.masked_fill(~allowed.bool(), float("-inf"))
    y = torch.nan_to_num(y, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    t = temperature.float().view(-1, 1)
    y = torch.where(t > 0, y / torch.where(t > 0, t, torch.ones_like(t)), y)
    return torch.nan_to_num(y, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).double()


def _weights(y):
    """The row maxima m [B, 1] and the weights e = exp(y - m) [B, V] of processed logits y (float64, no NaN):
    1 at the maximum, also when it is +inf (not exp(inf - inf))."""
    m = y.amax(-1, keepdim=True)
    return m, torch.where(y == m, 1.0, torch.exp(y - m))


def _keep_mask(y, top_k, top_p, min_p, weights=None):
    """Boolean [B, V]: which processed logits y (float64 [B, V], no NaN) survive top-k, top-p, min-p (HF
    order), all rows at once, without host reads. top_k, top_p, min_p: [B] tensors; weights: _weights(y)
    when the caller has it. Rows whose maximum is -inf keep everything."""
    B, V = y.shape
    m, e = _weights(y) if weights is None else weights
    asc, order = torch.sort(y, dim=-1)
    # top-k keeps y >= the k-th largest value, asc[V - k] (ties kept); k <= 0 or k >= V: no top-k
    k = top_k.to(device=y.device, dtype=torch.int64).view(B, 1)
    has_k = (k > 0) & (k < V)
    kth = torch.where(has_k, asc.gather(1, torch.where(has_k, V - k, 0)), float("-inf"))
    keep = y >= kth
    e = torch.where(keep, e, 0.0)  # the weights of the top-k survivors
    # top-p keeps v when the mass strictly above v (over the top-k survivors) is < top_p * total: in
    # ascending order, total - (cumulative mass up to the last position holding v). The tie group's last
    # position counts for all of v's group, so a group is kept or dropped whole.
    group_end = torch.cat([asc[:, 1:] != asc[:, :-1], torch.ones_like(asc[:, :1], dtype=torch.bool)], -1)
    del asc  # (one [B, V] float64 fewer at the peak below)
    p = top_p.to(device=y.device, dtype=torch.float64).view(B, 1)
    cum = torch.cumsum(e.gather(1, order), -1)
    z = cum[:, -1:]
    # cum at the end of each position's group: the cum of the nearest group end at or after it (cum does
    # not decrease, so that is the smallest one there)
    cum_end = torch.where(group_end, cum, float("inf")).flip(-1).cummin(-1).values.flip(-1)
    mass_above = z - cum_end
    # (the top group is always kept: p rounded to 0 in float32 keeps it, as the kernels do); top_p >= 1
    # (or NaN) disables the filter
    top_p_sorted = ~(p < 1.0) | (mass_above < p * z) | (mass_above == 0)
    keep = keep & torch.empty_like(top_p_sorted).scatter(1, order, top_p_sorted)  # back to vocabulary order
    # min-p keeps e >= min_p (e is relative to the maximum: p >= min_p * p_max); min_p <= 0 (or NaN): off
    mp = min_p.to(device=y.device, dtype=torch.float64).view(B, 1)
    keep = keep & (~(mp > 0) | (e >= mp))
    return keep | (m == float("-inf"))


def filter_logits(logits, top_k, top_p, min_p, filter_value=float("-inf")):
    """Reference of top_k_top_p_filter: the logits with removed entries set to filter_value."""
    y = torch.nan_to_num(logits.double(), nan=float("-inf"))
    keep = _keep_mask(y, top_k, top_p, min_p)
    # filter_value rounded to the logits' dtype as the kernels round it (a cast: -1e9 is -inf in float16, 1e39 inf
    # in float32); full_like raised torch's overflow error for those where the kernels returned the rounded value
    fill = torch.tensor(float(filter_value), dtype=torch.float64, device=logits.device).to(logits.dtype)
    return torch.where(keep, logits, fill)


def sample(logits, temperature, top_k, top_p, min_p, seed, position, logit_bias=None, allowed=None, filters=True,
           chunk_elements=1 << 22):
    """Reference of the sampling kernel. All parameters are [B] tensors (on the logits' device or the CPU).

    Returns (tokens int64 [B], logprobs float32 [B], valid bool [B]). All rows at once, without host reads
    (torch.compile traces it whole): a row with temperature 0 takes the first maximum in vocabulary order
    (logprob under the temperature-1 distribution), the others draw by inverse CDF with philox_uniform;
    a row whose logits are all -inf gives token 0, logprob -inf, valid False. filters=False: the caller knows
    that no row filters (top-k, top-p and min-p off, or every row greedy), so the keep mask (a sort of every
    row) is skipped; the result is the same. Rows go in chunks of about chunk_elements logits: the batched
    steps keep several float64 [rows, V] temporaries (2 GB at B=256, V=128256 in one piece).
    """
    B, V = logits.shape
    rows = max(1, chunk_elements // max(V, 1))
    if B > rows:  # (a fixed number of chunks: torch.compile unrolls the loop)
        def side(t, lo):  # logit_bias / allowed: [B, V] rows, or one [V] row for all
            return t[lo:lo + rows] if t is not None and t.dim() == 2 else t

        outs = [_sample_rows(*(t[lo:lo + rows] for t in (logits, temperature, top_k, top_p, min_p, seed, position)),
                             side(logit_bias, lo), side(allowed, lo), filters)
                for lo in range(0, B, rows)]
        return tuple(torch.cat(o) for o in zip(*outs))
    return _sample_rows(logits, temperature, top_k, top_p, min_p, seed, position, logit_bias, allowed, filters)


def _sample_rows(logits, temperature, top_k, top_p, min_p, seed, position, logit_bias, allowed, filters):
    """sample on one chunk of rows."""
    B, V = logits.shape
    dev = logits.device
    y = _process(logits, temperature, logit_bias, allowed).detach()  # (the outputs carry no gradient)
    m, e = _weights(y)
    keep = _keep_mask(y, top_k, top_p, min_p, (m, e)) if filters else None
    valid = (m != float("-inf")).view(B)
    # temperature 0: the first maximum (torch.argmax gives the first one), logprob -log(sum of e)
    greedy_tok = y.argmax(-1)
    greedy_lp = -torch.log(e.sum(-1))
    # the draw: the first token whose cumulative kept weight exceeds u * total
    cdf = torch.cumsum(e if keep is None else torch.where(keep, e, 0.0), -1)
    total = cdf[:, -1]
    u = _row_uniforms(seed.to(device=dev, dtype=torch.int64), position.to(device=dev, dtype=torch.int64))
    tok = torch.searchsorted(cdf, (u * total).view(B, 1), right=True).view(B).clamp(max=V - 1)
    y_tok = y.gather(1, tok.view(B, 1))
    d = torch.where(y_tok == m, 0.0, y_tok - m).view(B)  # (+inf maximum: 0, not inf - inf)
    drawn_lp = d - torch.log(total)
    greedy = temperature.to(dev).view(B) == 0
    tokens = torch.where(valid, torch.where(greedy, greedy_tok, tok), 0)
    logprobs = torch.where(valid, torch.where(greedy, greedy_lp, drawn_lp), float("-inf"))
    return tokens, logprobs.float(), valid


def _top_ids(x, n):
    """ids [R, n] of the n largest of x [R, V] (float32, no NaN): value descending, lowest id first on ties,
    whatever order torch.topk gives equal values. Two 4-byte topk passes: the n-th value, then int32 keys
    that rank everything above it by id and the ties at it by id (the lowest tied ids fill the rest); a
    stable sort of the n picks by value then keeps ids ascending within equal values."""
    V = x.shape[-1]
    thr = x.topk(n, -1, sorted=False).values.amin(-1, keepdim=True)      # the n-th largest value
    ids = torch.arange(V, device=x.device, dtype=torch.int32)
    key = torch.where(x > thr, 2 * V - ids, torch.where(x == thr, V - ids, torch.zeros_like(ids)))
    picks = key.topk(n, -1).indices                                       # above thr, then ties; ids ascending
    order = torch.sort(x.gather(1, picks), dim=-1, descending=True, stable=True).indices
    return picks.gather(1, order)


def top_logprobs(logits, n, temperature, tokens=None, chunk_elements=1 << 22):
    """Reference (and the non-CPU path) of llmkern.top_logprobs, in torch ops on a few rows at a time:
    a float32 copy of at most `chunk_elements` logits lives at once, never a [B, V] one; the logprobs
    are formed for the picked ids only (one logsumexp per row, no [B, V] log-softmax).

    temperature: [B] float32 > 0; tokens: [B] int64 in [0, V) or None.
    Returns (ids int64 [B, n], logprobs float32 [B, n], token_logprobs float32 [B] / [0],
    token_ranks int64 [B] / [0]) - the C++ op's outputs (empty token outputs without tokens).
    """
    B, V = logits.shape
    rows = max(1, chunk_elements // V)
    out = ([], [], [], [])
    for lo in range(0, B, rows):
        x = logits[lo:lo + rows].float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        m = x.amax(-1, keepdim=True)
        t = temperature[lo:lo + rows, None]
        # (x - m) / T, with 0 at the maximum (also when it is +inf: +inf logits share the mass)
        lse = torch.logsumexp(torch.where(x == m, torch.zeros_like(x), (x - m) / t), -1, keepdim=True)

        def logprob(idx):  # the logprobs of the ids idx [R, k] only
            xi = x.gather(1, idx)
            lp = torch.where(xi == m, torch.zeros_like(xi), (xi - m) / t) - lse
            return lp.masked_fill(m == float("-inf"), float("-inf"))  # no finite logit: all -inf

        ids = _top_ids(x, n) if n else x.new_empty((x.shape[0], 0), dtype=torch.int64)
        out[0].append(ids)
        out[1].append(logprob(ids))
        if tokens is not None:
            tok = tokens[lo:lo + rows, None]
            out[2].append(logprob(tok)[:, 0])
            out[3].append((x > x.gather(1, tok)).sum(-1) + 1)
    if B == 0:
        return (logits.new_empty((0, n), dtype=torch.int64), logits.new_empty((0, n), dtype=torch.float32),
                logits.new_empty((0,), dtype=torch.float32), logits.new_empty((0,), dtype=torch.int64))
    if tokens is None:
        out = out[:2] + ([logits.new_empty((0,), dtype=torch.float32)],
                         [logits.new_empty((0,), dtype=torch.int64)])
    return tuple(torch.cat(parts) for parts in out)


def sort_based_sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """What users run today (the benchmark baseline): sort, softmax, cumsum, mask, multinomial."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - top_p
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
