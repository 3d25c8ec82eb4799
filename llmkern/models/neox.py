"""GPT-NeoX (Pythia) and Phi-1 / 1.5 / 2 in nanoGPT's spirit: one file, shapes in the comments.

    model = from_hf("./pythia-70m")                       # llmkern.models.from_hf; or a Phi checkpoint directory
    model = build("pythia-70m")                           # a named config (pythia-*, phi-2), random init
    logits, loss = model(idx, labels=idx)
    out = llmkern.generate(model, idx, 20)               # greedy through the KV cache

Both families share one block (transformers' GPTNeoXLayer / PhiDecoderLayer):

    parallel_residual  x + attn(ln_1(x)) + mlp(ln_2(x))    (NeoX's use_parallel_residual, Pythia's default)
    shared_norm        x + attn(ln(x)) + mlp(ln(x))         (Phi: one input_layernorm feeds both branches)
    sequential         x = x + attn(ln_1(x)); x + mlp(ln_2(x))   (NeoX with use_parallel_residual=False)

LayerNorm with bias, a non-gated MLP with biases (GELU: exact for NeoX, tanh for Phi), biases on q/k/v and on
the output projection, and partial rotary embeddings: RoPE rotates the first rotary_dim channels of every q/k
head (NeoX's rotary_pct, Phi's partial_rotary_factor; transformers' rotate_half pairs) and passes the rest
through. Phi may normalise each q/k head with a LayerNorm before RoPE (qk_layernorm) and has a bias on its
LM head; its keys/values may have fewer heads (GQA).

Zoo names are the same for both families (one set of LoRA target names), GPT's and Llama's where they share one:
embed_tokens, layers.{i}.input_layernorm / post_attention_layernorm, layers.{i}.self_attn.{q,k,v,o}_proj
(+ Phi's q_layernorm / k_layernorm as q_norm / k_norm, Qwen3's names), layers.{i}.mlp.up_proj / down_proj,
final_layernorm, lm_head. neox_state converts a checkpoint: NeoX's fused query_key_value is laid out per head,
[q_h, k_h, v_h] for each head h, and is split into q/k/v here.

backend="llmkern" runs the attention on llmkern.attention (decode: attention_with_kvcache), RoPE on
llmkern.rope, the LayerNorms on llmkern.layer_norm (fused with the residual add in the sequential block) and
the loss on llmkern's cross entropy; backend="torch" is plain PyTorch (SDPA).
"""
import dataclasses
import json
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmkern  # (llmkern.rope loads on first use)
from llmkern.models._attn import HFModule, ZooModel, attend, check_backend, shared_input
from llmkern.models.gpt import LayerNorm
from llmkern.models.llama import apply_rope
from llmkern.ops._checks import is_real

NEOX_FAMILY = ("gpt_neox", "phi")  # config.json model_types this file loads


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# the MLP's activation by the zoo's name (module-level functions: the model must pickle / torch.save)
_ACT = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu}
# transformers' ACT2FN names of those three functions (the tanh approximations differ only in rounding)
_HF_ACT = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "relu": "relu"}


