"""GPT (GPT-2 / GPT-3 family) in nanoGPT's spirit: learned positions, pre-LayerNorm, GELU MLP.

    model = GPT(get_config("gpt2"), backend="llmkern")
    logits = model(idx)                    # [B, T, V]
    logits, loss = model(idx, labels=idx)  # next-token loss (labels shifted inside, -100 ignored)

Projections are separate q/k/v/o and up/down nn.Linear modules (weights [out, in]) so that LoRA
(Q/V in the LoRA paper), adapters and tensor-parallel sharding address them by name. The
attention goes through llmkern.attention (backend="llmkern") or torch SDPA (backend="torch"); on
llmkern, LayerNorm runs llmkern.layer_norm, fused with the residual add before ln_2.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmkern  # (llmkern.layer_norm loads on first use)

from llmkern.models._attn import HFModule, ZooModel, attend, check_backend, shared_input
from llmkern.models.configs import ModelConfig, get_config


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# (module-level functions, not lambdas: the model keeps one as an attribute and must pickle / torch.save)
_ACT = {"gelu_tanh": _gelu_tanh, "gelu": F.gelu, "relu": F.relu}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, backend):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.attn_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.attn_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.backend_name = backend

    def forward(self, x, cache=None, layer=None, prefix=None, kpm=None):
        B, T, _ = x.shape
        q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = attend(q, k, v, backend=self.backend_name, cache=cache, layer=layer, prefix=prefix,
                   key_padding_mask=kpm, context_parallel=getattr(self, "context_parallel", None),
                   dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        self.act = _ACT[cfg.activation]
        self.dropout = cfg.dropout

    def forward(self, x):
        return F.dropout(self.down_proj(self.act(self.up_proj(x))), self.dropout, self.training)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict). forward(x, residual) -> (ln(x + residual),
    x + residual): the residual add and the norm after it. backend="llmkern": one llmkern.layer_norm
    when the dtypes agree and autocast would not run F.layer_norm in float32 on 16-bit inputs."""

    def __init__(self, dim, eps, bias, backend="torch"):
        super().__init__(dim, eps=eps, bias=bias)
        self.backend_name = backend

    def forward(self, x, residual=None):
        if self.backend_name == "llmkern" and self._fusable(x, residual):
            return llmkern.layer_norm(x, self.weight, self.bias, self.eps, residual=residual,
                                      return_residual=residual is not None)
        if residual is not None:
            x = x + residual
            return super().forward(x), x
        return super().forward(x)

    def _fusable(self, x, residual):
        same = x.dtype == self.weight.dtype and (residual is None or residual.dtype == x.dtype)
        return same and (x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type))


class Block(nn.Module):
    def __init__(self, cfg, backend):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.norm_eps, cfg.bias, backend)
        self.attn = CausalSelfAttention(cfg, backend)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.norm_eps, cfg.bias, backend)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=None, prefix=None, kpm=None):
        a = self.attn(self.ln_1(x), cache, layer, prefix, kpm)
        h, x = self.ln_2(a, residual=x)  # x + a and its norm (one kernel on llmkern)
        return x + self.mlp(h)


class GPT(ZooModel):
    _table_positions = True  # (wpe: learned positions)

    def __init__(self, config="gpt2", backend="llmkern"):
        super().__init__()
        cfg = get_config(config) if not isinstance(config, ModelConfig) else config
        if cfg.arch != "gpt":
            raise ValueError(f"GPT needs config.arch='gpt', got {cfg.arch!r} (use Llama)")
        self.config = cfg
        self._backend = check_backend(backend)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.wpe._position = True
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg, backend) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.norm_eps, cfg.bias, backend)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    def _init_parameters(self, seed):
        """The constructor's init (ZooModel.init_weights): normal(0, 0.02) linear layers and embeddings, GPT-2's
        normal(0, 0.02 / sqrt(2 n_layer)) residual projections, zero biases, LayerNorms of gain 1 and bias 0."""
        self._init_dense_modules(seed)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                self._normal_(p, 0.02 / math.sqrt(2 * self.config.n_layer), seed, name)

    def hf_module_names(self):
        """{zoo nn.Linear name: HFModule}: where each linear layer sits in transformers'
        GPT2LMHeadModel (the same correspondence as from_hf's weight conversion):

            h.{i}.attn.q_proj / k_proj / v_proj  transformer.h.{i}.attn.c_attn, output rows
                                                 [0, d) / [d, 2d) / [2d, 3d) of the fused layer
            h.{i}.attn.o_proj                    transformer.h.{i}.attn.c_proj
            h.{i}.mlp.up_proj / down_proj        transformer.h.{i}.mlp.c_fc / mlp.c_proj
            lm_head                              lm_head (an nn.Linear in HF too)

        All but lm_head are Conv1D layers in HF (weight [in, out]). (llmkern.peft's PEFT
        checkpoints use this to read and write HF names.)"""
        cfg = self.config
        q, kv = cfg.attn_dim, cfg.n_kv_head * cfg.head_dim  # GPT-2 itself: both n_embd
        names = {"lm_head": HFModule("lm_head")}
        for i in range(cfg.n_layer):
            hf = f"transformer.h.{i}."
            names[f"h.{i}.attn.q_proj"] = HFModule(hf + "attn.c_attn", slice(0, q), conv1d=True)
            names[f"h.{i}.attn.k_proj"] = HFModule(hf + "attn.c_attn", slice(q, q + kv), conv1d=True)
            names[f"h.{i}.attn.v_proj"] = HFModule(hf + "attn.c_attn", slice(q + kv, q + 2 * kv), conv1d=True)
            names[f"h.{i}.attn.o_proj"] = HFModule(hf + "attn.c_proj", conv1d=True)
            names[f"h.{i}.mlp.up_proj"] = HFModule(hf + "mlp.c_fc", conv1d=True)
            names[f"h.{i}.mlp.down_proj"] = HFModule(hf + "mlp.c_proj", conv1d=True)
        return names

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
        if pos is None:
            pos = self.positions(start, T, input_ids.device) + P
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = self.run_block(block, x, cache=cache, layer=i, prefix=prefixes[i], kpm=kpm)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        h = self.ln_f(x)
        if labels is not None and not return_logits:
            return None, self.fused_lm_loss(h, labels)
        logits = self.head_logits(h)
        if labels is None:
            return logits
        return logits, self.lm_loss(logits, labels)
