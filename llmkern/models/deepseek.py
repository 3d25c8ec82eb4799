"""DeepSeek-V2/V3's two blocks for the zoo's Llama: multi-head latent attention and the DeepSeek MoE.

Llama (llama.py) builds them from the config: MLAttention when config.kv_lora_rank > 0, DeepseekMoE on the
MoE layers when config.moe_router is "sigmoid" (DeepSeek-V3's aux-loss-free router, TopkRouter) or
"softmax_group" (DeepSeek-V2's softmax router, greedy or group-limited greedy, SoftmaxGroupRouter). Module and
parameter names are transformers' DeepseekV3ForCausalLM's / DeepseekV2ForCausalLM's (q_a_proj, q_a_layernorm,
q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj; mlp.gate.weight (and V3's
mlp.gate.e_score_correction_bias), mlp.experts.gate_up_proj / down_proj, mlp.shared_experts.*), so checkpoints
and PEFT adapters carry over by name. The two families' attention is the same computation (V2 rotates its
interleaved rotary pairs as complex numbers and keeps them interleaved, V3 writes them as (evens, odds): the
same channels permuted alike in q and k, so the same scores).

MLA (DeepSeek-V2 section 2.1): per token,
    q      = q_b_proj(norm(q_a_proj(x)))  (or q_proj(x))                   [H, nope + rope]
    c, kpe = kv_a_proj_with_mqa(x)                                          [R], [rope]: one key head for all
    k_nope, v = kv_b_proj(norm(c))                                          [H, nope], [H, v_head_dim]
    k      = (k_nope, RoPE(kpe) for every head),  q = (q_nope, RoPE(q_pe))
RoPE turns only the rope channels. The keys and values are materialised per head; the default KV cache holds
them (KVCache [B, H, T, nope + rope] and [B, H, T, Dv]).

The latent cache (model.new_cache(..., latent=True), or model.latent_cache = True for generate): per token only
(norm(c), RoPE(kpe)) [R + Dr] (LatentKVCache, one "head"), and decoding absorbs kv_b_proj (DeepSeek-V2 section
2.1.2; FlashMLA's layout). With kv_b_proj's weight split per head into W_uk [H, nope, R] and W_uv [H, Dv, R]:
    q_nope . k_nope = q_nope . (W_uk c) = (q_nope W_uk) . c,   so q = (q_nope W_uk, RoPE(q_pe))   [H, R + Dr]
    sum_j p_j v_j   = W_uv (sum_j p_j c_j)
an MQA over the cache (keys: the cache, values: its first R channels, a view), with the original softmax
scale (of nope + rope), then W_uv and o_proj. backend="llmkern" runs it as llmkern.mla_decode (a Triton kernel
that reads each latent tile once for the scores and the values, up to 512 + 256 channels; the reference on a
CPU), backend="torch" as SDPA. The prompt (an empty cache) takes the per-head path (fewer FLOPs
for long prompts: nope + rope < R + Dr channels per score) and writes the latent.

Parallelism (llmkern.parallel): tensor_parallelize shards MLA by heads (q_b_proj or q_proj and kv_b_proj
column-parallel, o_proj row-parallel, the down projections and latent norms replicated; `shared_key_grad`
below) and DeepseekMoE as any zoo MoE (a llama.MoE subclass: only its route and shared experts differ);
expert_parallelize and context_parallelize take these models as they take Llama / Mixtral.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmkern
from llmkern._backend import warn_once
from llmkern.models._attn import _cache_mask, attend
from llmkern.models.llama import MLP, Experts, MoE, RMSNorm, apply_rope
from llmkern.ops import _checks
from llmkern.ops import mla_decode as mla_ops

# transformers builds q_a_layernorm / kv_a_layernorm with DeepseekV3RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def _unwrapped_parallel(m):
    """True for a tensor-parallel linear layer without LoRA factors (its forward is x W^T, W its shard)."""
    if getattr(m, "lora_A", 0) is not None:
        return False
    from llmkern.parallel.layers import _ParallelLinear

    return isinstance(m, _ParallelLinear)


class MLAttention(nn.Module):
    """Multi-head latent attention (see the module docstring); the forward has Attention's signature."""

    def __init__(self, cfg, backend, layer=0):
        super().__init__()
        d, H = cfg.n_embd, cfg.n_head
        self.n_head = self.n_kv_head = H  # (new_cache reads n_kv_head: every head has its own k and v)
        self.head_dim, self.v_head_dim = cfg.head_dim, cfg.v_head_dim
        self.nope, self.rope_dim, self.kv_rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * cfg.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, backend, cfg.norm_offset)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, backend, cfg.norm_offset)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=False)
        self.interleave = cfg.rope_interleave
        self.scale = cfg.attn_scale  # (None: head_dim ** -0.5; YaRN's mscale_all_dim correction otherwise)
        self.dropout = cfg.dropout
        self.backend_name = backend

    # Set by tensor_parallelize: a function applied to the rotary key head k_pe, which every head uses. With
    # the heads sharded, each rank's gradient of k_pe is its heads' part only, so the function's backward sums
    # it over the ranks (its forward is the identity); then kv_a_proj_with_mqa and x get the whole gradient
    # (the other replicated inputs of sharded layers get it from the column-parallel layers' backward).
    shared_key_grad = None

    def forward(self, x, cos, sin, cache=None, layer=None, prefix=None, kpm=None):
        if prefix is not None:  # (a prefix's values would need v_head_dim, its keys the rope split: not done)
            raise NotImplementedError("prefix-tuning is not supported with multi-head latent attention")
        B, T, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        if getattr(cache, "latent", False):
            y = self._attend_latent(q_nope, q_pe, c_kv, k_pe, cache, layer, kpm)
        else:
            k, v = self._expand(c_kv, k_pe)
            # v keeps its own head dim (Dv < D): llmkern.attention and SDPA take it as it is
            y = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, backend=self.backend_name, cache=cache, layer=layer,
                       key_padding_mask=kpm, scale=self.scale,
                       context_parallel=getattr(self, "context_parallel", None),
                       dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, Dv]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.v_head_dim))

    def _project(self, x, cos, sin):
        """x [B, T, d] -> q_nope [B, H, T, nope], q_pe [B, H, T, Dr] (rotated), the normalised latent
        c_kv [B, T, R] and the shared rotary key k_pe [B, 1, T, Dr] (rotated)."""
        B, T, _ = x.shape
        H, nope, Dr = self.n_head, self.nope, self.rope_dim
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, H, self.head_dim).transpose(1, 2).split([nope, Dr], dim=-1)  # [B, H, T, .]
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, Dr], dim=-1)  # [B, T, R], [B, T, Dr]
        if self.shared_key_grad is not None:
            k_pe = self.shared_key_grad(k_pe)
        q_pe, k_pe = self._rope(q_pe, k_pe.unsqueeze(1), cos, sin)  # k_pe [B, 1, T, Dr]: one head, shared
        return q_nope, q_pe, self.kv_a_layernorm(c.contiguous()), k_pe

    def _expand(self, c_kv, k_pe):
        """The per-head keys [B, H, T, nope + Dr] and values [B, H, T, Dv] of the latents c_kv [B, T, R] and
        k_pe [B, 1, T, Dr]."""
        B, T, _ = c_kv.shape
        H, nope, Dv = self.n_head, self.nope, self.v_head_dim
        kv = self.kv_b_proj(c_kv)  # [B, T, H * (nope + Dv)]
        k_nope, v = kv.view(B, T, H, nope + Dv).transpose(1, 2).split([nope, Dv], dim=-1)
        return torch.cat([k_nope, k_pe.expand(B, H, T, self.rope_dim)], dim=-1), v

    def _attend_latent(self, q_nope, q_pe, c_kv, k_pe, cache, layer, kpm):
        """Attention through a LatentKVCache (see the module docstring) -> [B, H, T, Dv]."""
        R = self.kv_rank
        # under autocast the latent norm gives float32; cache the autocast dtype, which kv_b_proj's matmul (the
        # per-head path) would read it in anyway: the cache stays half the size
        dt = _checks.autocast_dtype(c_kv) or k_pe.dtype
        latent = torch.cat([c_kv.unsqueeze(1), k_pe], dim=-1).to(dt)  # [B, 1, T, R + Dr]: what is cached
        dropout_p = self.dropout if self.training else 0.0
        if cache.uniform and cache.seqlen == 0:  # the prompt: no earlier token to read, per-head attention
            cache.append(layer, latent)
            k, v = self._expand(c_kv, k_pe)
            return attend(torch.cat([q_nope, q_pe], dim=-1), k, v, backend=self.backend_name,
                          key_padding_mask=kpm, scale=self.scale, dropout_p=dropout_p)
        w_uk, w_uv, b_v = self._absorbed_weights(c_kv)  # [H, nope, R], [H, Dv, R], [H, Dv] or None
        # (einsum batches over the heads: matmul would broadcast, i.e. copy, the weights over the batch)
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_pe], dim=-1)  # [B, H, T, R + Dr]
        # the scale is the per-head scores' (of nope + rope channels): the absorbed scores are the same numbers
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        if self.backend_name == "llmkern" and dropout_p == 0.0 and _mla_decode_fits(R, self.rope_dim):
            y = _latent_decode(q, latent, cache, layer, kpm, scale)  # [B, H, T, R]
        else:  # SDPA (plain torch): MQA over the latent, one "head" for all
            if self.backend_name == "llmkern" and dropout_p == 0.0:
                warn_once("mla-latent-sdpa", f"llmkern: the latent KV cache's {R} + {self.rope_dim} channels exceed "
                                             f"llmkern.mla_decode's limits; decoding runs SDPA (plain torch)")
            y = attend(q, latent, latent[..., :R], backend="torch", cache=cache, layer=layer, key_padding_mask=kpm,
                       scale=scale, dropout_p=dropout_p)
        out = torch.einsum("bhtr,hvr->bhtv", y, w_uv)  # [B, H, T, Dv]
        # kv_b_proj's bias: its key part shifts every score of a query equally (the softmax drops it), its value
        # part adds b_v (the attention weights sum to 1)
        return out if b_v is None else out + b_v[:, None, :]

    def _absorbed_weights(self, like):
        """kv_b_proj split per (local) head: W_uk [H, nope, R], W_uv [H, Dv, R] and the values' bias [H, Dv]
        (None without a bias; the keys' bias cancels in the softmax).

        A plain nn.Linear (or an unwrapped tensor-parallel shard: its rows are this rank's heads) gives its
        weight, viewed. A wrapped one (LoRA / DoRA / QLoRA, llmkern.peft or PEFT, merged or not) is run on the
        identity and on zeros: x W^T + b at x = I and x = 0 give the weight and the bias its forward applies,
        the adapter merged in, whatever the wrapper. That costs R x R x out multiply-adds per layer and step;
        merge_lora(model) first to serve. Per-sample adapters (PEFT's adapter_names) cannot be absorbed into
        one weight: NotImplementedError."""
        m, R, H, nope, Dv = self.kv_b_proj, self.kv_rank, self.n_head, self.nope, self.v_head_dim
        if type(m) is nn.Linear or _unwrapped_parallel(m):
            w, b = m.weight, m.bias  # [H * (nope + Dv), R], [H * (nope + Dv)] or None
        else:  # (the identity in the latent's dtype: what the per-head path feeds kv_b_proj)
            if any(mod._forward_pre_hooks for mod in m.modules()):  # PEFT's per-sample adapter_names hook
                raise NotImplementedError("the latent KV cache cannot absorb per-sample adapters (adapter_names) "
                                          "into kv_b_proj: use the full cache (new_cache(latent=False))")
            eye = torch.eye(R, dtype=like.dtype, device=like.device)
            b = m(torch.zeros_like(eye[:1]))[0]  # x = 0: the bias (zeros without one; no host read to tell)
            w = (m(eye) - b).t()                 # x = I: W^T + b
        w_uk, w_uv = w.reshape(H, nope + Dv, R).split([nope, Dv], dim=1)
        b_v = None if b is None else b.reshape(H, nope + Dv)[:, nope:]
        return w_uk, w_uv, b_v

    def _rope(self, q_pe, k_pe, cos, sin):
        """RoPE on the rotary channels ([B, H or 1, T, Dr]). Interleaved checkpoints (DeepSeek-V3) pair the
        channels (2i, 2i+1); transformers rotates those pairs and writes the results as (evens, odds), which is
        the rotate-half RoPE of the channels gathered to (evens, odds) first: done so here, same values."""
        if self.interleave:
            q_pe = torch.cat([q_pe[..., 0::2], q_pe[..., 1::2]], dim=-1)
            k_pe = torch.cat([k_pe[..., 0::2], k_pe[..., 1::2]], dim=-1)
        if self.backend_name == "llmkern" and q_pe.dtype == k_pe.dtype:
            return llmkern.rope(q_pe, k_pe, cos, sin)
        return apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)


