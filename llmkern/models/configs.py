"""Model configurations of the zoo: one dataclass, named sizes, validation.

Named sizes (``get_config(name)``):
  gpt2, gpt2-medium, gpt2-large, gpt2-xl          GPT-2 (Radford et al. 2019), context 1024
  gpt3-125m ... gpt3-175b                          the eight sizes of GPT-3 Table 2.1, context 2048
  llama-7b, llama-13b, llama2-7b, llama3-8b, ...   LLaMA-style (RMSNorm, RoPE, SwiGLU, GQA)
  mixtral-8x7b                                     sparse MoE: 8 experts, top-2 (counting only)
  deepseek-v3                                      MLA + 256 sigmoid-routed experts, top-8 (counting only)
  deepseek-v2-lite                                 MLA + 64 softmax-routed experts, top-6 (counting only)
  pythia-70m, pythia-160m, pythia-410m, pythia-1b  GPT-NeoX (EleutherAI's Pythia config.json): a NeoXConfig
  phi-2                                            Phi-2 (microsoft/phi-2 config.json): a NeoXConfig
  gpt-tiny, llama-tiny, mixtral-tiny,              a few hundred thousand parameters, for tests
  deepseek-v3-tiny, deepseek-v2-tiny, neox-tiny

The GPT-NeoX / Phi names give a llmkern.models.neox.NeoXConfig (its own dataclass: parallel residual, LayerNorms,
partial RoPE, Phi's head bias), not a ModelConfig; get_config's overrides are that class's fields.

Llama-family options (off by default; from_hf sets them for Mistral, Qwen2 and Qwen3 checkpoints):
  qkv_bias, o_bias      biases on q/k/v_proj and on o_proj, apart from `bias` (which then covers the
                        MLP only): Qwen2 has q/k/v biases only, Qwen3's attention_bias all four
  qk_norm               RMSNorm over head_dim of each head of q and k, before RoPE (Qwen3)
  sliding_window        W: query i sees keys i-W+1..i (Mistral, Qwen2/3 with use_sliding_window),
  sliding_window_layers in the layers listed (None: every layer)
  hf_fused_projections  transformers' model has one qkv_proj and one gate_up_proj (Phi-3): the zoo's layers are
                        the same, only hf_module_names (PEFT checkpoints) maps them onto those fused rows
  rotary_dim            partial rotary (Phi-4-mini's partial_rotary_factor): RoPE rotates the first rotary_dim
                        channels of each q/k head (an even int in 2..head_dim), the others pass through unchanged
                        (None: all head_dim channels)

rope_scaling "longrope" (Phi-3 128k, Phi-3.5-mini, Phi-4-mini; transformers' _compute_longrope_parameters): the
frequencies theta^(-2i/d) are divided per frequency by short_factor[i] (d / 2 numbers, d the rotary width) while a
forward's positions stay below original_max_position_embeddings (max(position) + 1 <= it), by long_factor[i] once
they reach past it, chosen per forward as transformers does; cos and sin are multiplied by attention_factor
(default sqrt(1 + ln(factor) / ln(original_max_position_embeddings)) for factor > 1, else 1; factor defaults to
block_size / original_max_position_embeddings).

Gemma options (Llama family, off by default; from_hf sets them for Gemma, Gemma 2 and Gemma 3 text):
  activation            "gelu_tanh" / "gelu": the MLP is GeGLU, down(gelu(gate(x)) * up(x)) (Gemma)
  norm_offset           every RMSNorm multiplies by (norm_offset + weight), in float32 with one rounding
                        at the end (Gemma: 1.0, the gains stored around 0; 0: Llama's weight)
  scale_embeddings      token embeddings times sqrt(n_embd), that factor rounded to their dtype (Gemma)
  post_norms            Gemma 2/3's sandwich block: RMSNorms on the attention output and around the MLP
  attn_scale            the softmax scale of the attention scores (None: head_dim ** -0.5; Gemma 2/3:
                        query_pre_attn_scalar ** -0.5)
  attn_softcap          the scaled scores soft-capped, c * tanh(s / c), before the mask (Gemma 2)
  logit_softcap         the LM head's logits soft-capped the same way, in the loss too (Gemma 2/3)
  rope_local_theta      the RoPE base of the sliding-window layers, plain RoPE without rope_scaling
                        (Gemma 3's local layers); None: the same RoPE in every layer

Granite and OLMo 2 options (Llama family, off by default; from_hf sets them for Granite and OLMo 2):
  embedding_multiplier  token embeddings times this Python float (Granite; 1.0: off)
  residual_multiplier   each block's attention and MLP outputs times this before their residual adds (Granite)
  logits_scaling        the LM head's logits divided by this, in the loss too (Granite; 1.0: off). Granite's
                        attention_multiplier is attn_scale
  pre_norms             False: no norms before the attention and the MLP (OLMo 2's post-norm block,
                        x + norm(attn(x)) then x + norm(mlp(x)); needs post_norms)
  qk_norm_full          with qk_norm: q and k normalised over all their heads' channels at once, one gain per
                        channel of q_proj / k_proj's output (OLMo 2), instead of over each head's head_dim

Sparse mixture of experts (Llama family; off with n_experts = 0, the dense SwiGLU MLP):
  n_experts             E > 0: the MLP of each MoE layer is E SwiGLU experts of width moe_ffn_dim
                        (default intermediate_size) and a router (Mixtral, Qwen2-MoE, Qwen3-MoE)
  n_experts_per_tok     k in 1..E experts per token (default 2, Mixtral's), softmax-top-k routed
  moe_renormalize       the k routing weights divided by their sum (Mixtral; Qwen's norm_topk_prob)
  moe_shared_ffn_dim    > 0: a shared expert of that width on every token, scaled by a sigmoid gate
                        (Qwen2-MoE)
  moe_layers            the layers that are sparse (None: all); the others keep the dense MLP of
                        intermediate_size (Qwen-MoE's mlp_only_layers / decoder_sparse_step)
  router_aux_loss_coef  > 0: the Switch/Mixtral load-balancing loss times this is added to the
                        returned loss (0: off)
  moe_router            "softmax" (above), or one of DeepSeek's two routers (the MoE layer is then
                        deepseek.DeepseekMoE, and the shared experts (moe_shared_ffn_dim wide,
                        n_shared_experts * moe_intermediate_size in DeepSeek's terms) are ungated):
                        "sigmoid", DeepSeek-V3's aux-loss-free router: sigmoid scores s, the layer's
                        e_score_correction_bias b added for the choice only (top moe_topk_group of
                        moe_n_group expert groups by the sum of each group's top-2 s + b, then the top k of
                        s + b in those groups), the weights the chosen s (divided by their sum when
                        moe_renormalize) times moe_routed_scaling;
                        "softmax_group", DeepSeek-V2's router: float32 softmax scores p, the top
                        moe_topk_group of moe_n_group groups by the MAX of each group's p (the other groups'
                        p set to 0), then the top k of p; the weights the chosen p (divided by their sum when
                        moe_renormalize; transformers' V2 does not) times moe_routed_scaling. V2's topk_method
                        "greedy" is moe_n_group = moe_topk_group = 1, "group_limited_greedy" any group limit.
                        Neither has an aux loss (router_aux_loss_coef must be 0)
  moe_capacity_factor   None: dropless (every routed pair computed); c > 0: each expert of a layer takes at most
                        ceil(tokens * k / n_experts * c) (token, slot) pairs of the forward's tokens, the others
                        dropped (llmkern.moe_capacity: GShard / Switch / Megatron-LM's capacity factor); the
                        "softmax" router only. Under expert parallelism the tokens are each rank's own batch
                        (Megatron-LM's); tensor parallelism with sequence parallelism refuses it.
  moe_drop_policy       which pairs an expert over capacity keeps: "probs" (the highest routing weights,
                        Megatron-LM's default) or "position" (the earliest tokens, Megatron's other policy)
  moe_n_group, moe_topk_group, moe_routed_scaling
                        the DeepSeek routers' group limit and weight scale (1, 1, 1.0: off; the "softmax"
                        router must leave them there). moe_n_group divides n_experts ("sigmoid": into
                        groups of >= 2, as groups rank by their top-2 scores), moe_topk_group lies in
                        1..moe_n_group, and the kept groups hold at least n_experts_per_tok experts
Named: mixtral-8x7b (the real sizes: 46.7B parameters, 12.9B active per token), mixtral-tiny (tests),
deepseek-v3 (671B parameters, 37.6B active; counting only), deepseek-v2-lite (15.7B parameters, 2.7B active;
counting only), deepseek-v3-tiny and deepseek-v2-tiny (tests).

Multi-head latent attention (DeepSeek-V2/V3's MLA; Llama family; off with kv_lora_rank = 0):
  kv_lora_rank          R > 0: each token's keys and values come from a compressed latent of width R
                        (kv_a_proj_with_mqa, RMSNorm kv_a_layernorm, kv_b_proj up to the heads), plus one
                        rotary key head of qk_rope_head_dim channels shared by all heads
  q_lora_rank           the queries through a bottleneck of this rank (q_a_proj, q_a_layernorm, q_b_proj);
                        None: one q_proj
  qk_rope_head_dim      the rotary channels at the end of each q/k head; head_dim (the q/k head width) is
                        qk_nope_head_dim + qk_rope_head_dim, and RoPE (rope_scaling too) runs over these only
  v_head_dim            the value head width (default head_dim); the attention output is n_head * v_head_dim
  rope_interleave       the rotary channels come in pairs (2i, 2i+1) (DeepSeek-V3's rope_interleave, and
                        always in DeepSeek-V2): they are gathered to (evens, odds) before the usual rotate-half
                        RoPE, as transformers' V3 does (V2's complex rotation of the pairs gives the same scores)
  n_kv_head must equal n_head (every head has its own keys); qk_norm, q/k/v/o biases, sliding windows and
  attn_softcap are refused with MLA. attn_scale: the YaRN mscale correction (from_hf sets it).

GPT-3 Table 2.1 notes: the table lists d_model=5140 for 13B, which is 40 heads x 128 = 5120 in
the released models; and 24 heads x 128 for 1.3B, which contradicts d_model=2048 (and the 1.3B
total): we use 16 heads x 128 (d_model = n_heads x d_head, 1.3B parameters), as Megatron-LM and
GPT-Neo do.
"""
import dataclasses
import math
from typing import Optional