@dataclasses.dataclass
class NeoXConfig:
    """The zoo's description of a GPT-NeoX or Phi model (from_hf_neox builds it from config.json)."""
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512                 # d_model
    block_size: int = 2048            # max_position_embeddings
    n_kv_head: Optional[int] = None   # GQA (Phi's num_key_value_heads); default n_head
    head_dim: Optional[int] = None    # default n_embd // n_head
    intermediate_size: Optional[int] = None  # default 4 * n_embd
    rotary_dim: Optional[int] = None  # rotated channels of each q/k head, even, 0..head_dim; default head_dim // 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation: str = "gelu"          # "gelu" (erf; NeoX), "gelu_tanh" (Phi's gelu_new), "relu"
    parallel_residual: bool = True    # x + attn(ln_1(x)) + mlp(ln_2(x)); False: sequential
    shared_norm: bool = False         # Phi: one LayerNorm feeds both branches (needs parallel_residual)
    qk_layernorm: bool = False        # Phi: LayerNorm over each q/k head's channels before RoPE
    attn_bias: bool = True            # biases on q/k/v/o (NeoX's attention_bias; Phi always)
    lm_head_bias: bool = False        # Phi: True
    tie_embeddings: bool = False
    embd_dropout: float = 0.0         # on the token embeddings (NeoX: hidden_dropout, Phi: embd_pdrop)
    resid_dropout: float = 0.0        # on each branch's output (NeoX: hidden_dropout, Phi: resid_pdrop)
    attn_dropout: float = 0.0         # on the attention probabilities (attention_dropout)
    pad_token_id: Optional[int] = None  # the embedding's padding_idx (Phi's; that row gets no gradient)
    family: str = "gpt_neox"          # the transformers model_type whose checkpoint names neox_state reads
    name: str = ""

    arch = "neox"  # (a class attribute: build() and the zoo tell the families apart by it)
    kv_lora_rank = 0  # (no multi-head latent attention: ZooModel.new_cache reads it)
    sliding_window = sliding_window_layers = None  # (full causal attention in every layer: llmkern.flops reads these)

    def __post_init__(self):
        for f in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            _check_positive_int(f, getattr(self, f))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive_int("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"NeoXConfig.n_kv_head must divide n_head={self.n_head}, got {self.n_kv_head}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"NeoXConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                                 f"(or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        _check_positive_int("head_dim", self.head_dim)
        self.intermediate_size = 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size
        _check_positive_int("intermediate_size", self.intermediate_size)
        if self.rotary_dim is None:
            self.rotary_dim = int(self.head_dim * 0.25)
        r = self.rotary_dim
        # (an odd width has no rotate-half pairs; transformers would rotate past it)
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= self.head_dim or r % 2:
            raise ValueError(f"NeoXConfig.rotary_dim must be an even int in 0..head_dim={self.head_dim}, got {r!r}")
        if not is_real(self.rope_theta, positive=True, float32=True):
            raise ValueError(f"NeoXConfig.rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if not is_real(self.norm_eps, positive=True, float32=True):
            raise ValueError(f"NeoXConfig.norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if self.activation not in _ACT:
            raise ValueError(f"NeoXConfig.activation must be one of {tuple(_ACT)}, got {self.activation!r}")
        for f in ("parallel_residual", "shared_norm", "qk_layernorm", "attn_bias", "lm_head_bias", "tie_embeddings"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"NeoXConfig.{f} must be a bool, got {getattr(self, f)!r}")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("NeoXConfig.shared_norm needs parallel_residual=True (one norm feeds both branches)")
        for f in ("embd_dropout", "resid_dropout", "attn_dropout"):
            v = getattr(self, f)
            if not is_real(v) or not 0.0 <= float(v) < 1.0:
                raise ValueError(f"NeoXConfig.{f} must be a number in [0, 1), got {v!r}")
        if self.family not in NEOX_FAMILY:
            raise ValueError(f"NeoXConfig.family must be one of {NEOX_FAMILY}, got {self.family!r}")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"NeoXConfig.pad_token_id must be a token id in [0, {self.vocab_size}) or None, "
                             f"got {pad!r}")

    @property
    def rope_dim(self):
        """The rotated width (ZooModel and the flops code read this name)."""
        return self.rotary_dim

    @property
    def attn_dim(self):
        return self.n_head * self.head_dim

    @property
    def out_dim(self):
        """The attention output's width (ModelConfig's name; values as wide as the queries here)."""
        return self.attn_dim

    def __getattr__(self, name):
        # (called only for a name the config lacks: code written for ModelConfig, e.g. llmkern.memory or the
        # parallel cost model, reading n_experts or biases gets this message rather than a bare AttributeError)
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"NeoXConfig {self.__dict__.get('name') or ''!r} (GPT-NeoX / Phi) has no {name!r}: "
                             f"a ModelConfig field (GPT / Llama); this use does not cover NeoX models")

    def replace(self, **changes):
        """A copy with fields changed (validated again); ValueError naming a field NeoXConfig does not have."""
        bad = set(changes) - {f.name for f in dataclasses.fields(self)}
        if bad:
            raise ValueError(f"NeoXConfig.replace: unknown NeoXConfig field(s) {sorted(bad)}")
        return dataclasses.replace(self, **changes)


def _check_positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"NeoXConfig.{name} must be a positive int, got {v!r}")


class Attention(nn.Module):
    """Causal self-attention with biases, partial RoPE and (Phi) per-head q/k LayerNorms."""

    def __init__(self, cfg, backend):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.attn_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.attn_dim, cfg.n_embd, bias=cfg.attn_bias)
        # (named q_norm / k_norm, Qwen3's in the zoo: tensor_parallelize keeps norms of those names replicated and
        # sums their gradients over the ranks, each of which sees its own heads only)
        self.q_norm = self.k_norm = None
        if cfg.qk_layernorm:
            self.q_norm = LayerNorm(cfg.head_dim, cfg.norm_eps, True, backend)
            self.k_norm = LayerNorm(cfg.head_dim, cfg.norm_eps, True, backend)
        self.dropout = cfg.attn_dropout
        self.backend_name = backend

    def forward(self, x, cos, sin, cache=None, layer=None, prefix=None, kpm=None):
        B, T, _ = x.shape
        q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # [B, H, T, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.q_norm is not None:  # Phi: over each head's D channels
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.shape[-1] and self.backend_name == "llmkern" and q.dtype == k.dtype:
            q, k = llmkern.rope(q, k, cos, sin)  # channels [R, D) pass through
        elif cos.shape[-1]:  # (rotary_dim 0: no channel rotates)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, backend=self.backend_name, cache=cache, layer=layer, prefix=prefix,
                   key_padding_mask=kpm, context_parallel=getattr(self, "context_parallel", None),
                   dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """down(act(up(x))), both with biases (NeoX's dense_h_to_4h / dense_4h_to_h, Phi's fc1 / fc2)."""

    def __init__(self, cfg):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd)
        self.act = _ACT[cfg.activation]

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg, backend):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.n_embd, cfg.norm_eps, True, backend)
        if not cfg.shared_norm:
            self.post_attention_layernorm = LayerNorm(cfg.n_embd, cfg.norm_eps, True, backend)
        self.self_attn = Attention(cfg, backend)
        self.mlp = MLP(cfg)
        self.parallel, self.shared = cfg.parallel_residual, cfg.shared_norm
        self.dropout = cfg.resid_dropout

    def forward(self, x, cos, sin, cache=None, layer=None, prefix=None, kpm=None):  # x [B, T, d]
        h = self.input_layernorm(x)
        a = self._drop(self.self_attn(h, cos, sin, cache, layer, prefix, kpm))
        if self.parallel:  # both branches read x: (attn + mlp) + x, transformers' order
            m = self._drop(self.mlp(h if self.shared else self.post_attention_layernorm(x)))
            return a + m + x
        h, x = self.post_attention_layernorm(a, residual=x)  # x + a and its norm (one kernel on llmkern)
        return self._drop(self.mlp(h)) + x

    def _drop(self, y):
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class NeoX(ZooModel):
    def __init__(self, config, backend="llmkern"):
        super().__init__()
        if not isinstance(config, NeoXConfig):
            raise ValueError(f"NeoX needs a NeoXConfig (get_config(\"pythia-70m\"), neox_config or from_hf build "
                             f"one), got {type(config).__name__}")
        cfg = self.config = config
        self._backend = check_backend(backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList([Block(cfg, backend) for _ in range(cfg.n_layer)])
        self.final_layernorm = LayerNorm(cfg.n_embd, cfg.norm_eps, True, backend)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for name, value in self._buffer_values().items():
            self.register_buffer(name, value, persistent=False)
        with torch.no_grad():
            self._init_parameters(None)

    def _buffer_values(self):
        """The non-persistent buffers (see ZooModel.init_buffers): transformers' default RoPE frequencies over the
        first rotary_dim channels, float32 (empty for rotary_dim 0)."""
        cfg = self.config
        R = cfg.rotary_dim
        if not R:
            return {"inv_freq": torch.zeros(0)}
        return {"inv_freq": 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R))}

    def _init_parameters(self, seed):
        """The constructor's init (ZooModel.init_weights): normal(0, 0.02) linear layers and embedding, zero
        biases, LayerNorms of gain 1 and bias 0 (the q/k ones too), a zero padding row (Phi's pad_token_id)."""
        self._init_dense_modules(seed)
        pad = self.config.pad_token_id
        if pad is not None:  # (nn.Embedding leaves that row zero, the lookup never trains it; the loop drew it again)
            self.embed_tokens.weight[pad].zero_()

    def hf_module_names(self):
        """{zoo nn.Linear name: HFModule}: where each linear layer sits in transformers' PhiForCausalLM
        (model.layers.{i}.self_attn.q_proj / k_proj / v_proj / dense, model.layers.{i}.mlp.fc1 / fc2, lm_head) or
        GPTNeoXForCausalLM (gpt_neox.layers.{i}.attention.query_key_value / dense, gpt_neox.layers.{i}.mlp.dense_h_to_4h
        / dense_4h_to_h, lm_head). GPT-NeoX's q / k / v are rows of its query_key_value interleaved per head ([q_h, k_h,
        v_h] for each head h, as neox_state splits it): their HFModule rows are row lists. A GPT-NeoX config with fewer
        key/value heads (GQA, which GPTNeoXForCausalLM does not have) leaves q / k / v out (hf_refused_modules says
        why). (llmkern.peft's PEFT checkpoints use this to read and write HF names.)"""
        names = {"lm_head": HFModule("lm_head")}
        for i in range(self.config.n_layer):
            if self.config.family == "phi":
                hf = f"model.layers.{i}."
                subs = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
                        "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.dense",
                        "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}
            else:
                hf = f"gpt_neox.layers.{i}."
                subs = {"self_attn.o_proj": "attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
                        "mlp.down_proj": "mlp.dense_4h_to_h"}
                names.update(self._neox_qkv_rows(hf + "attention.query_key_value", i))
            for zoo, theirs in subs.items():
                names[f"layers.{i}.{zoo}"] = HFModule(hf + theirs)
        return names

    def _neox_qkv_rows(self, qkv, i):
        """{zoo name: HFModule} of layer i's q / k / v in GPT-NeoX's query_key_value `qkv`: its rows per head h are
        [q_h, k_h, v_h] (D each), so q_proj's row h * D + c is qkv's row 3 * D * h + c, k's and v's D and 2 * D
        further. {} with GQA (no such layer in transformers)."""
        cfg = self.config
        if cfg.n_kv_head != cfg.n_head:
            return {}
        H, D = cfg.n_head, cfg.head_dim

        def rows(j):  # (j: 0 for q, 1 for k, 2 for v)
            return tuple(3 * D * h + j * D + c for h in range(H) for c in range(D))

        return {f"layers.{i}.self_attn.{proj}": HFModule(qkv, rows(j))
                for j, proj in enumerate(("q_proj", "k_proj", "v_proj"))}

    def hf_refused_modules(self):
        """{zoo module name: why a LoRA on it cannot be written under transformers' names}: a GPT-NeoX config with
        GQA's q / k / v projections (GPTNeoXForCausalLM's query_key_value has as many key/value heads as query heads;
        save_peft_adapter(hf_names=False) writes the zoo's own names). {} otherwise."""
        cfg = self.config
        if cfg.family == "phi" or cfg.n_kv_head == cfg.n_head:
            return {}
        why = (f"GPT-NeoX's query_key_value has as many key/value heads as query heads, this model has "
               f"n_kv_head={cfg.n_kv_head} < n_head={cfg.n_head} (GQA); use the zoo's own module names "
               f"(save_peft_adapter(..., hf_names=False))")
        return {f"layers.{i}.self_attn.{proj}": why for i in range(cfg.n_layer)
                for proj in ("q_proj", "k_proj", "v_proj")}

    def rope(self, pos, dtype):
        """cos, sin [T, R] for positions [T], [B, 1, T, R] for [B, T]: computed in float32, rounded to dtype."""
        freqs = pos.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _apply(self, fn, *args, **kwargs):
        # the RoPE frequencies stay float32 when the model is cast (.half(), .to(torch.bfloat16)), as in
        # transformers: rounded, every angle pos * inv_freq would shift
        before = self.inv_freq
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != before.dtype:
            self.inv_freq = before.to(self.inv_freq.device)
        return self

    def embed(self, input_ids):
        """The token embeddings [B, T, d] the blocks take, after the embedding dropout (the pipeline's first stage
        calls it too)."""
        x = self.embed_tokens(input_ids)
        if self.config.embd_dropout:
            x = F.dropout(x, self.config.embd_dropout, self.training)
        return x

    def forward(self, input_ids, labels=None, *, cache=None, last_only=False, attention_mask=None,
                position_ids=None, return_logits=True):
        """Logits [B, T, V]; (logits, loss) with labels (shifted inside, -100 ignored). cache: a KVCache
        (model.new_cache) that input_ids continue, extended here; last_only: the last position's logits
        [B, 1, V] (decoding); attention_mask / position_ids: Hugging Face semantics (ZooModel._check_input);
        return_logits=False with labels: (None, loss) without the [B, T, V] logits."""
        prefixes = self.prefixes(input_ids.shape[0]) if torch.is_tensor(input_ids) and input_ids.dim() == 2 else None
        P = self.prefix_length(prefixes)
        start, pos, kpm = self._check_input(input_ids, cache, attention_mask, position_ids, offset=P)
        last_only, return_logits = self._check_loss_args(input_ids, labels, last_only, return_logits)
        T = input_ids.shape[1]
        x = self.embed(input_ids)  # [B, T, d]
        if pos is None:
            pos = self.positions(start, T, input_ids.device) + P
        cos, sin = self.rope(pos, x.dtype)  # [T, R] or [B, 1, T, R]
        for i, block in enumerate(self.layers):
            x = self.run_block(block, x, cos, sin, cache=cache, layer=i, prefix=prefixes[i], kpm=kpm)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        h = self.final_layernorm(x)
        if labels is not None and not return_logits:
            return None, self.fused_lm_loss(h, labels)
        logits = self.head_logits(h)  # [B, T, V] (Phi: + the head's bias)
        if labels is None:
            return logits
        return logits, self.lm_loss(logits, labels)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints: config.json -> NeoXConfig, state dict -> the zoo's names

