"""Reference of llmkern.sample / top_k_top_p_filter: sort-based, float64, obviously correct.

Semantics (shared with the C++ and CUDA kernels):
  processed logits y = (logits + bias, disallowed -> -inf, NaN -> -inf) / temperature
  top-k keeps y >= the k-th largest value (ties kept); top-p then keeps the values v whose
  mass strictly above v is < top_p (renormalised over the top-k survivors, whole tie groups
  kept); min-p keeps p >= min_p * p_max. The draw is the first token, in vocabulary order,
  whose cumulative kept probability exceeds one uniform u(seed, position).
"""
import math

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


def _keep_mask(y, top_k, top_p, min_p):
    """Boolean [B, V]: which processed logits survive top-k, top-p, min-p (HF order)."""
    B, V = y.shape
    keep = torch.ones_like(y, dtype=torch.bool)
    for r in range(B):
        row = y[r]
        m = row.max()
        if m == float("-inf"):
            continue
        k = int(top_k[r])
        kth = torch.topk(row, k).values[-1] if 0 < k < V else float("-inf")
        keep[r] &= row >= kth
        e = torch.where(row == m, torch.ones_like(row), torch.exp(row - m))
        e = torch.where(keep[r], e, torch.zeros_like(e))
        p = float(top_p[r])
        if p < 1.0:
            asc, _ = torch.sort(row)
            e_asc = torch.where(asc == m, torch.ones_like(asc), torch.exp(asc - m))
            e_asc = torch.where(asc >= kth, e_asc, torch.zeros_like(e_asc))
            cum = torch.cumsum(e_asc, 0)
            z = cum[-1]
            last_le = torch.searchsorted(asc, row, right=True) - 1  # last position holding <= v
            mass_above = z - cum[last_le]
            # (the top group is always kept: p rounded to 0 in float32 keeps it, as the kernels do)
            keep[r] &= (mass_above < p * z) | (mass_above == 0)
        mp = float(min_p[r])
        if mp > 0:
            keep[r] &= e >= mp
    return keep


def filter_logits(logits, top_k, top_p, min_p, filter_value=float("-inf")):
    """Reference of top_k_top_p_filter: the logits with removed entries set to filter_value."""
    y = torch.nan_to_num(logits.double(), nan=float("-inf"))
    keep = _keep_mask(y, top_k, top_p, min_p)
    return torch.where(keep, logits, torch.full_like(logits, filter_value))


def sample(logits, temperature, top_k, top_p, min_p, seed, position, logit_bias=None, allowed=None):
    """Reference of the sampling kernel. All parameters are [B] tensors.

    Returns (tokens int64 [B], logprobs float32 [B], valid bool [B]).
    """
    B, V = logits.shape
    y = _process(logits, temperature, logit_bias, allowed)
    keep = _keep_mask(y, top_k, top_p, min_p)
    tokens = torch.zeros(B, dtype=torch.long)
    logprobs = torch.full((B,), float("-inf"), dtype=torch.float32)
    valid = torch.zeros(B, dtype=torch.bool)
    for r in range(B):
        row = y[r]
        m = row.max()
        if m == float("-inf"):
            continue
        valid[r] = True
        e = torch.where(row == m, torch.ones_like(row), torch.exp(row - m))
        if float(temperature[r]) == 0.0:
            tokens[r] = int(torch.nonzero(row == m)[0])
            logprobs[r] = -math.log(float(e.sum()))
            continue
        e = torch.where(keep[r], e, torch.zeros_like(e))
        cdf = torch.cumsum(e, 0)
        u = philox_uniform(int(seed[r]), int(position[r]))
        tok = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True)[0])
        tok = min(tok, V - 1)
        tokens[r] = tok
        d = 0.0 if row[tok] == m else float(row[tok] - m)  # (+inf maximum: 0, not inf - inf)
        logprobs[r] = d - math.log(float(cdf[-1]))
    dev = logits.device
    return tokens.to(dev), logprobs.to(dev), valid.to(dev)


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