# (_FLOAT32_MAX: config values the models use in float32 arithmetic must fit in it)
from llmkern.ops._checks import FLOAT32_MAX as _FLOAT32_MAX, bool_arg, is_real

_MIN_SOFTCAP = 2.0 ** -126  # (llmkern.attention's least softcap: float32's smallest normal number)

ARCHS = ("gpt", "llama")


def _pos_int(v):
    """A positive int (not a bool: True passed as 1 head, head_dim 1 or an FFN width of 1)."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _float32_positive(v):
    """A real number > 0 that stays finite and non-zero in float32, the dtype the models use it in."""
    return is_real(v, positive=True, float32=True)


@dataclasses.dataclass
class ModelConfig:
    arch: str = "gpt"                 # "gpt" (LayerNorm, GELU, learned positions) or "llama"
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768                 # d_model
    block_size: int = 1024            # maximum sequence length (context)
    n_kv_head: Optional[int] = None   # GQA: key/value heads (default n_head)
    head_dim: Optional[int] = None    # default n_embd // n_head
    intermediate_size: Optional[int] = None  # FFN width (default 4d for GPT, 2/3*4d rounded for llama)
    bias: Optional[bool] = None       # biases in linears (default True for GPT, False for llama)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0       # llama only
    rope_scaling: Optional[dict] = None  # llama only: {"rope_type": "linear"|"dynamic"|"llama3"|"yarn"|"longrope", ...}
    rotary_dim: Optional[int] = None  # llama only: the rotated channels of each q/k head (None: head_dim)
    tie_embeddings: Optional[bool] = None  # lm_head shares the token embedding (GPT default True)
    activation: Optional[str] = None  # "gelu_tanh" | "gelu" (GPT), "silu" (llama, SwiGLU)
    qkv_bias: Optional[bool] = None   # llama only: biases on q/k/v_proj (None: `bias`); Qwen2 True
    o_bias: Optional[bool] = None     # llama only: bias on o_proj (None: `bias`)
    qk_norm: bool = False             # llama only: per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: Optional[int] = None  # llama only: each query sees its last W keys (itself included)
    sliding_window_layers: Optional[tuple] = None  # the layers that slide (None: all, when sliding_window)
    # Gemma (llama only; see the module docstring)
    norm_offset: float = 0.0          # RMSNorm gain (norm_offset + weight): Gemma 1.0
    scale_embeddings: bool = False    # token embeddings times sqrt(n_embd)
    post_norms: bool = False          # Gemma 2/3: norms on the attention and MLP outputs too
    attn_scale: Optional[float] = None  # attention softmax scale (None: head_dim ** -0.5)
    attn_softcap: Optional[float] = None  # c * tanh(scores / c) (None: off)
    logit_softcap: Optional[float] = None  # c * tanh(logits / c) (None: off)
    rope_local_theta: Optional[float] = None  # RoPE base of the sliding-window layers (None: rope_theta)
    # Granite / OLMo 2 (llama only; see the module docstring)
    embedding_multiplier: float = 1.0  # token embeddings times this (Granite)
    residual_multiplier: float = 1.0  # attention / MLP outputs times this before the residual adds (Granite)
    logits_scaling: float = 1.0       # logits divided by this (Granite)
    pre_norms: bool = True            # False: OLMo 2's post-norm-only block (needs post_norms)
    qk_norm_full: bool = False        # qk_norm over all heads' channels at once (OLMo 2)
    # sparse mixture of experts (llama only; see the module docstring)
    n_experts: int = 0                # E experts per MoE layer; 0: the dense MLP
    n_experts_per_tok: Optional[int] = None  # top-k (default 2 when n_experts > 0)
    moe_ffn_dim: Optional[int] = None  # each expert's width (default intermediate_size)
    moe_renormalize: bool = True      # top-k weights renormalized to sum 1 (Mixtral)
    moe_shared_ffn_dim: int = 0       # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    moe_layers: Optional[tuple] = None  # the sparse layers (None: all)
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight (0: off)
    moe_capacity_factor: Optional[float] = None  # expert capacity (None: dropless; see the module docstring)
    moe_drop_policy: str = "probs"    # over capacity: keep the highest weights ("probs") or earliest ("position")
    moe_router: str = "softmax"       # "softmax" (Mixtral, Qwen), "sigmoid" (DeepSeek-V3) or "softmax_group"
                                      # (DeepSeek-V2); see the module docstring
    moe_n_group: int = 1              # DeepSeek routers: expert groups, of which moe_topk_group are kept per token
    moe_topk_group: int = 1
    moe_routed_scaling: float = 1.0   # DeepSeek routers: routing weights times this (routed_scaling_factor)
    # multi-head latent attention (llama only; see the module docstring)
    kv_lora_rank: int = 0             # R > 0: MLA with a K/V latent of width R; 0: plain attention
    q_lora_rank: Optional[int] = None  # MLA: the queries' bottleneck rank (None: one q_proj)
    qk_rope_head_dim: int = 0         # MLA: the rotary channels of each q/k head (the last ones)
    v_head_dim: Optional[int] = None  # MLA: the value head width (default head_dim)
    rope_interleave: bool = False     # MLA: rotary channels in interleaved pairs (DeepSeek-V3)
    # the token embedding's padding_idx (transformers' Llama-family models: config.pad_token_id): that row gets no
    # gradient from the lookup; None (GPT-2, the zoo's own configs): every row trains
    pad_token_id: Optional[int] = None
    # llama only: the transformers model computes q/k/v in one qkv_proj and gate/up in one gate_up_proj (Phi-3,
    # from_hf): hf_module_names maps the zoo's projections onto those layers' rows (PEFT checkpoints)
    hf_fused_projections: bool = False
    name: str = ""

    def __post_init__(self):
        # the fields left unset (None), that __post_init__ derives from the others: replace() derives them again
        unset = [f for f in _DERIVED_FIELDS if getattr(self, f) is None]
        self._check_fields()
        self._derived = {f: getattr(self, f) for f in unset}

    def _check_fields(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        for f in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not _pos_int(self.n_kv_head) or self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig.n_kv_head must be a positive divisor of n_head={self.n_head}, "
                             f"got {self.n_kv_head!r}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"ModelConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                                 f"(or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        if not _pos_int(self.head_dim):
            raise ValueError(f"ModelConfig.head_dim must be a positive int, got {self.head_dim!r}")
        if self.arch == "llama" and self.head_dim % 2 and not self.kv_lora_rank and self.rotary_dim is None:
            # (MLA: the rotary part's checked; partial rotary: rotary_dim's)
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.intermediate_size is None:
            if self.arch == "gpt":
                self.intermediate_size = 4 * self.n_embd
            else:  # LLaMA: 2/3 * 4d rounded up to a multiple of 256
                self.intermediate_size = 256 * ((int(8 * self.n_embd / 3) + 255) // 256)
        if not _pos_int(self.intermediate_size):
            raise ValueError(f"ModelConfig.intermediate_size must be a positive int, got {self.intermediate_size!r}")
        if self.bias is None:
            self.bias = self.arch == "gpt"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt"
        for f in ("bias", "tie_embeddings"):  # (read by truthiness: "no" would tie)
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ModelConfig.{f} must be a bool or None (the arch's default), "
                                 f"got {getattr(self, f)!r}")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"ModelConfig.pad_token_id must be a token id in [0, {self.vocab_size}) or None, "
                             f"got {pad!r}")
        if self.activation is None:
            self.activation = "gelu_tanh" if self.arch == "gpt" else "silu"
        allowed = ("gelu_tanh", "gelu", "relu") if self.arch == "gpt" else ("silu", "gelu_tanh", "gelu")
        if self.activation not in allowed:
            raise ValueError(f"ModelConfig.activation must be one of {allowed} for arch={self.arch!r}, "
                             f"got {self.activation!r}")
        if not (is_real(self.dropout) and 0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (is_real(self.norm_eps, positive=True) and float(self.norm_eps) <= _FLOAT32_MAX):
            raise ValueError(f"ModelConfig.norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not (
                0 < float(self.rope_theta) <= _FLOAT32_MAX):
            raise ValueError(f"ModelConfig.rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.arch, self.block_size)
        self._check_llama_options()
        self._check_mla()
        self._check_rotary_dim()
        self._check_moe()

    def _check_moe(self):
        """The mixture-of-experts fields: all at their defaults for a dense model (n_experts = 0), so a
        typo'd MoE config never builds a silently dense model."""
        E = self.n_experts
        if not isinstance(E, int) or isinstance(E, bool) or E < 0:
            raise ValueError(f"ModelConfig.n_experts must be an int >= 0 (0: dense MLP), got {E!r}")
        if E == 0:
            for f, off in (("n_experts_per_tok", None), ("moe_ffn_dim", None), ("moe_shared_ffn_dim", 0),
                           ("moe_layers", None), ("router_aux_loss_coef", 0.0), ("moe_capacity_factor", None),
                           ("moe_drop_policy", "probs")) + _ROUTER_OFF:
                if getattr(self, f) != off:
                    raise ValueError(f"ModelConfig.{f} applies to mixture-of-experts models only "
                                     f"(n_experts > 0), got {f}={getattr(self, f)!r} with n_experts=0")
            return
        if self.arch != "llama":
            raise ValueError(f"ModelConfig.n_experts applies to arch='llama' only, got arch={self.arch!r}")
        if self.activation != "silu":  # (llmkern.moe_mlp's experts are SwiGLU)
            raise ValueError(f"ModelConfig.activation must be 'silu' for mixture-of-experts models, "
                             f"got {self.activation!r}")
        if self.n_experts_per_tok is None:
            self.n_experts_per_tok = min(2, E)
        k = self.n_experts_per_tok
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
            raise ValueError(f"ModelConfig.n_experts_per_tok must be an int in 1..n_experts={E}, got {k!r}")
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.intermediate_size
        for f in ("moe_ffn_dim", "moe_shared_ffn_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if f == "moe_ffn_dim" else 0):
                raise ValueError(f"ModelConfig.{f} must be a {'positive' if f == 'moe_ffn_dim' else 'non-negative'} "
                                 f"int, got {v!r}")
        if not isinstance(self.moe_renormalize, bool):
            raise ValueError(f"ModelConfig.moe_renormalize must be a bool, got {self.moe_renormalize!r}")
        c = self.router_aux_loss_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= _FLOAT32_MAX:  # (inf: an inf loss)
            raise ValueError(f"ModelConfig.router_aux_loss_coef must be a number >= 0 (finite; 0: off), got {c!r}")
        self.router_aux_loss_coef = float(c)
        layers = self.moe_layers
        if layers is not None:
            if not isinstance(layers, (list, tuple, range)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layer for i in layers):
                raise ValueError(f"ModelConfig.moe_layers must list layer indices in 0..{self.n_layer - 1} "
                                 f"(or be None: every layer), got {layers!r}")
            self.moe_layers = tuple(sorted(set(layers)))
        self._check_router()

    def _check_router(self):
        """moe_router and the DeepSeek routers' group limit and scale (the softmax router has neither: they
        must stay off, not be silently ignored)."""
        if self.moe_router not in MOE_ROUTERS:
            raise ValueError(f"ModelConfig.moe_router must be one of {MOE_ROUTERS}, got {self.moe_router!r}")
        G, Gk, s = self.moe_n_group, self.moe_topk_group, self.moe_routed_scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not _float32_positive(s):  # (inf: NaN outputs)
            raise ValueError(f"ModelConfig.moe_routed_scaling must be a number > 0 (finite), got {s!r}")
        self.moe_routed_scaling = float(s)
        c = self.moe_capacity_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < float("inf")):
            raise ValueError(f"ModelConfig.moe_capacity_factor must be None (dropless) or a finite number > 0, "
                             f"got {c!r}")
        if self.moe_drop_policy not in ("probs", "position"):
            raise ValueError(f"ModelConfig.moe_drop_policy must be 'probs' or 'position', got {self.moe_drop_policy!r}")
        if c is not None and self.moe_router != "softmax":
            raise ValueError(f"ModelConfig.moe_capacity_factor applies to the 'softmax' router only (DeepSeek's "
                             f"routers are dropless), got moe_router={self.moe_router!r}")
        if self.moe_router == "softmax":
            for f, off in _ROUTER_OFF[1:]:
                if getattr(self, f) != off:
                    raise ValueError(f"ModelConfig.{f} applies to the DeepSeek routers only (moe_router 'sigmoid' "
                                     f"or 'softmax_group'), got {f}={getattr(self, f)!r}")
            return
        if self.router_aux_loss_coef:  # (load_balancing_loss is the softmax router's)
            raise ValueError(f"ModelConfig.router_aux_loss_coef must be 0 with moe_router={self.moe_router!r} (no "
                             f"aux loss), got {self.router_aux_loss_coef!r}")
        E = self.n_experts
        least = 2 if self.moe_router == "sigmoid" else 1  # (the sigmoid router ranks groups by their top-2 scores)
        if not isinstance(G, int) or isinstance(G, bool) or G < 1 or E % G or E // G < least:
            why = " leaving >= 2 experts per group (groups are ranked by their top-2 scores)" if least == 2 else ""
            raise ValueError(f"ModelConfig.moe_n_group must be a positive divisor of n_experts={E}{why}, got {G!r}")
        if not isinstance(Gk, int) or isinstance(Gk, bool) or not 1 <= Gk <= G:
            raise ValueError(f"ModelConfig.moe_topk_group must be an int in 1..moe_n_group={G}, got {Gk!r}")
        if self.n_experts_per_tok > Gk * (E // G):
            raise ValueError(f"ModelConfig.n_experts_per_tok={self.n_experts_per_tok} exceeds the "
                             f"{Gk * (E // G)} experts of moe_topk_group={Gk} groups")

    @property
    def deepseek_moe(self):
        """Whether the MoE layers are DeepSeek's (deepseek.DeepseekMoE: moe_router "sigmoid" or "softmax_group",
        ungated shared experts named shared_experts)."""
        return self.n_experts > 0 and self.moe_router in DEEPSEEK_ROUTERS

    def layer_is_moe(self, i):
        """Whether layer i's MLP is the sparse mixture of experts (else the dense SwiGLU MLP)."""
        return self.n_experts > 0 and (self.moe_layers is None or i in self.moe_layers)

    @property
    def n_moe_layers(self):
        return sum(self.layer_is_moe(i) for i in range(self.n_layer))

    def _check_llama_options(self):
        """The Llama-family options (Mistral / Qwen2 / Qwen3): GPT ignores them, so they must stay unset."""
        if self.arch != "llama":
            for f, off in (("qkv_bias", None), ("o_bias", None), ("qk_norm", False), ("sliding_window", None),
                           ("sliding_window_layers", None), ("pad_token_id", None),
                           ("rope_theta", 10000.0), ("hf_fused_projections", False), ("rotary_dim", None)) \
                    + _GEMMA_OFF + _MLA_OFF \
                    + _GRANITE_OLMO_OFF:
                if getattr(self, f) != off:
                    raise ValueError(f"ModelConfig.{f} applies to arch='llama' only, got arch={self.arch!r}")
            return
        self._check_gemma_options()
        self._check_granite_olmo_options()
        for f in ("qkv_bias", "o_bias"):
            if getattr(self, f) is not None and not isinstance(getattr(self, f), bool):
                raise ValueError(f"ModelConfig.{f} must be a bool or None, got {getattr(self, f)!r}")
        for f in ("qk_norm", "hf_fused_projections"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ModelConfig.{f} must be a bool, got {getattr(self, f)!r}")
        W = self.sliding_window
        if W is not None and (not isinstance(W, int) or isinstance(W, bool) or W <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got {W!r}")
        layers = self.sliding_window_layers
        if layers is None:
            return
        if W is None:
            raise ValueError("ModelConfig.sliding_window_layers needs sliding_window")
        if not isinstance(layers, (list, tuple, range)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layer for i in layers):
            raise ValueError(f"ModelConfig.sliding_window_layers must list layer indices in 0..{self.n_layer - 1}, "
                             f"got {layers!r}")
        self.sliding_window_layers = tuple(sorted(set(layers)))

    def _check_gemma_options(self):
        """The Gemma options' types and ranges (see the module docstring)."""
        for f in ("scale_embeddings", "post_norms"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ModelConfig.{f} must be a bool, got {getattr(self, f)!r}")
        # (NaN or inf gave NaN logits; past float32's range the gains' torch.full overflowed)
        if isinstance(self.norm_offset, bool) or not isinstance(self.norm_offset, (int, float)) or not (
                -_FLOAT32_MAX <= self.norm_offset <= _FLOAT32_MAX):
            raise ValueError(f"ModelConfig.norm_offset must be a finite number, got {self.norm_offset!r}")
        self.norm_offset = float(self.norm_offset)
        for f in ("attn_scale", "attn_softcap", "logit_softcap", "rope_local_theta"):
            v = getattr(self, f)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _float32_positive(v) or (
                    f.endswith("softcap") and v < _MIN_SOFTCAP):
                # (inf, or past float32's range: a softcap of inf made every logit NaN; below float32's least
                # number, 0 there: attn_scale=1e-50 gave NaN logits; softcaps: llmkern.attention's least)
                raise ValueError(f"ModelConfig.{f} must be a finite number > 0 (within float32's range"
                                 f"{', >= 2**-126' if f.endswith('softcap') else ''}) or None, got {v!r}")
            setattr(self, f, float(v))
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError("ModelConfig.rope_local_theta needs sliding_window (it applies to the sliding layers)")

    def _check_granite_olmo_options(self):
        """The Granite multipliers (finite numbers > 0 within float32's range: 0 or inf gave zero / NaN outputs)
        and OLMo 2's norm placement (a block without any norm, or a full-width qk norm without qk_norm, is a
        typo, not a model)."""
        for f in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _float32_positive(v):
                raise ValueError(f"ModelConfig.{f} must be a finite number > 0 (within float32's range; 1.0: off), "
                                 f"got {v!r}")
            setattr(self, f, float(v))
        for f in ("pre_norms", "qk_norm_full"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ModelConfig.{f} must be a bool, got {getattr(self, f)!r}")
        if not self.pre_norms and not self.post_norms:
            raise ValueError("ModelConfig.pre_norms=False needs post_norms=True (OLMo 2's post-norm block); a block "
                             "without norms is not supported")
        if self.qk_norm_full and not self.qk_norm:
            raise ValueError("ModelConfig.qk_norm_full=True needs qk_norm=True")

    def _check_mla(self):
        """The multi-head latent attention fields: all off without kv_lora_rank; with it, consistent widths and
        none of the attention options MLA does not implement."""
        R = self.kv_lora_rank
        if not isinstance(R, int) or isinstance(R, bool) or R < 0:
            raise ValueError(f"ModelConfig.kv_lora_rank must be an int >= 0 (0: no MLA), got {R!r}")
        if R == 0:
            for f, off in _MLA_OFF[1:]:
                if getattr(self, f) != off:
                    raise ValueError(f"ModelConfig.{f} applies to multi-head latent attention only (kv_lora_rank > 0), "
                                     f"got {f}={getattr(self, f)!r}")
            return
        Dr = self.qk_rope_head_dim
        if not isinstance(Dr, int) or isinstance(Dr, bool) or Dr <= 0 or Dr % 2 or Dr > self.head_dim:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be an even int in 2..head_dim={self.head_dim} with "
                             f"MLA, got {Dr!r}")
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        for f in ("v_head_dim", "q_lora_rank"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"ModelConfig.{f} must be a positive int{' or None' if f == 'q_lora_rank' else ''}, "
                                 f"got {v!r}")
        if self.v_head_dim > 256:  # (llmkern.attention's head dims: 1..256)
            raise ValueError(f"ModelConfig.v_head_dim={self.v_head_dim} must be at most 256")
        if not isinstance(self.rope_interleave, bool):
            raise ValueError(f"ModelConfig.rope_interleave must be a bool, got {self.rope_interleave!r}")
        if self.n_kv_head != self.n_head:
            raise ValueError(f"ModelConfig.n_kv_head must equal n_head={self.n_head} with MLA, got {self.n_kv_head}")
        for f, off in (("qk_norm", False), ("qkv_bias", None), ("o_bias", None), ("sliding_window", None),
                       ("attn_softcap", None)):
            if getattr(self, f) not in (off, False):
                raise ValueError(f"ModelConfig.{f} is not supported with multi-head latent attention "
                                 f"(kv_lora_rank > 0), got {f}={getattr(self, f)!r}")
        if self.bias:
            raise ValueError("ModelConfig.bias=True is not supported with multi-head latent attention")

    def _check_rotary_dim(self):
        """rotary_dim (partial rotary: an even width within head_dim; not with MLA, whose qk_rope_head_dim is its
        rotary width), and longrope's factor lists: one number per rotated frequency (rope_dim / 2)."""
        R = self.rotary_dim
        if R is not None:
            if not _pos_int(R) or R % 2 or R > self.head_dim:
                raise ValueError(f"ModelConfig.rotary_dim must be an even int in 2..head_dim={self.head_dim} or None "
                                 f"(every channel), got {R!r}")
            if self.kv_lora_rank:
                raise ValueError("ModelConfig.rotary_dim is not supported with multi-head latent attention "
                                 "(kv_lora_rank > 0: qk_rope_head_dim is its rotary width)")
        s = self.rope_scaling
        if s is not None and s["rope_type"] == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(s[key]) != self.rope_dim // 2:
                    raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must hold rope_dim / 2 = {self.rope_dim // 2} "
                                     f"numbers (one per rotary frequency), got {len(s[key])}")

    @property
    def rope_dim(self):
        """The channels RoPE rotates in each q/k head: qk_rope_head_dim with MLA, else rotary_dim (partial rotary),
        else head_dim."""
        if self.kv_lora_rank:
            return self.qk_rope_head_dim
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def qk_nope_head_dim(self):
        """MLA: the channels of each q/k head without RoPE (head_dim - qk_rope_head_dim)."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def out_dim(self):
        """n_head * the value head width: the width of the attention output (o_proj's input)."""
        return self.n_head * (self.v_head_dim or self.head_dim)

    def layer_rope_is_local(self, i):
        """Whether layer i takes the local RoPE (rope_local_theta): set, and the layer slides (Gemma 3)."""
        return self.rope_local_theta is not None and self.layer_window(i) is not None

    @property
    def biases(self):
        """(q/k/v, o_proj, MLP): whether those linear layers have biases."""
        qkv = self.bias if self.qkv_bias is None else self.qkv_bias
        o = self.bias if self.o_bias is None else self.o_bias
        return qkv, o, self.bias

    def layer_window(self, i):
        """The sliding window W of layer i (query t sees keys t-W+1..t), or None (full causal)."""
        if self.sliding_window is None:
            return None
        layers = self.sliding_window_layers
        return self.sliding_window if layers is None or i in layers else None

    @property
    def attn_dim(self):
        """n_head * head_dim: the width of Q (and of the attention output)."""
        return self.n_head * self.head_dim

    def replace(self, **changes):
        """A copy with fields changed (validated again). The fields that were never set (None, derived by
        __post_init__: head_dim, n_kv_head, intermediate_size, activation, ...) are derived again from the
        new values, so get_config(cfg, **changes) equals get_config(name, **changes) for cfg = get_config(name);
        the fields given explicitly (from_hf's, a named config's) keep their values."""
        fields = {f.name for f in dataclasses.fields(self) if f.init}
        bad = set(changes) - fields
        if bad:
            raise ValueError(f"ModelConfig.replace: unknown ModelConfig field(s) {sorted(bad)}")
        derived = getattr(self, "_derived", {})
        kwargs = {f: getattr(self, f) for f in fields}
        for f, v in derived.items():  # (unless assigned since: then the assigned value is kept)
            if f not in changes and kwargs[f] == v:
                kwargs[f] = None
        kwargs.update(changes)
        return type(self)(**kwargs)


# The fields __post_init__ fills in when None (from arch, n_embd, n_head, intermediate_size, n_experts, head_dim)
_DERIVED_FIELDS = ("n_kv_head", "head_dim", "intermediate_size", "bias", "tie_embeddings", "activation",
                   "n_experts_per_tok", "moe_ffn_dim", "v_head_dim")


# The Gemma options' off values (GPT must leave them there)
_GEMMA_OFF = (("norm_offset", 0.0), ("scale_embeddings", False), ("post_norms", False), ("attn_scale", None),
              ("attn_softcap", None), ("logit_softcap", None), ("rope_local_theta", None))
# The Granite / OLMo 2 options' off values (GPT must leave them there)
_GRANITE_OLMO_OFF = (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("logits_scaling", 1.0),
                     ("pre_norms", True), ("qk_norm_full", False))


# moe_router's values: the first is Mixtral's, the others DeepSeek's (deepseek.DeepseekMoE)
MOE_ROUTERS = ("softmax", "sigmoid", "softmax_group")
DEEPSEEK_ROUTERS = MOE_ROUTERS[1:]
# The MoE router fields' off values (dense models and the softmax router leave them there)
_ROUTER_OFF = (("moe_router", "softmax"), ("moe_n_group", 1), ("moe_topk_group", 1), ("moe_routed_scaling", 1.0))
# The MLA fields' off values
_MLA_OFF = (("kv_lora_rank", 0), ("q_lora_rank", None), ("qk_rope_head_dim", 0), ("v_head_dim", None),
            ("rope_interleave", False))


# Keys each rope_type needs (Hugging Face's rope_scaling / rope_parameters names).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("original_max_position_embeddings",),  # (and the factor lists: _longrope_options)
}


def _check_rope_scaling(scaling, arch, block_size=None):
    """None for plain RoPE, else a dict with rope_type and its float parameters (validated). block_size: the
    model's context, longrope's default factor (block_size / original_max_position_embeddings)."""
    if scaling is None:
        return None
    if arch != "llama":
        raise ValueError(f"ModelConfig.rope_scaling applies to arch='llama' only, got arch={arch!r}")
    if not isinstance(scaling, dict):
        raise ValueError(f"ModelConfig.rope_scaling must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(kind, str):  # (a list raised "unhashable type")
        raise ValueError(f"ModelConfig.rope_scaling rope_type must be a string, got {kind!r}")
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"ModelConfig.rope_scaling rope_type {kind!r} is not supported "
                         f"(supported: 'default', {', '.join(repr(k) for k in ROPE_SCALING_KEYS)})")
    out = {"rope_type": kind}
    for key in ROPE_SCALING_KEYS[kind]:
        v = scaling.get(key)
        # (inf made every frequency 0 or the llama3 band empty; below float32's range the frequencies inf)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _float32_positive(v):
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a finite number > 0 for rope_type {kind!r}, "
                             f"got {v!r}")
        out[key] = float(v)
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"ModelConfig.rope_scaling: high_freq_factor ({out['high_freq_factor']}) must exceed "
                         f"low_freq_factor ({out['low_freq_factor']})")
    if kind == "yarn":
        out.update(_yarn_options(scaling, out["factor"]))
    if kind == "longrope":
        out.update(_longrope_options(scaling, out["original_max_position_embeddings"], block_size))
    return out


def _longrope_options(scaling, original, block_size):
    """LongRoPE's keys: short_factor / long_factor (lists of numbers > 0, as float tuples; their length is checked
    against the rotary width by ModelConfig), factor (default block_size / original) and attention_factor (the
    cos/sin multiplier; default sqrt(1 + ln(factor) / ln(original)) for factor > 1, else 1), as transformers'
    _compute_longrope_parameters."""
    out = {}
    for key in ("short_factor", "long_factor"):
        v = scaling.get(key)
        if not isinstance(v, (list, tuple)) or not v or not all(
                not isinstance(x, bool) and isinstance(x, (int, float)) and _float32_positive(x) for x in v):
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a non-empty list of finite numbers > 0 for "
                             f"rope_type 'longrope', got {v!r}")
        out[key] = tuple(float(x) for x in v)
    factor = scaling.get("factor")
    if factor is None:
        if block_size is None:
            raise ValueError("ModelConfig.rope_scaling['factor'] must be given for rope_type 'longrope' without a "
                             "block_size (its default is block_size / original_max_position_embeddings)")
        factor = block_size / original
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not _float32_positive(factor):
        raise ValueError(f"ModelConfig.rope_scaling['factor'] must be a finite number > 0 for rope_type 'longrope', "
                         f"got {factor!r}")
    att = scaling.get("attention_factor")
    if att is None:
        if factor > 1.0 and original <= 1.0:  # (ln(original) = 0 would divide by zero)
            raise ValueError(f"ModelConfig.rope_scaling['original_max_position_embeddings'] must exceed 1 for "
                             f"longrope's default attention_factor, got {original!r}")
        att = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    if isinstance(att, bool) or not isinstance(att, (int, float)) or not _float32_positive(att):
        raise ValueError(f"ModelConfig.rope_scaling['attention_factor'] must be a finite number > 0, got {att!r}")
    out.update(factor=float(factor), attention_factor=float(att))
    return out


def _yarn_options(scaling, factor):
    """YaRN's optional keys with transformers' defaults: beta_fast 32 and beta_slow 1 (also when 0 or
    None), truncate True, and attention_factor (the cos/sin multiplier) 0.1 ln(factor) + 1 when not
    given, or the ratio of that formula with mscale and with mscale_all_dim when both are set."""
    def number(key, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a number for rope_type 'yarn', got {v!r}")
        return float(v)

    def positive(key, v):  # (NaN, inf or <= 0 raised "math domain error" / "cannot convert float NaN to integer")
        if not _float32_positive(number(key, v)):
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a finite number > 0 for rope_type 'yarn', "
                             f"got {v!r}")
        return float(v)

    def mscale(m):
        return yarn_mscale(factor, m)

    # (bool() read truncate="False" as True)
    out = {"beta_fast": positive("beta_fast", scaling.get("beta_fast") or 32),
           "beta_slow": positive("beta_slow", scaling.get("beta_slow") or 1),
           "truncate": bool_arg("ModelConfig.rope_scaling['truncate']", scaling.get("truncate", True))}
    att = scaling.get("attention_factor")
    if att is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        att = mscale(number("mscale", m)) / mscale(number("mscale_all_dim", m_all)) if m and m_all else mscale(1)
    if not _float32_positive(number("attention_factor", att)):  # (inf: inf / NaN cos and sin)
        raise ValueError(f"ModelConfig.rope_scaling['attention_factor'] must be a finite number > 0, got {att!r}")
    out["attention_factor"] = float(att)
    return out


def yarn_mscale(factor, m=1.0):
    """YaRN's magnitude correction 0.1 * m * ln(factor) + 1 (1 for factor <= 1): the cos/sin factor, and with
    DeepSeek's mscale_all_dim squared into the softmax scale (transformers' yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _gpt(name, n_layer, n_embd, n_head, block_size, vocab_size=50257):
    return dict(arch="gpt", name=name, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                block_size=block_size, vocab_size=vocab_size)


def _llama(name, n_layer, n_embd, n_head, n_kv_head, intermediate_size, vocab_size, block_size,
           rope_theta=10000.0, norm_eps=1e-5, tie=False, **moe):
    return dict(arch="llama", name=name, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                n_kv_head=n_kv_head, intermediate_size=intermediate_size, vocab_size=vocab_size,
                block_size=block_size, rope_theta=rope_theta, norm_eps=norm_eps, tie_embeddings=tie, **moe)


def _deepseek(n_experts, n_experts_per_tok, moe_ffn_dim, n_shared, first_dense, n_layer, nope, rope,
              rope_scaling=None, moe_router="sigmoid", **fields):
    """The ModelConfig fields of a DeepSeek-V3-style model: MLA (q/k heads nope + rope wide, interleaved RoPE,
    the softmax scale with YaRN's mscale_all_dim correction as transformers applies it), the sigmoid router
    (DeepSeek-V2: moe_router="softmax_group"), n_shared ungated shared experts, dense layers before
    first_dense."""
    scale = (nope + rope) ** -0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
    return dict(head_dim=nope + rope, qk_rope_head_dim=rope, rope_interleave=True,
                rope_scaling=rope_scaling, attn_scale=scale, n_experts=n_experts, n_experts_per_tok=n_experts_per_tok,
                moe_ffn_dim=moe_ffn_dim, moe_shared_ffn_dim=n_shared * moe_ffn_dim, moe_router=moe_router,
                moe_layers=tuple(range(first_dense, n_layer)), **fields)


CONFIGS = {
    # GPT-2 (HF gpt2, gpt2-medium, gpt2-large, gpt2-xl)
    "gpt2": _gpt("gpt2", 12, 768, 12, 1024),
    "gpt2-medium": _gpt("gpt2-medium", 24, 1024, 16, 1024),
    "gpt2-large": _gpt("gpt2-large", 36, 1280, 20, 1024),
    "gpt2-xl": _gpt("gpt2-xl", 48, 1600, 25, 1024),
    # GPT-3 Table 2.1 (n_layers, d_model, n_heads; d_head = d_model / n_heads), n_ctx 2048
    "gpt3-125m": _gpt("gpt3-125m", 12, 768, 12, 2048),
    "gpt3-350m": _gpt("gpt3-350m", 24, 1024, 16, 2048),
    "gpt3-760m": _gpt("gpt3-760m", 24, 1536, 16, 2048),
    "gpt3-1.3b": _gpt("gpt3-1.3b", 24, 2048, 16, 2048),
    "gpt3-2.7b": _gpt("gpt3-2.7b", 32, 2560, 32, 2048),
    "gpt3-6.7b": _gpt("gpt3-6.7b", 32, 4096, 32, 2048),
    "gpt3-13b": _gpt("gpt3-13b", 40, 5120, 40, 2048),
    "gpt3-175b": _gpt("gpt3-175b", 96, 12288, 96, 2048),
    # LLaMA-style
    "llama-7b": _llama("llama-7b", 32, 4096, 32, 32, 11008, 32000, 2048, norm_eps=1e-6),
    "llama-13b": _llama("llama-13b", 40, 5120, 40, 40, 13824, 32000, 2048, norm_eps=1e-6),
    "llama2-7b": _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
    "llama3-8b": _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, rope_theta=500000.0),
    "llama-1b": _llama("llama-1b", 16, 2048, 32, 8, 8192, 128256, 2048, rope_theta=500000.0, tie=True),
    "llama-350m": _llama("llama-350m", 24, 1024, 16, 4, 2816, 32000, 2048),
    "llama-125m": _llama("llama-125m", 12, 768, 12, 4, 2048, 32000, 2048),
    # Mixtral 8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): 8 experts of width 14336, top-2
    "mixtral-8x7b": _llama("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 32768, rope_theta=1e6,
                           n_experts=8, n_experts_per_tok=2),
    # DeepSeek-V3 (deepseek-ai/DeepSeek-V3 config.json, without the multi-token-prediction layer): MLA, 3 dense
    # layers, then 256 routed experts (top-8 of the best 4 of 8 groups) and one shared expert per layer
    "deepseek-v3": _llama("deepseek-v3", 61, 7168, 128, 128, 18432, 129280, 163840, norm_eps=1e-6,
                          **_deepseek(n_experts=256, n_experts_per_tok=8, moe_ffn_dim=2048, n_shared=1,
                                         first_dense=3, n_layer=61, moe_n_group=8, moe_topk_group=4,
                                         moe_routed_scaling=2.5, kv_lora_rank=512, q_lora_rank=1536,
                                         nope=128, rope=64, v_head_dim=128,
                                         rope_scaling={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32,
                                                       "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                       "original_max_position_embeddings": 4096})),
    # DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json): MLA without the q bottleneck, 1 dense layer, then
    # 64 routed experts (softmax, greedy top-6, not renormalised) and 2 shared experts per layer
    "deepseek-v2-lite": _llama("deepseek-v2-lite", 27, 2048, 16, 16, 10944, 102400, 163840, norm_eps=1e-6,
                               **_deepseek(n_experts=64, n_experts_per_tok=6, moe_ffn_dim=1408, n_shared=2,
                                              first_dense=1, n_layer=27, moe_router="softmax_group",
                                              moe_renormalize=False, kv_lora_rank=512, q_lora_rank=None,
                                              nope=128, rope=64, v_head_dim=128,
                                              rope_scaling={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32,
                                                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                                                            "original_max_position_embeddings": 4096})),
    # tiny, for tests and CPU smoke runs
    "gpt-tiny": dict(arch="gpt", name="gpt-tiny", n_layer=2, n_embd=64, n_head=4, block_size=128,
                     vocab_size=256),
    "llama-tiny": dict(arch="llama", name="llama-tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                       intermediate_size=176, block_size=128, vocab_size=256),
    "mixtral-tiny": dict(arch="llama", name="mixtral-tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, block_size=128, vocab_size=256, n_experts=4, n_experts_per_tok=2),
    "deepseek-v3-tiny": dict(arch="llama", name="deepseek-v3-tiny", n_embd=64, n_head=4, intermediate_size=96,
                             block_size=128, vocab_size=256, n_layer=3,
                             **_deepseek(n_experts=8, n_experts_per_tok=2, moe_ffn_dim=32, n_shared=1,
                                            first_dense=1, n_layer=3, moe_n_group=4, moe_topk_group=2,
                                            moe_routed_scaling=2.5, kv_lora_rank=16, q_lora_rank=24, nope=16,
                                            rope=8, v_head_dim=12)),
    # DeepSeek-V2-style: one q_proj, the softmax router limited to the better of 2 groups, not renormalised (the
    # limit shows only with top_k > moe_topk_group: the kept groups hold the best experts)
    "deepseek-v2-tiny": dict(arch="llama", name="deepseek-v2-tiny", n_embd=64, n_head=4, intermediate_size=96,
                             block_size=128, vocab_size=256, n_layer=3,
                             **_deepseek(n_experts=8, n_experts_per_tok=2, moe_ffn_dim=32, n_shared=2,
                                            first_dense=1, n_layer=3, moe_router="softmax_group", moe_n_group=2,
                                            moe_topk_group=1, moe_routed_scaling=2.0, moe_renormalize=False,
                                            kv_lora_rank=16, q_lora_rank=None, nope=16, rope=8, v_head_dim=12)),
}
# GPT-NeoX and Phi (llmkern.models.neox.NeoXConfig fields; arch "neox" picks the class): the models' config.json
# values. Pythia: parallel residual, exact GELU, a quarter of each head's channels rotated (rotary_dim's default),
# untied head; Phi-2: one shared LayerNorm per block, the tanh GELU, 32 of 80 channels rotated, the head's bias,
# resid_pdrop 0.1
_NEOX_CONFIGS = {
    "pythia-70m": dict(n_layer=6, n_embd=512, n_head=8),
    "pythia-160m": dict(n_layer=12, n_embd=768, n_head=12),
    "pythia-410m": dict(n_layer=24, n_embd=1024, n_head=16),
    "pythia-1b": dict(n_layer=16, n_embd=2048, n_head=8),
}
CONFIGS.update({name: dict(arch="neox", name=name, vocab_size=50304, block_size=2048, **fields)
                for name, fields in _NEOX_CONFIGS.items()})
CONFIGS["phi-2"] = dict(arch="neox", name="phi-2", family="phi", vocab_size=51200, n_layer=32, n_embd=2560,
                        n_head=32, block_size=2048, rotary_dim=32, activation="gelu_tanh", shared_norm=True,
                        lm_head_bias=True, resid_dropout=0.1)
CONFIGS["neox-tiny"] = dict(arch="neox", name="neox-tiny", n_layer=2, n_embd=64, n_head=4, block_size=128,
                            vocab_size=256)
_ALIASES = {"gpt2-small": "gpt2", "gpt2-124m": "gpt2", "gpt2-350m": "gpt2-medium",
            "gpt2-774m": "gpt2-large", "gpt2-1.5b": "gpt2-xl", "gpt3-small": "gpt3-125m",
            "gpt3-medium": "gpt3-350m", "gpt3-large": "gpt3-760m", "gpt3-xl": "gpt3-1.3b"}


def available_configs():
    return sorted(CONFIGS)


def get_config(name, **overrides):
    """The named ModelConfig (see the module docstring), with fields overridden by keyword; for the GPT-NeoX / Phi
    names (and a NeoXConfig given) a llmkern.models.neox.NeoXConfig."""
    # (imported here: neox.py imports the model code, which imports this module)
    from llmkern.models.neox import NeoXConfig

    if isinstance(name, (ModelConfig, NeoXConfig)):
        return name.replace(**overrides) if overrides else name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in CONFIGS:
        raise ValueError(f"get_config: unknown name {name!r}; known: {', '.join(available_configs())}")
    fields = dict(CONFIGS[key])
    cls = NeoXConfig if fields.get("arch") == "neox" else ModelConfig
    if cls is NeoXConfig:
        del fields["arch"]  # (a class attribute of NeoXConfig)
    bad = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if bad:
        raise ValueError(f"get_config: unknown {cls.__name__} field(s) {sorted(bad)}")
    return cls(**{**fields, **overrides})