def _hf_float(hf, key, default, family):
    v = hf.get(key)
    v = default if v is None else v
    if not is_real(v):
        raise ValueError(f"from_hf: {family} config {key}={v!r} must be a number")
    return float(v)


def _hf_bool(hf, key, default, family):
    v = hf.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"from_hf: {family} config {key}={v!r} must be true or false")
    return v


def _hf_rope(hf, family):
    """(rope_theta, partial rotary factor) as transformers 5 reads them: the rope_scaling / rope_parameters dict
    first, then NeoX's rotary_emb_base / rotary_pct (NeoX ignores a top-level rope_theta) or Phi's top-level
    rope_theta / partial_rotary_factor, then the class defaults. Only the default (unscaled) RoPE is supported."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"from_hf: {family} config rope_parameters must be a dict or null, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        raise ValueError(f"from_hf: {family} config {key} rope_type {kind!r} is not supported (only the default, "
                         f"unscaled RoPE)")
    if family == "gpt_neox":
        theta, partial = hf.get("rotary_emb_base", 10000.0), hf.get("rotary_pct", 0.25)
    else:
        theta, partial = hf.get("rope_theta", 10000.0), hf.get("partial_rotary_factor", 0.5)
    theta, partial = rope.get("rope_theta", theta), rope.get("partial_rotary_factor", partial)
    if not is_real(theta, positive=True, float32=True):
        raise ValueError(f"from_hf: {family} config rope_theta={theta!r} must be a finite number > 0")
    if not is_real(partial) or not 0.0 <= float(partial) <= 1.0:
        raise ValueError(f"from_hf: {family} config partial_rotary_factor={partial!r} must be a number in [0, 1]")
    return float(theta), float(partial)


def _hf_int(hf, key, family, default=None):
    v = hf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"from_hf: {family} config {key}={v!r} must be a positive int")
    return v


def neox_config(hf):
    """The NeoXConfig of a transformers config.json dict with model_type "gpt_neox" (GPTNeoXForCausalLM: Pythia,
    GPT-NeoX-20B) or "phi" (PhiForCausalLM: Phi-1, 1.5, 2). Keys left out take the transformers 5 class defaults;
    a configuration transformers would run differently than this file raises ValueError naming the key."""
    family = hf.get("model_type")
    if family not in NEOX_FAMILY:
        raise ValueError(f"from_hf: neox_config takes model_type {NEOX_FAMILY}, got {family!r}")
    d, H = _hf_int(hf, "hidden_size", family), _hf_int(hf, "num_attention_heads", family)
    if d % H:
        raise ValueError(f"from_hf: {family} config hidden_size={d} must be divisible by num_attention_heads={H}")
    head_dim = d // H
    if family == "phi" and hf.get("head_dim") is not None:  # (PhiAttention reads one where config.json has it)
        head_dim = _hf_int(hf, "head_dim", family)
    theta, partial = _hf_rope(hf, family)
    act = hf.get("hidden_act", "gelu" if family == "gpt_neox" else "gelu_new")
    if act not in _HF_ACT:
        raise ValueError(f"from_hf: {family} config hidden_act={act!r} is not supported ({sorted(_HF_ACT)})")
    rotary = int(head_dim * partial)  # (transformers' rotary_ndims)
    if rotary % 2:
        raise ValueError(f"from_hf: {family} config partial_rotary_factor={partial} gives {rotary} rotary channels "
                         f"of head_dim={head_dim}: an odd number is not supported")
    common = dict(vocab_size=_hf_int(hf, "vocab_size", family), n_layer=_hf_int(hf, "num_hidden_layers", family),
                  n_head=H, n_embd=d, head_dim=head_dim,
                  block_size=_hf_int(hf, "max_position_embeddings", family, 2048),
                  intermediate_size=_hf_int(hf, "intermediate_size", family), rotary_dim=rotary, rope_theta=theta,
                  norm_eps=_hf_float(hf, "layer_norm_eps", 1e-5, family), activation=_HF_ACT[act],
                  tie_embeddings=_hf_bool(hf, "tie_word_embeddings", False, family),
                  attn_dropout=_hf_float(hf, "attention_dropout", 0.0, family), family=family,
                  name=hf.get("_name_or_path", ""))
    try:
        if family == "gpt_neox":
            drop = _hf_float(hf, "hidden_dropout", 0.0, family)
            return NeoXConfig(**common, parallel_residual=_hf_bool(hf, "use_parallel_residual", True, family),
                              attn_bias=_hf_bool(hf, "attention_bias", True, family), embd_dropout=drop,
                              resid_dropout=drop)
        qk_norm = _hf_bool(hf, "qk_layernorm", False, family)
        if qk_norm and head_dim != d // H:  # (transformers' q_layernorm is hidden_size // heads wide)
            raise ValueError(f"from_hf: phi config qk_layernorm with head_dim={head_dim} != hidden_size // "
                             f"num_attention_heads={d // H} is not supported")
        return NeoXConfig(**common, n_kv_head=hf.get("num_key_value_heads") or H, shared_norm=True,
                          qk_layernorm=qk_norm, lm_head_bias=True, pad_token_id=_phi_padding_idx(hf),
                          embd_dropout=_hf_float(hf, "embd_pdrop", 0.0, family),
                          resid_dropout=_hf_float(hf, "resid_pdrop", 0.0, family))
    except ValueError as e:  # (NeoXConfig's own checks: worded with the config.json key's field)
        raise ValueError(f"from_hf: {family} config: {e}") from None


def _phi_padding_idx(hf):
    pad = hf.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < hf["vocab_size"]):
        raise ValueError(f"from_hf: phi config pad_token_id={pad!r} is not a token id in [0, {hf['vocab_size']}) "
                         f"(transformers' embedding padding_idx)")
    return pad


# buffers of old NeoX checkpoints that transformers skips on load too (the causal mask, RoPE's frequencies)
_NEOX_UNUSED = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def _split_neox_qkv(w, n_head, head_dim):
    """query_key_value's weight [3 * H * D, d] (or bias [3 * H * D]), rows per head [q_h, k_h, v_h] -> q, k, v
    [H * D, ...] each."""
    if w.shape[0] != 3 * n_head * head_dim:
        raise ValueError(f"from_hf: query_key_value has {w.shape[0]} rows, the config needs 3 * {n_head} heads * "
                         f"{head_dim} = {3 * n_head * head_dim}")
    per_head = w.view(n_head, 3, head_dim, *w.shape[1:])  # [H, 3, D, (d)]
    return tuple(per_head[:, j].reshape(n_head * head_dim, *w.shape[1:]) for j in range(3))


def _rename(state, renames):
    """The state dict with each key's first matching (old, new) substring replaced."""
    out = {}
    for k, v in state.items():
        for old, new in renames:
            if old in k:
                k = k.replace(old, new, 1)
                break
        out[k] = v
    return out