def _mla_decode_fits(kv_rank, rope_dim):
    return kv_rank <= mla_ops.MAX_HEAD_DIM_V and rope_dim <= mla_ops.MAX_ROPE_DIM


def _latent_decode(q, latent, cache, layer, kpm, scale):
    """llmkern.mla_decode of the absorbed queries q [B, H, T, R + Dr] over the latent cache, after appending
    this forward's latent [B, 1, T, R + Dr] -> [B, H, T, R]. Row b's T queries sit at its slots
    lengths[b] .. lengths[b] + T - 1 (the cache's offset for every row while it is uniform) and see the slots
    up to their own, as attend() does for the full cache (its _attend_rows after a per-row rollback)."""
    B, T = q.shape[0], q.shape[2]
    if cache.uniform:
        seqlens = torch.full((B,), cache.seqlen + T, dtype=torch.int32, device=q.device)
    else:
        seqlens = (cache.lengths.to(device=q.device, dtype=torch.int32) + T)
    kv, _ = cache.append(layer, latent)
    fp8 = {"kv_scale": cache.scales()["k_scale"]} if cache.fp8 else {}  # (float8: q stays in the latent's dtype)
    return mla_ops.mla_decode(q.to(latent.dtype if cache.fp8 else kv.dtype), kv, seqlens, head_dim_v=cache.kv_rank,
                              causal=True, scale=scale, **fp8, **_cache_mask(kpm, kv.shape[2]))


