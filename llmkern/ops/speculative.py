"""Speculative decoding's acceptance step: exact rejection sampling of draft tokens (public API).

A small draft model proposes k tokens x_1..x_k (x_i drawn from q_i = p_draft(. | prefix, x_<i));
the target model scores all k+1 positions in one forward (p_1..p_{k+1}). Leviathan, Kalman & Matias
(2023) and Chen et al. (2023) keep x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection they draw a replacement from norm(max(0, p_i - q_i)), and when all k are kept a bonus
token from p_{k+1}. Every emitted token is then distributed exactly as the target's own sample:
P(emit x) = min(q(x), p(x)) + (1 - Σ_y min(q(y), p(y))) · max(0, p(x) - q(x)) / Σ_y max(0, p(y) - q(y))
          = p(x).

Plain PyTorch, vectorised over the batch, without host syncs (torch.compile traces it): there is no
fused CUDA kernel. The op reads [B, k+1, V] probabilities a couple of times, which the k+1 target
positions' LM head produced just before; a kernel would save little next to the model forwards.

Randomness: Philox-4x32-10 keyed by (seed, position) as llmkern.sample, with the fourth counter
word naming a stream (llmkern.sample's draws are stream 0): STREAM_ACCEPT for the acceptance tests,
STREAM_RESIDUAL for the replacement / bonus draw, STREAM_DRAFT for a caller's draft draws
(llmkern.generate). Uniforms at different positions or streams are independent, so a token
proposed, discarded and proposed again at the same position meets the same uniforms.
"""
import numbers
from typing import Optional, Union

import torch

from llmkern.ops import _checks
from llmkern.reference.sampling import philox_uniform_tensor as _philox_impl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_DRAFT = 1, 2, 3


# ---- counter-based uniforms -------------------------------------------------------------------------

def philox_uniform(seed: torch.Tensor, position: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits), elementwise over broadcast int64 `seed` and
    `position` tensors: Philox-4x32-10 with key = seed and counter = (position, 0x5A4D504C, stream).
    Stream 0 gives exactly llmkern.sample's uniform (llmkern.reference.philox_uniform).

    Under torch.compile (or any dispatch mode) it is the opaque custom op `llmkern::philox_uniform`:
    inlined, Inductor's lowering walks the ten rounds' integer expression tree (every word is read
    several times per round) without bound; compiling speculative_accept took over ten minutes."""
    if _checks.eager_fast_path(seed, position):
        return _philox_impl(seed, position, int(stream))
    return _philox_op(seed, position, int(stream))


@torch.library.custom_op("llmkern::philox_uniform", mutates_args=())
def _philox_op(seed: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    return _philox_impl(seed, position, stream)


@_philox_op.register_fake
def _(seed, position, stream):
    return seed.new_empty(torch.broadcast_shapes(seed.shape, position.shape), dtype=torch.float64)


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of non-negative `weights` [N, V] (need not sum to 1) with uniforms
    u [N] in [0, 1): the first token whose cumulative weight exceeds u · total. A zero-weight token is
    never drawn (for a row with some positive weight)."""
    cdf = weights.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=weights.shape[-1] - 1)