def _neox_layers(state, cfg):
    """NeoX's per-layer keys (prefix stripped) -> the zoo's: query_key_value split, the rest renamed."""
    out = {}
    for k, v in state.items():
        if k.endswith(_NEOX_UNUSED):
            continue
        if ".attention.query_key_value." in k:
            q, kk, vv = _split_neox_qkv(v, cfg.n_head, cfg.head_dim)
            head = k.replace(".attention.query_key_value.", ".self_attn.")
            for name, t in (("q_proj.", q), ("k_proj.", kk), ("v_proj.", vv)):
                out[head.replace(".self_attn.", ".self_attn." + name)] = t
            continue
        out[k] = v
    return _rename(out, ((".attention.dense.", ".self_attn.o_proj."), (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
                         (".mlp.dense_4h_to_h.", ".mlp.down_proj.")))


def neox_state(state, cfg):
    """(cfg, the zoo's state dict) from a GPTNeoXForCausalLM / PhiForCausalLM checkpoint's state dict (cfg from
    neox_config; returned again since a tied config whose checkpoint holds a different lm_head loads untied, as
    transformers does). Keys this file does not use stay under their names: load_state_dict reports them."""
    from llmkern.models.hf import _resolve_tie, _strip  # (hf.py imports this module)

    if cfg.family == "gpt_neox":
        state = _strip(state, ("gpt_neox.",))
        state = _rename(state, (("embed_out.", "lm_head."), ("embed_in.", "embed_tokens."),
                                ("final_layer_norm.", "final_layernorm.")))
        state = _neox_layers(state, cfg)
    else:  # Phi
        state = _rename(_strip(state, ("model.",)), ((".self_attn.dense.", ".self_attn.o_proj."),
                                                     (".self_attn.q_layernorm.", ".self_attn.q_norm."),
                                                     (".self_attn.k_layernorm.", ".self_attn.k_norm."),
                                                     (".mlp.fc1.", ".mlp.up_proj."), (".mlp.fc2.", ".mlp.down_proj.")))
    cfg = _resolve_tie(cfg, state, "embed_tokens.weight")
    if cfg.tie_embeddings:  # (loaded once, through the embedding)
        state.pop("lm_head.weight", None)
    return cfg, state


def from_hf_neox(path, backend="llmkern", dtype=None, device=None):
    """llmkern.models.from_hf for a GPT-NeoX / Pythia or Phi-1/1.5/2 checkpoint directory: a NeoX model (eval mode)
    whose logits, loss and greedy tokens equal transformers' GPTNeoXForCausalLM / PhiForCausalLM's. A checkpoint of
    another model_type raises ValueError (from_hf loads those)."""
    from llmkern.models.hf import from_hf

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"from_hf_neox: path must be a checkpoint directory (a str or os.PathLike), got "
                        f"{type(path).__name__}")
    cfg_file = os.path.join(path, "config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            mtype = json.load(f).get("model_type")
        if mtype not in NEOX_FAMILY:  # (before reading the weights)
            raise ValueError(f"from_hf_neox: config.json's model_type is {mtype!r}, not one of {NEOX_FAMILY} "
                             f"(llmkern.models.from_hf loads the other families)")
    return from_hf(path, backend=backend, dtype=dtype, device=device)
