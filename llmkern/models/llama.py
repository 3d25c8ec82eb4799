"""Llama (LLaMA 1/2/3 family) in nanoGPT's spirit: RMSNorm, rotary positions, SwiGLU MLP, GQA.

    model = Llama(get_config("llama-tiny"), backend="llmkern")
    logits, loss = model(idx, labels=idx)

Module names follow Hugging Face's LlamaForCausalLM (q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj, input_layernorm, ...), so PEFT target names carry over unchanged.

The same file is Mistral, Qwen2 and Qwen3 with config options (ModelConfig; all off by default):
qkv_bias / o_bias (Qwen2: biases on q/k/v only), qk_norm (Qwen3: q_norm / k_norm, RMSNorm over each
head's head_dim before RoPE), sliding_window / sliding_window_layers (Mistral, and Qwen2/3 with
use_sliding_window: a query sees its last W keys, itself included).

It is also Gemma, Gemma 2 and Gemma 3 (text) with the Gemma options: a GeGLU MLP (activation
"gelu_tanh"), RMSNorm gains (1 + w) applied in float32 (norm_offset=1), embeddings scaled by sqrt(d)
(scale_embeddings), Gemma 2/3's sandwich norms (post_norms: the attention and MLP outputs are normalised
before their residual adds), the attention scale attn_scale, tanh soft-capping of the attention scores
(attn_softcap) and of the logits (logit_softcap), and Gemma 3's local RoPE base on its sliding layers
(rope_local_theta).

Granite: embeddings times embedding_multiplier, the attention and MLP outputs times residual_multiplier
before their residual adds, attention_multiplier as attn_scale, the logits divided by logits_scaling.
OLMo 2: post-norm blocks (pre_norms=False with post_norms: x + norm(attn(x)), then x + norm(mlp(x))) and
q_norm / k_norm over all the heads' channels of q and k at once (qk_norm_full).

With config.kv_lora_rank > 0 and moe_router "sigmoid" it is DeepSeek-V3 (deepseek.py: multi-head latent
attention, the aux-loss-free group-limited sigmoid router, ungated shared experts); with moe_router
"softmax_group" DeepSeek-V2 (the same with V2's softmax router, greedy or group-limited).

With config.n_experts > 0 it is also Mixtral / Qwen2-MoE / Qwen3-MoE: the MLP of each MoE layer
(config.moe_layers, default all) is a sparse mixture of experts (MoE below: a router `gate`, experts
`experts.gate_up_proj` [E, 2F, d] / `experts.down_proj` [E, d, F], transformers 5's names and layout),
and router_aux_loss_coef > 0 adds the load-balancing loss to the returned loss.

backend="llmkern" runs every op on llmkern's kernels: attention, RMSNorm fused with the residual add
before it, RoPE on q and k in one launch, SwiGLU, the MoE experts (llmkern.moe_mlp), and the loss;
backend="torch" is plain PyTorch (the MoE as transformers' loop over experts).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmkern  # (the fused ops load on first use: llmkern.rms_norm, llmkern.rope, llmkern.swiglu)
from llmkern.models._attn import HFModule, ZooModel, attend, check_backend, shared_input
from llmkern.models.configs import ModelConfig, get_config
from llmkern.ops import _checks


class RMSNorm(nn.Module):
    """LlamaRMSNorm. forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual),
    the pre-norm block's residual add and the norm after it. backend="llmkern": one llmkern.rms_norm
    (the same rounding order: normalise in float32, round to x's dtype, multiply by the weight) when the
    dtypes agree (a float32 weight on bf16 inputs promotes here, so that stays on the torch math).
    offset=1: GemmaRMSNorm, the gain (1 + weight) applied in float32 and the result rounded once."""

    def __init__(self, dim, eps, backend="torch", offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # a gain of 1 at initialisation
        self.eps = eps
        self.offset = offset
        self.backend_name = backend

    def forward(self, x, residual=None):
        if self.backend_name == "llmkern" and fusable(x, self.weight, residual):
            return llmkern.rms_norm(x, self.weight, self.eps, residual=residual, offset=self.offset,
                                    return_residual=residual is not None)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: multiplied in float32, one rounding
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def fusable(x, weight, residual=None):
    """Whether a fused elementwise op computes exactly what the module's torch math does: the same dtype
    everywhere (mixed dtypes promote in the torch math)."""
    return x.dtype == weight.dtype and (residual is None or residual.dtype == x.dtype)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; cos/sin [T, R] or [B, 1, T, R] (the two halves of R rotate together, as in HF Llama).
    R < D (partial rotary, Phi3's apply_rotary_pos_emb): channels [R, D) pass through unchanged."""
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :R], x[..., R:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def rope_inv_freq(cfg):
    """The rotary frequencies [rope_dim / 2] (float32: head_dim, or MLA's qk_rope_head_dim), with the
    config's context-extension scaling.

    linear: every frequency divided by `factor` (positions interpolated). llama3 (Llama 3.1+):
    wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept, those
    longer than original / low_freq_factor are divided by `factor`, and the band between blends
    the two linearly in original / wavelength. dynamic (NTK): theta grows with the sequence length
    beyond block_size, which the zoo never runs past, so these are the plain frequencies. yarn: see
    _yarn_inv_freq. longrope: the short factors' (long=True: the long factors'), see longrope_inv_freq. Each
    follows transformers' arithmetic, so that the frequencies agree to the bit.
    """
    d = cfg.rope_dim
    s = cfg.rope_scaling
    if s is not None and s["rope_type"] == "longrope":
        return longrope_inv_freq(cfg, s["short_factor"])
    theta = cfg.rope_theta
    if s is not None and s["rope_type"] == "dynamic":  # transformers' NTK theta at seq_len = block_size
        L = cfg.block_size
        theta = theta * ((s["factor"] * L / L) - (s["factor"] - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if s is None or s["rope_type"] == "dynamic":
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    if s["rope_type"] == "yarn":
        return _yarn_inv_freq(cfg, s)
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
        s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(in_band, blended, scaled)


def longrope_inv_freq(cfg, factors):
    """LongRoPE's frequencies: theta^(-2i/d) with frequency i's wavelength stretched by factors[i], computed as
    transformers' _compute_longrope_parameters (1 / (factor * theta^(2i/d)), float32)."""
    d = cfg.rope_dim
    ext = torch.tensor(factors, dtype=torch.float32)
    return 1.0 / (ext * cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def _yarn_inv_freq(cfg, s):
    """YaRN (Peng et al. 2023): per frequency, a blend of the original one (extrapolation) and the
    one divided by `factor` (interpolation). Frequency i turns original_max_position_embeddings /
    wavelength_i times over the original context; those turning more than beta_fast times keep
    their frequency, fewer than beta_slow times are interpolated, with a linear ramp in i between
    (its ends floored/ceiled to whole indices when `truncate`). The cos/sin are multiplied by
    s["attention_factor"] (see Llama.rope)."""
    d, theta, factor = cfg.rope_dim, cfg.rope_theta, s["factor"]
    wavelength_scale = theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    extrapolated = 1.0 / wavelength_scale
    interpolated = 1.0 / (factor * wavelength_scale)

    def index_turning(rotations):  # (fractional) i at which 2*pi*theta^(2i/d) * rotations = original context
        return d * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = index_turning(s["beta_fast"]), index_turning(s["beta_slow"])
    if s["truncate"]:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # weight of the original frequency
    return interpolated * (1 - keep) + extrapolated * keep


class Attention(nn.Module):
    def __init__(self, cfg, backend, layer=0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias, o_bias, _ = cfg.biases
        self.q_proj = nn.Linear(cfg.n_embd, cfg.attn_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.attn_dim, cfg.n_embd, bias=o_bias)
        # qk_norm: one gain per head_dim channel, shared by the heads (tensor parallelism replicates it); with
        # qk_norm_full (OLMo 2) one per channel of all the heads, the norm taken over them all
        self.qk_norm_full = cfg.qk_norm_full
        q_width, k_width = (cfg.attn_dim, cfg.n_kv_head * cfg.head_dim) if cfg.qk_norm_full else (cfg.head_dim,) * 2
        self.q_norm = RMSNorm(q_width, cfg.norm_eps, backend, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps, backend, cfg.norm_offset) if cfg.qk_norm else None
        # a window of block_size keys or more sees every key, as none does (no key lies further back): one past
        # int64's range (2**70 overflowed the masks' int64 arithmetic) is taken as none
        W = cfg.layer_window(layer)
        self.sliding_window = None if W is not None and W >= max(cfg.block_size, 2 ** 62) else W
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap  # (None: 1/sqrt(head_dim), no cap)
        self.dropout = cfg.dropout
        self.backend_name = backend

    def forward(self, x, cos, sin, cache=None, layer=None, prefix=None, kpm=None):
        B, T, _ = x.shape
        q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        if self.q_norm is not None and self.qk_norm_full:  # [B, T, H * D]: normalised over every head at once
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:  # [B, T, H, D]: normalised over D, per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.backend_name == "llmkern" and q.dtype == k.dtype:
            q, k = llmkern.rope(q, k, cos, sin)  # one launch for both; float32 math, one rounding
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, backend=self.backend_name, cache=cache, layer=layer, prefix=prefix,
                   key_padding_mask=kpm, sliding_window=self.sliding_window, scale=self.scale, softcap=self.softcap,
                   context_parallel=getattr(self, "context_parallel", None),
                   dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU (Gemma) with activation "gelu_tanh" / "gelu". width:
    the hidden width (default intermediate_size; a Qwen2-MoE shared expert has its own)."""

    def __init__(self, cfg, backend="torch", width=None):
        super().__init__()
        bias = cfg.biases[2]
        width = width or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.n_embd, width, bias=bias)
        self.up_proj = nn.Linear(cfg.n_embd, width, bias=bias)
        self.down_proj = nn.Linear(width, cfg.n_embd, bias=bias)
        self.activation = cfg.activation
        self.backend_name = backend

    def forward(self, x):
        gate, up = shared_input(x, self.gate_proj, self.up_proj)
        if self.backend_name == "llmkern" and gate.dtype == up.dtype:
            return self.down_proj(self._fused(gate, up))  # one pass, the activation recomputed in the backward
        if self.activation == "silu":
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none") * up)

    def _fused(self, gate, up):
        if self.activation == "silu":
            return llmkern.swiglu(gate, up)
        return llmkern.geglu(gate, up, approximate="tanh" if self.activation == "gelu_tanh" else "none")


class Experts(nn.Module):
    """E SwiGLU experts as two stacked weights (transformers 5's MixtralExperts layout, llmkern.moe_mlp's
    operands): gate_up_proj [E, 2F, d] (each expert's gate rows [0, F), then its up rows) and
    down_proj [E, d, F] (nn.Linear layout per expert). No forward: MoE runs them."""

    def __init__(self, n_experts, d, width):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * width, d))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d, width))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=0.02)
        nn.init.normal_(self.down_proj, mean=0.0, std=0.02)


class MoE(nn.Module):
    """Sparse mixture of experts (Mixtral's SparseMoeBlock): each token goes through k of E SwiGLU
    experts, chosen by a linear router, and their outputs are summed with the routing weights

        p = softmax(gate(x))  [.., E];   (w, e) = top-k of p (w / sum(w) when moe_renormalize)
        y = sum_j w_j * expert_{e_j}(x)   (+ sigmoid(shared_expert_gate(x)) * shared_expert(x), Qwen2-MoE)

    backend="llmkern": llmkern.moe_mlp (grouped GEMMs over expert-sorted tokens on CUDA); "torch":
    transformers' loop over experts (the tokens routed to e, three matmuls, index_add back), or every
    expert on every token masked by the routing weights under torch.compile (static shapes)."""

    def __init__(self, cfg, backend="torch"):
        super().__init__()
        d, E = cfg.n_embd, cfg.n_experts
        self.n_experts, self.top_k, self.renormalize = E, cfg.n_experts_per_tok, cfg.moe_renormalize
        self.capacity_factor, self.drop_policy = cfg.moe_capacity_factor, cfg.moe_drop_policy
        self.gate = nn.Linear(d, E, bias=False)  # the router (transformers' `gate`)
        self.experts = Experts(E, d, cfg.moe_ffn_dim)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.moe_shared_ffn_dim:
            self.shared_expert = MLP(cfg, backend, width=cfg.moe_shared_ffn_dim)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.backend_name = backend

    def forward(self, x, router_logits=None):
        """x [B, T, d] -> [B, T, d]. router_logits: a list to append this layer's router logits
        [B*T, E] to (for the load-balancing loss)."""
        weights, ids = self.route(x, router_logits)
        y = run_experts(self.backend_name, x, self.experts.gate_up_proj, self.experts.down_proj, ids, weights)
        return self.add_shared(x, y)

    # route and add_shared are the layer's own parts around the routed experts: the parallel MoE layers
    # (llmkern.parallel.moe / .expert) run the experts their way between them, and a subclass with another
    # router (deepseek.DeepseekMoE) overrides them

    def route(self, x, router_logits=None):
        """x [B, T, d] -> (weights [B, T, k] float32, ids [B, T, k] int64): Mixtral's float32 softmax and top-k
        of the router's logits, which are appended ([B*T, E]) to the list router_logits when given; with
        config.moe_capacity_factor the pairs past an expert's capacity get id -1 (llmkern.moe_capacity)."""
        logits = self.gate(x)  # [B, T, E] (x's dtype, or autocast's)
        if router_logits is not None:
            router_logits.append(logits.reshape(-1, self.n_experts))
        return self.drop_over_capacity(*llmkern.moe_route(logits, self.top_k, renormalize=self.renormalize))

    def drop_over_capacity(self, weights, ids):
        """(weights, ids) with the pairs past an expert's capacity given id -1 (llmkern.moe_capacity) when the
        config sets moe_capacity_factor; as they are otherwise. (The parallel layers route through it too.)"""
        factor = getattr(self, "capacity_factor", None)
        if factor is None:
            return weights, ids
        return weights, llmkern.moe_capacity(ids, weights, self.n_experts, factor, self.drop_policy)

    def add_shared(self, x, y):
        """y plus the shared expert's output on x (Qwen2-MoE: gated by sigmoid(shared_expert_gate(x))), or y."""
        if self.shared_expert is None:
            return y
        return y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def run_experts(backend, x, w_gate_up, w_down, ids, weights):
    """sum_j weights[.., j] * expert_{ids[.., j]}(x): x [B, T, d]; ids / weights [B, T, k]. backend "llmkern":
    llmkern.moe_mlp; "torch": the expert loop (every expert on every token under torch.compile). Under
    autocast the experts' matmuls run in its dtype, as nn.Linear's would (moe_mlp wants one dtype for x and
    the weights; the stacked weights are not nn.Linear, autocast would not cast them). Also what the
    tensor-parallel MoE (llmkern.parallel.moe) runs on its shard of the experts."""
    dt = _checks.autocast_dtype(x) or x.dtype
    x, w_gate_up, w_down = x.to(dt), w_gate_up.to(dt), w_down.to(dt)
    if backend == "llmkern":
        return llmkern.moe_mlp(x, w_gate_up, w_down, ids, weights)
    if torch.compiler.is_compiling():
        return _experts_dense(x, w_gate_up, w_down, ids, weights)
    return _experts_loop(x, w_gate_up, w_down, ids, weights)


def _expert(x, w_gate_up, w_down):
    """One SwiGLU expert on rows x [n, d]: down(silu(gate x) * up x) -> [n, d]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # [n, F] each
    return F.linear(F.silu(gate) * up, w_down)


def _experts_loop(x, w_gate_up, w_down, ids, weights):
    """The torch backend's experts, transformers' loop: for each expert, the (token, slot) pairs routed
    to it, its MLP on those rows, scaled by their weights, added back. x [B, T, d]; ids / weights [B, T, k]."""
    B, T, d = x.shape
    x2, ids, weights = x.reshape(-1, d), ids.reshape(B * T, -1), weights.reshape(B * T, -1)
    y = torch.zeros_like(x2)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(ids == e)  # (a host sync on CUDA, as in transformers' eager loop)
        if tok.numel() == 0:
            continue
        out = _expert(x2[tok], w_gate_up[e], w_down[e]) * weights[tok, slot, None]
        y = y.index_add(0, tok, out.to(y.dtype))
    return y.view(B, T, d)


def _experts_dense(x, w_gate_up, w_down, ids, weights):
    """The same sum with static shapes, for torch.compile: every expert on every token, times the
    token's weight for it (0 when not routed there). E/k times the FLOPs of the loop."""
    coef = torch.zeros(*ids.shape[:-1], w_gate_up.shape[0], device=x.device, dtype=weights.dtype)
    kept = ids >= 0  # (a dropped pair, id -1 (moe_capacity): no expert, weight 0)
    coef = coef.scatter_add(-1, ids.clamp_min(0), torch.where(kept, weights, torch.zeros_like(weights)))  # [B, T, E]
    y = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        y = y + (_expert(x, w_gate_up[e], w_down[e]) * coef[..., e:e + 1]).to(y.dtype)
    return y


def load_balancing_loss(router_logits, top_k, attention_mask=None, pool=None):
    """The Switch Transformer / Mixtral auxiliary loss over the MoE layers (as transformers'
    load_balancing_loss_func computes it):

        E * sum_e f_e * P_e,   f_e = (top-k assignments to expert e) / tokens,   P_e = mean router probability of e

    where both are pooled over every layer's tokens (so f sums to k, P to 1; a uniform router gives k).
    router_logits: a list of [N, E] per layer (N = B*T tokens); attention_mask: optional [B, T] (0 =
    padding, not counted). Computed in float32. Differentiable through P (f is a count).
    pool: a function (counts, prob_sum, rows) -> the same summed over the ranks that hold the other tokens
    (context parallelism: ContextParallel.pool_router_stats), so that f and P are the whole sequence's."""
    if not router_logits:
        raise ValueError("load_balancing_loss: router_logits must list at least one layer's [tokens, n_experts]")
    E = router_logits[0].shape[-1]
    counts = torch.zeros(E, device=router_logits[0].device, dtype=torch.float32)
    prob_sum = torch.zeros_like(counts)
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(counts.device, torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        ids = torch.topk(probs, top_k, dim=-1).indices  # [N, k]
        per_row = torch.ones_like(probs[:, 0]) if mask is None else mask  # [N]: 1 for a counted token
        counts = counts.index_add(0, ids.reshape(-1), per_row.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * per_row[:, None]).sum(0)
        rows = rows + per_row.sum()
    if pool is not None:
        counts, prob_sum, rows = pool(counts, prob_sum, rows)
    return E * torch.sum((counts / rows) * (prob_sum / rows))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). With config.post_norms (Gemma 2/3) the outputs are
    normalised too, x + norm(attn(norm(x))) and x + norm(mlp(norm(x))), and the norms take Gemma's names:
    post_attention_layernorm is then the attention output's, pre/post_feedforward_layernorm the MLP's. With
    pre_norms=False as well (OLMo 2) only the output norms remain: x + norm(attn(x)), then x + norm(mlp(x)).
    config.residual_multiplier (Granite) scales each branch's output (after its output norm) before the add."""

    def __init__(self, cfg, backend, layer=0):
        super().__init__()
        d, eps, off = cfg.n_embd, cfg.norm_eps, cfg.norm_offset
        # DeepSeek-V2/V3's multi-head latent attention and MoE (DeepseekMoE) live in deepseek.py (imported here:
        # it builds on this module's RMSNorm, MLP and experts)
        from llmkern.models.deepseek import DeepseekMoE, MLAttention

        if cfg.pre_norms:
            self.input_layernorm = RMSNorm(d, eps, backend, off)
        self.self_attn = (MLAttention if cfg.kv_lora_rank else Attention)(cfg, backend, layer)
        self.post_attention_layernorm = RMSNorm(d, eps, backend, off)
        if cfg.post_norms:
            if cfg.pre_norms:
                self.pre_feedforward_layernorm = RMSNorm(d, eps, backend, off)
            self.post_feedforward_layernorm = RMSNorm(d, eps, backend, off)
        self.pre_norms, self.post_norms = cfg.pre_norms, cfg.post_norms
        self.residual_multiplier = cfg.residual_multiplier
        moe = DeepseekMoE if cfg.deepseek_moe else MoE
        self.mlp = moe(cfg, backend) if cfg.layer_is_moe(layer) else MLP(cfg, backend)

    def forward(self, x, cos, sin, cache=None, layer=None, prefix=None, kpm=None, router_logits=None):
        a = self.self_attn(self.input_layernorm(x) if self.pre_norms else x, cos, sin, cache, layer, prefix, kpm)
        if not self.pre_norms:  # OLMo 2: x + norm(a), then that sum + norm(mlp(sum))
            x = x + self._scaled(self.post_attention_layernorm(a))
            return x + self._scaled(self.post_feedforward_layernorm(self._mlp(x, router_logits)))
        if self.post_norms:  # Gemma 2/3: x + norm(a), and that sum's pre-MLP norm (one kernel on llmkern)
            h, x = self.pre_feedforward_layernorm(self._scaled(self.post_attention_layernorm(a)), residual=x)
            return x + self._scaled(self.post_feedforward_layernorm(self._mlp(h, router_logits)))
        h, x = self.post_attention_layernorm(self._scaled(a), residual=x)  # x + a and its norm (one kernel)
        return x + self._scaled(self._mlp(h, router_logits))

    def _scaled(self, y):
        """A branch's output times residual_multiplier (Granite: a Python float, as transformers multiplies)."""
        m = self.residual_multiplier
        return y if m == 1.0 else y * m

    def _mlp(self, h, router_logits):
        if isinstance(self.mlp, MoE):  # (DeepSeek's aux-loss-free DeepseekMoE, a MoE too, hands out none)
            return self.mlp(h, router_logits)
        return self.mlp(h)


class Llama(ZooModel):
    def __init__(self, config="llama-tiny", backend="llmkern"):
        super().__init__()
        cfg = get_config(config) if not isinstance(config, ModelConfig) else config
        if cfg.arch != "llama":
            raise ValueError(f"Llama needs config.arch='llama', got {cfg.arch!r} (use GPT)")
        self.config = cfg
        self._backend = check_backend(backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList([Block(cfg, backend, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps, backend, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for name, value in self._buffer_values().items():
            self.register_buffer(name, value, persistent=False)
        self._init_linear_weights()

    def _buffer_values(self):
        """The non-persistent buffers (see ZooModel.init_buffers)."""
        cfg = self.config
        values = {"inv_freq": rope_inv_freq(cfg)}
        if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope":  # (inv_freq: the short ones)
            values["inv_freq_long"] = longrope_inv_freq(cfg, cfg.rope_scaling["long_factor"])
        if cfg.rope_local_theta is not None:  # Gemma 3's sliding layers: plain RoPE of their own base
            values["inv_freq_local"] = rope_inv_freq(cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None))
        if cfg.scale_embeddings:  # Gemma: sqrt(d) as a float32 buffer, cast with the model, as transformers keeps it
            values["embed_scale"] = torch.tensor(cfg.n_embd ** 0.5, dtype=torch.float32)
        return values

    def _init_linear_weights(self, seed=None):
        """The linear layers' and embeddings' init: normal(0, 0.02) weights, zero biases, a zero padding row."""
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                self._normal_(m.weight, 0.02, seed, name + ".weight")
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        pad = self.config.pad_token_id
        if pad is not None:  # the lookup never trains that row: zero, as nn.Embedding / transformers leave it (the
            with torch.no_grad():  # loop above drew it again); a tied head's copy on a pipeline's last stage too
                for m in (self.embed_tokens, self.lm_head if self.config.tie_embeddings else None):
                    if m is not None:
                        m.weight[pad].zero_()

    def _init_parameters(self, seed):
        """The constructor's init (ZooModel.init_weights): normal(0, 0.02) linear layers, embeddings and experts
        (routers included), zero biases, padding row and DeepSeek selection bias, norm gains of 1."""
        from llmkern.models.deepseek import TopkRouter, _Float32Router

        for name, m in self.named_modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0 - m.offset)
            elif isinstance(m, Experts):
                self._normal_(m.gate_up_proj, 0.02, seed, name + ".gate_up_proj")
                self._normal_(m.down_proj, 0.02, seed, name + ".down_proj")
            elif isinstance(m, _Float32Router):
                self._normal_(m.weight, 0.02, seed, name + ".weight")
            if isinstance(m, TopkRouter):
                m.e_score_correction_bias.zero_()
        self._init_linear_weights(seed)

    def hf_module_names(self):
        """{zoo nn.Linear name: HFModule}: where each linear layer sits in transformers'
        LlamaForCausalLM (and Mistral/Qwen2/Qwen3/Gemma/Gemma2/Gemma3/DeepseekV2/V3ForCausalLM, which use the
        same names, MLA's projections included; the norms are not linear layers). The names are the same, but
        HF keeps the decoder under `model.`:
        layers.{i}.self_attn.q_proj here is model.layers.{i}.self_attn.q_proj there; lm_head is
        lm_head in both. (llmkern.peft's PEFT checkpoints use this to read and write HF names.)"""
        names = {"lm_head": HFModule("lm_head")}
        c = self.config
        for i in range(c.n_layer):
            subs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
            if c.kv_lora_rank:  # DeepSeek's MLA (DeepseekV3Attention's names)
                q = ["self_attn.q_proj"] if c.q_lora_rank is None else ["self_attn.q_a_proj", "self_attn.q_b_proj"]
                subs = q + ["self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"]
            mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
            if not c.layer_is_moe(i):
                subs += mlp
            elif c.moe_shared_ffn_dim and c.deepseek_moe:  # DeepSeek's ungated shared experts
                subs += [m.replace("mlp.", "mlp.shared_experts.") for m in mlp]
            elif c.moe_shared_ffn_dim:  # Qwen2-MoE's shared expert and its gate are nn.Linear there too
                subs += [m.replace("mlp.", "mlp.shared_expert.") for m in mlp] + ["mlp.shared_expert_gate"]
            # (the router and the stacked experts are not nn.Linear in transformers 5: no entry)
            for sub in subs:
                names[f"layers.{i}.{sub}"] = HFModule(f"model.layers.{i}.{sub}")
            if c.hf_fused_projections:  # Phi-3: q/k/v rows of qkv_proj, gate/up rows of gate_up_proj
                names.update(self._hf_fused_names(i))
        return names

    def _hf_fused_names(self, i):
        """{zoo name: HFModule} of layer i's projections in a model with transformers' fused qkv_proj (rows q, k, v)
        and gate_up_proj (rows gate, up): Phi3ForCausalLM's."""
        c = self.config
        q, kv, F = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
        qkv, gate_up = f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.mlp.gate_up_proj"
        return {f"layers.{i}.self_attn.q_proj": HFModule(qkv, slice(0, q)),
                f"layers.{i}.self_attn.k_proj": HFModule(qkv, slice(q, q + kv)),
                f"layers.{i}.self_attn.v_proj": HFModule(qkv, slice(q + kv, q + 2 * kv)),
                f"layers.{i}.mlp.gate_proj": HFModule(gate_up, slice(0, F)),
                f"layers.{i}.mlp.up_proj": HFModule(gate_up, slice(F, 2 * F))}

    def rope(self, pos, dtype, local=False):
        """cos, sin for positions pos ([T] or [B, T]): [T, R] or [B, 1, T, R] (R = config.rope_dim). local: those
        of the sliding layers' RoPE (config.rope_local_theta)."""
        inv_freq = self.inv_freq_local if local else self._global_inv_freq(pos)
        freqs = pos.float()[..., None] * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]
        s = None if local else self.config.rope_scaling
        scale = s.get("attention_factor", 1.0) if s else 1.0  # YaRN scales cos and sin (in float32)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def _global_inv_freq(self, pos):
        """The RoPE frequencies of a forward at positions pos. longrope: the long factors' when the forward's
        largest position + 1 exceeds original_max_position_embeddings, else the short factors', chosen per forward
        over the whole batch as transformers' longrope_frequency_update (on a tensor: no host sync). Keys already
        in a KV cache keep the rotation they were stored with, as in transformers' cache; under context
        parallelism the largest position is the whole sequence's."""
        s = self.config.rope_scaling
        if s is None or s["rope_type"] != "longrope" or pos.numel() == 0:
            return self.inv_freq
        last = pos.max()
        cp = self.context_parallel
        if cp is not None:  # (every rank must take the same factors: the largest position over the ranks)
            last = last.clone()
            torch.distributed.all_reduce(last, op=torch.distributed.ReduceOp.MAX, group=cp.group)
        return torch.where(last + 1 > s["original_max_position_embeddings"], self.inv_freq_long, self.inv_freq)

    def longrope_recompute(self, cached, total):
        """Whether transformers' Phi3ForCausalLM.generate drops its KV cache at this step and runs the whole
        sequence again: longrope, `cached` (the cache's length) <= original_max_position_embeddings and `total`
        (the tokens so far, padding included) > it, i.e. the first step that takes the long factors while the
        cached keys were rotated with the short ones (its prepare_inputs_for_generation)."""
        s = self.config.rope_scaling
        if s is None or s["rope_type"] != "longrope":
            return False
        original = s["original_max_position_embeddings"]
        return cached <= original < total

    def _apply(self, fn, *args, **kwargs):
        # The RoPE frequencies stay float32 when the model is cast (.to(torch.bfloat16), .half()), as
        # in transformers: rounded to bf16 they would shift each angle pos * inv_freq by up to
        # pos * inv_freq * 2^-9 radians.
        names = [n for n in ("inv_freq", "inv_freq_local", "inv_freq_long") if hasattr(self, n)]
        before = {n: getattr(self, n) for n in names}
        super()._apply(fn, *args, **kwargs)
        for n in names:
            if getattr(self, n).dtype != before[n].dtype:
                setattr(self, n, before[n].to(getattr(self, n).device))
        return self

    def embed(self, input_ids):
        """The token embeddings [B, T, d] the blocks take (the pipeline's first stage calls it too)."""
        x = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:  # Gemma: times sqrt(d), that factor rounded to x's dtype first
            x = x * self.embed_scale.to(x.dtype)
        if self.config.embedding_multiplier != 1.0:  # Granite: times a Python float (not rounded to x's dtype)
            x = x * self.config.embedding_multiplier
        return x

    def forward(self, input_ids, labels=None, *, cache=None, last_only=False, attention_mask=None,
                position_ids=None, return_logits=True):
        """Logits [B, T, V]; (logits, loss) when labels are given. With a KVCache, input_ids are
        the next tokens after the cache's contents and the cache is extended. last_only=True
        computes the logits of the last position only ([B, 1, V], for decoding). attention_mask /
        position_ids: Hugging Face semantics (see ZooModel._check_input), for padded batches.
        return_logits=False with labels: (None, loss), the loss from the LM head without the [B, T, V]
        logits (llmkern.linear_cross_entropy on the llmkern backend: training's memory saver)."""
        prefixes = self.prefixes(input_ids.shape[0]) if torch.is_tensor(input_ids) and input_ids.dim() == 2 else None
        P = self.prefix_length(prefixes)
        start, pos, kpm = self._check_input(input_ids, cache, attention_mask, position_ids, offset=P)
        last_only, return_logits = self._check_loss_args(input_ids, labels, last_only, return_logits)
        T = input_ids.shape[1]
        x = self.embed(input_ids)  # [B, T, d]
        if pos is None:
            pos = self.positions(start, T, input_ids.device) + P
        # positions derived here (cache, attention_mask) stay below block_size: only the caller's are
        # checked (reading them is a host sync)
        elif position_ids is not None and self.config.rope_scaling and \
                self.config.rope_scaling["rope_type"] == "dynamic" and pos.numel() and \
                int(pos.max()) >= self.config.block_size:
            raise ValueError(f"position_ids: rope_type 'dynamic' rescales its frequencies for positions >= "
                             f"block_size={self.config.block_size}, which is not supported; got {int(pos.max())}")
        rope = self.rope(pos, x.dtype)  # (cos, sin)
        local = self.rope(pos, x.dtype, local=True) if self.config.rope_local_theta is not None else rope
        # the MoE layers' router logits, collected only when the load-balancing loss will use them
        aux = [] if labels is not None and self.config.n_experts and self.config.router_aux_loss_coef else None
        for i, block in enumerate(self.layers):
            cos, sin = local if self.config.layer_rope_is_local(i) else rope
            x = self.run_block(block, x, cos, sin, cache=cache, layer=i, prefix=prefixes[i], kpm=kpm,
                               router_logits=aux)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        h = self.norm(x)
        if labels is not None and not return_logits:
            return None, self._with_aux_loss(self.fused_lm_loss(h, labels), aux, attention_mask, T)
        logits = self.head_logits(h)
        if labels is None:
            return logits
        return logits, self._with_aux_loss(self.lm_loss(logits, labels), aux, attention_mask, T)

    def _with_aux_loss(self, loss, router_logits, attention_mask, T):
        """loss + router_aux_loss_coef * the load-balancing loss of this forward's T tokens (padding not
        counted), as MixtralForCausalLM adds it when it outputs router logits; loss itself when off."""
        if not router_logits:
            return loss
        mask = None if attention_mask is None else attention_mask[:, -T:]
        cp = self.context_parallel  # (its ranks hold the rest of the sequence: f and P pooled over them)
        aux = load_balancing_loss(router_logits, self.config.n_experts_per_tok, mask,
                                  pool=None if cp is None else cp.pool_router_stats)
        return loss + self.config.router_aux_loss_coef * aux.to(loss.dtype)