def row_seeds(seed, B, device) -> torch.Tensor:
    """int64 [B] seeds: None -> fresh ones from torch's generator (torch.manual_seed applies); an int
    s -> s + row (rows independent, as llmkern.generate's seed=); a [B] integer tensor -> itself."""
    if seed is None:
        return torch.randint(_INT64_MIN, _INT64_MAX, (B,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.shape != (B,):
            raise ValueError(f"seed must be an int or an integer tensor of shape [{B}], got {tuple(seed.shape)}")
        if seed.dtype == torch.bool or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"seed must be an integer tensor, got {seed.dtype}")
        if seed.device != torch.device(device) and seed.device.type != "cpu":
            raise ValueError(f"seed is on {seed.device} but the tokens are on {device}")
        return seed.to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int or a [{B}] integer tensor, got {type(seed).__name__}")
    if not _INT64_MIN <= int(seed) <= _INT64_MAX:
        raise ValueError(f"seed must fit in int64, got {seed}")
    # wraps around in int64 like the C++ kernels' seeds
    return torch.full((B,), int(seed), dtype=torch.int64, device=device) + torch.arange(B, device=device)


def _positions(position, B, device):
    if position is None:
        return torch.zeros(B, dtype=torch.int64, device=device)
    if isinstance(position, torch.Tensor):
        if position.shape != (B,) or position.dtype == torch.bool or position.is_floating_point() \
                or position.is_complex():
            raise ValueError(f"position must be an int >= 0 or an integer tensor of shape [{B}], got "
                             f"{position.dtype} {tuple(position.shape)}")
        if position.device != torch.device(device) and position.device.type != "cpu":
            raise ValueError(f"position is on {position.device} but the tokens are on {device}")
        if position.device.type == "cpu" and _checks.checking_values() and bool((position < 0).any()):
            raise ValueError(f"position values must be >= 0 (as llmkern.sample's), got {position.tolist()}")
        return position.to(device=device, dtype=torch.int64)
    if isinstance(position, bool) or not isinstance(position, numbers.Integral) or not 0 <= position <= _INT64_MAX:
        raise ValueError(f"position must be an int >= 0 or a [{B}] integer tensor, got {position!r}")
    return torch.full((B,), int(position), dtype=torch.int64, device=device)


# ---- validation -------------------------------------------------------------------------------------

def _check_probs(name, t, lead, layout, dev, V=None):
    """t: a float tensor [*lead, V] (V given, or any >= 1) on dev."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[:2] != lead or t.shape[2] < 1 or (V is not None and t.shape[2] != V):
        vocab = "V" if V is None else f"{V} (target_probs' vocab)"
        raise ValueError(f"{name} must have shape {layout} = [{lead[0]}, {lead[1]}, {vocab}], got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.device != dev:
        raise ValueError(f"{name} is on {t.device} but draft_tokens are on {dev}")


def _check(draft_tokens, draft_probs, target_probs, greedy):
    if not isinstance(draft_tokens, torch.Tensor):
        raise TypeError(f"draft_tokens must be a torch.Tensor, got {type(draft_tokens).__name__}")
    if draft_tokens.dtype != torch.int64 or draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be an int64 tensor [batch, k], got {draft_tokens.dtype} "
                         f"{tuple(draft_tokens.shape)}")
    B, k = draft_tokens.shape
    if k < 1:
        raise ValueError("draft_tokens must hold k >= 1 draft tokens per row, got k = 0")
    dev = draft_tokens.device
    _check_probs("target_probs", target_probs, (B, k + 1), "[batch, k + 1, vocab]", dev)
    V = target_probs.shape[2]
    if draft_probs is None:
        if not greedy:
            raise ValueError("draft_probs is required unless greedy=True")
    else:
        _check_probs("draft_probs", draft_probs, (B, k), "[batch, k, vocab]", dev, V)
    # token range: checked where it costs no device sync (on CUDA, gather's own bounds check fires)
    if dev.type == "cpu" and not torch.compiler.is_compiling() and draft_tokens.numel() \
            and bool(((draft_tokens < 0) | (draft_tokens >= V)).any()):
        raise ValueError(f"draft_tokens values must be token ids in [0, {V})")
    return B, k, V


# ---- public API -------------------------------------------------------------------------------------

def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    position: Optional[Union[int, torch.Tensor]] = None,
    greedy: bool = False,
):
    """Accept or reject k draft tokens per row so that the emitted tokens follow the target exactly.

    draft_tokens: int64 [B, k], k >= 1: the draft's proposals, x_i drawn from draft_probs[:, i].
    draft_probs: [B, k, V]: the (processed: temperature, top-k, top-p...) distribution each draft
        token was drawn from. May be None with greedy=True.
    target_probs: [B, k + 1, V]: the target's distribution (processed the same way) at the k draft
        positions and at the bonus position after them; with greedy=True any scores whose argmax is
        the target's choice (logits will do).
    seed: None (fresh seeds from torch's generator), an int s (row r uses s + r) or an int64 [B]
        tensor. position: int or [B] tensor (default 0), the absolute position of draft token 0:
        draft token i is tested with the uniform of (seed, position + i), and the replacement or bonus
        at position + num_accepted is drawn with its own stream (see the module docstring), so the
        result is a pure function of the inputs, seed and position.
    greedy: accept x_i while it equals argmax target_probs[:, i] (lowest index on ties, as
        llmkern.sample with temperature=0); the replacement / bonus is that argmax. Speculative greedy
        decoding then emits exactly the tokens of plain greedy decoding.

    Sampling (greedy=False): x_i is accepted with probability min(1, p(x_i) / q(x_i)) (tested as
    u · q < p, so q = 0 < p accepts and q = p = 0 rejects without a division); at the first
    rejection the replacement is drawn from max(0, p - q) normalised, or from p where that is all
    zero (then p = q and a rejection has probability 0: only rounding gets there); when all k are
    accepted the bonus token is drawn from target_probs[:, k]. Computed in float32 (float64 for
    float64 inputs); each row's probabilities must be finite, non-negative and sum to 1 (not
    checked: that would cost a device sync; the acceptance ratio p / q needs both normalised).

    Returns (output_tokens int64 [B, k + 1]: the accepted draft tokens, then the replacement or
    bonus token, then -1 padding; num_accepted int64 [B]): row b emits num_accepted[b] + 1 tokens.
    Vectorised PyTorch without host syncs; there is no fused kernel (module docstring).
    """
    greedy = _checks.bool_arg("greedy", greedy)  # (a flag: bool("False") is True, and greedy="False" was greedy)
    B, k, V = _check(draft_tokens, draft_probs, target_probs, greedy)
    dev = draft_tokens.device
    idx = torch.arange(k + 1, device=dev)
    if greedy:
        # NaN counts as -inf, as llmkern.sample's greedy rows (torch.argmax takes NaN for the largest)
        scores = target_probs.masked_fill(target_probs.isnan(), float("-inf"))
        choice = scores.argmax(-1)                                             # [B, k + 1]
        accept = draft_tokens == choice[:, :k]
        num_accepted = accept.long().cumprod(-1).sum(-1)                       # leading run of accepts
        extra = choice.gather(1, num_accepted[:, None]).squeeze(1)
    else:
        seeds, pos = row_seeds(seed, B, dev), _positions(position, B, dev)
        dt = torch.float64 if torch.float64 in (target_probs.dtype, draft_probs.dtype) else torch.float32
        p, q = target_probs.to(dt), draft_probs.to(dt)
        tok = draft_tokens.unsqueeze(-1)
        p_tok = p[:, :k].gather(-1, tok).squeeze(-1)
        q_tok = q.gather(-1, tok).squeeze(-1)
        u = philox_uniform(seeds[:, None], pos[:, None] + idx[:k], STREAM_ACCEPT)  # [B, k]
        accept = u * q_tok.double() < p_tok.double()
        num_accepted = accept.long().cumprod(-1).sum(-1)
        # where the row stops: the rejected position (residual of p and q), or k (bonus: p alone)
        p_at = p.gather(1, num_accepted.view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        q_at = q.gather(1, num_accepted.clamp(max=k - 1).view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        rejected = (num_accepted < k)[:, None]
        weights = torch.where(rejected, (p_at - q_at).clamp(min=0), p_at)
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, p_at)
        extra = draw(weights, philox_uniform(seeds, pos + num_accepted, STREAM_RESIDUAL))
    n = num_accepted[:, None]
    drafts = torch.cat([draft_tokens, draft_tokens.new_zeros(B, 1)], 1)
    out = torch.where(idx < n, drafts, torch.where(idx == n, extra[:, None], torch.full_like(drafts, -1)))
    return out, num_accepted