def sigmoid_group_route(logits, bias, top_k, n_group, topk_group, renormalize, scaling):
    """DeepSeek-V3's aux-loss-free routing of N tokens over E experts: logits [N, E] (float32) and the
    selection bias [E] -> (weights [N, k] float32, ids [N, k] int64).

    s = sigmoid(logits); the choice ranks s + bias (the bias steers the load; it never enters a weight):
    the experts form n_group equal groups, each group scores the sum of its top-2 biased scores, the
    best topk_group groups stay, and the top_k biased scores within them are chosen. The weights are the
    chosen experts' unbiased s, divided by their sum (+ 1e-20) when renormalize, times scaling."""
    N, E = logits.shape
    scores = torch.sigmoid(logits)
    biased = scores + bias
    group_scores = biased.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [N, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)  # [N, G]
    keep = keep.repeat_interleave(E // n_group, dim=1)  # [N, E]: the experts of the kept groups
    ids = biased.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices  # [N, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def softmax_group_route(logits, top_k, n_group, topk_group, renormalize, scaling):
    """DeepSeek-V2's routing of N tokens over E experts (transformers' DeepseekV2TopkRouter): logits [N, E]
    (float32) -> (weights [N, k] float32, ids [N, k] int64).

    p = softmax(logits) in float32; the experts form n_group equal groups, each group scores the MAX of its p,
    the best topk_group groups stay and the p of the other groups' experts are set to 0; the ids are the top_k
    of those scores, the weights their p (divided by their sum + 1e-20 when renormalize; transformers' V2
    never renormalises), times scaling. topk_method "group_limited_greedy" is that; "greedy" (plain top-k of p)
    is n_group = topk_group = 1. (The kept groups hold the topk_group best experts: the limit changes the choice
    only when top_k > topk_group.) The top-k calls are transformers' (sorted=False), so ties resolve alike."""
    N, E = logits.shape
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if n_group > 1:
        group_scores = scores.view(N, n_group, E // n_group).max(dim=-1).values  # [N, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False).indices, True)  # [N, G]
        scores = scores.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), 0.0)  # [N, E]
    weights, ids = scores.topk(top_k, dim=-1, sorted=False)  # [N, k]
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class _Float32Router(nn.Module):
    """A DeepSeek router: weight [E, d] (the router logits are computed in float32), kept float32 when the
    model is cast."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))
        self.reset_parameters()
        self.top_k, self.renormalize = cfg.n_experts_per_tok, cfg.moe_renormalize
        self.n_group, self.topk_group, self.scaling = cfg.moe_n_group, cfg.moe_topk_group, cfg.moe_routed_scaling

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def _apply(self, fn, *args, **kwargs):
        # transformers keeps the router's weight (and V3's bias) float32 whatever the model's dtype
        # (_keep_in_fp32_modules_strict): the choice hinges on small score differences (the bias's especially),
        # which bf16 would round away. A cast to 16 bits moves them (device) but keeps their float32 values.
        def keep_fp32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in (torch.float16, torch.bfloat16):
                return t.to(out.device)
            return out

        return super()._apply(keep_fp32, *args, **kwargs)

    def forward(self, x):
        """x [B, T, d] -> (weights [B, T, k] float32, ids [B, T, k])."""
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())  # [B*T, E] float32
        w, ids = self._route(logits)
        return w.view(*x.shape[:-1], -1), ids.view(*x.shape[:-1], -1)


class TopkRouter(_Float32Router):
    """transformers' DeepseekV3TopkRouter's parameters: weight [E, d] (the router logits, computed in float32)
    and the buffer e_score_correction_bias [E] (trained outside backprop, by the load; a checkpoint's);
    sigmoid_group_route (moe_router "sigmoid")."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))

    def _route(self, logits):
        return sigmoid_group_route(logits, self.e_score_correction_bias.float(), self.top_k, self.n_group,
                                   self.topk_group, self.renormalize, self.scaling)


class SoftmaxGroupRouter(_Float32Router):
    """transformers' DeepseekV2TopkRouter's parameter: weight [E, d] (float32 logits; no selection bias);
    softmax_group_route (moe_router "softmax_group")."""

    def _route(self, logits):
        return softmax_group_route(logits, self.top_k, self.n_group, self.topk_group, self.renormalize,
                                   self.scaling)


ROUTERS = {"sigmoid": TopkRouter, "softmax_group": SoftmaxGroupRouter}  # moe_router -> DeepseekMoE's gate


class DeepseekMoE(MoE):
    """DeepSeek-V2/V3's MoE layer: y = sum_j w_j * expert_{e_j}(x) + shared_experts(x), (w, e) from the router
    of config.moe_router (ROUTERS: V3's sigmoid group-limited TopkRouter, V2's softmax SoftmaxGroupRouter); the
    shared experts are one ungated SwiGLU MLP of width config.moe_shared_ffn_dim (n_shared_experts *
    moe_intermediate_size). Experts as in llama.MoE: llmkern.moe_mlp on backend "llmkern", transformers' loop
    on "torch".

    A llama.MoE with its own route and add_shared (llama.MoE's forward runs them around the experts), so
    that the parallel MoE layers (tensor and expert parallelism) take it as they take Mixtral's."""

    def __init__(self, cfg, backend="torch"):
        nn.Module.__init__(self)  # (not MoE.__init__: another router and shared experts, transformers' names)
        self.n_experts, self.top_k, self.renormalize = cfg.n_experts, cfg.n_experts_per_tok, cfg.moe_renormalize
        if cfg.moe_router not in ROUTERS:
            raise ValueError(f"DeepseekMoE needs config.moe_router in {tuple(ROUTERS)}, got {cfg.moe_router!r}")
        self.gate = ROUTERS[cfg.moe_router](cfg)
        self.experts = Experts(cfg.n_experts, cfg.n_embd, cfg.moe_ffn_dim)
        self.shared_experts = MLP(cfg, backend, width=cfg.moe_shared_ffn_dim) if cfg.moe_shared_ffn_dim else None
        self.shared_expert = self.shared_expert_gate = None  # (llama.MoE's gated Qwen2-MoE expert: none here)
        self.backend_name = backend

    def route(self, x, router_logits=None):
        """x [B, T, d] -> (weights [B, T, k] float32, ids [B, T, k]) from the router (gate). No aux loss (V3 is
        aux-loss-free; transformers' V2 computes none): no router logits are handed out (router_logits, if a
        list, is left as it is)."""
        return self.gate(x)

    def add_shared(self, x, y):
        return y if self.shared_experts is None else y + self.shared_experts(x)
