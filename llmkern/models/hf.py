"""Load local Hugging Face checkpoints (safetensors) into the zoo.

    model = from_hf("/path/to/checkpoint_dir", backend="llmkern", dtype=torch.bfloat16)

Supported config.json model_types:
  gpt2     GPT2LMHeadModel -> GPT
  llama    LlamaForCausalLM -> Llama (rope_scaling linear / dynamic / llama3 / yarn; attention_bias,
           mlp_bias)
  mistral  MistralForCausalLM -> Llama with sliding_window (null: none), in every layer; with
           layer_types (Ministral-style), in the layers marked "sliding_attention", as transformers'
           AutoModelForCausalLM loads it (as MinistralForCausalLM)
  qwen2    Qwen2ForCausalLM -> Llama with q/k/v biases; use_sliding_window honoured per layer
           (layer_types, else the layers from max_window_layers on)
  qwen3    Qwen3ForCausalLM -> Llama with q_norm/k_norm, its head_dim, attention_bias; sliding
           windows as Qwen2
  mixtral  MixtralForCausalLM -> Llama with n_experts = num_local_experts, top-k num_experts_per_tok
           (renormalized), Mistral's sliding_window
  qwen2_moe  Qwen2MoeForCausalLM -> Llama with experts of moe_intermediate_size, norm_topk_prob, the
           sigmoid-gated shared expert (shared_expert_intermediate_size), q/k/v biases (qkv_bias), dense
           layers per mlp_only_layers / decoder_sparse_step
  qwen3_moe  Qwen3MoeForCausalLM -> the same without the shared expert, with Qwen3's attention
  granite  GraniteForCausalLM -> Llama (attention_bias, mlp_bias) with embeddings times embedding_multiplier,
           each attention / MLP output times residual_multiplier before its residual add, attention_multiplier as
           the softmax scale, the logits divided by logits_scaling (each a number > 0, else refused naming it)
  olmo2    Olmo2ForCausalLM -> Llama with post-norm blocks (post_attention / post_feedforward_layernorm on the
           attention / MLP outputs, no input norms) and q_norm / k_norm over all the heads' channels of q and k;
           attention_bias; a config.json without pad_token_id takes Olmo2Config's 1. In bfloat16 / float16 the
           norms round as LlamaRMSNorm (normalised value rounded, then times the gain); Olmo2RMSNorm multiplies in
           float32 and rounds once: the last bit can differ (float32: the same)
  phi3     Phi3ForCausalLM (Phi-3-mini-4k / Phi-3-medium-4k, Phi-3 128k, Phi-3.5-mini, Phi-4-mini) -> Llama: the
           fused qkv_proj (rows q, k, v) and gate_up_proj (rows gate, then up) are split into q/k/v_proj and
           gate/up_proj; head_dim (default hidden_size / num_attention_heads); sliding_window (null: none) in every
           layer, as transformers 5.24's Phi3Model masks with it (Phi-3-mini-4k's 2047); attention_dropout as
           Llama's; embd_pdrop ignored, as transformers' Phi3Model ignores it. partial_rotary_factor (the RoPE
           dict's, else the top-level key; Phi-4-mini's 0.75): RoPE on the first int(head_dim * factor) channels of
           each head (ModelConfig.rotary_dim). rope_type "longrope" (also its old names "su" and "yarn"):
           short_factor / long_factor, factor and attention_factor from the RoPE dict, the top-level
           original_max_position_embeddings (default 4096, which wins over the dict's, as in Phi3Config); each
           forward takes the long factors when its largest position + 1 exceeds it. transformers' Phi3 generate
           recomputes its KV cache at the step that crosses over (Llama.longrope_recompute says which step).
           Refused, naming the key: another rope_type, a partial_rotary_factor outside (0, 1] or giving an odd
           number of rotary channels, factor lists not of rotary width / 2 numbers, resid_pdrop != 0 (the zoo's
           Llama has no residual dropout), layer_types (Phi3 reads none). longrope on other model_types: refused.
           A config.json without pad_token_id takes Phi3Config's 32000 (the embedding's padding_idx). PEFT
           adapters on qkv_proj / gate_up_proj map onto the split layers (ModelConfig.hf_fused_projections).
  gemma    GemmaForCausalLM -> Llama with a GeGLU MLP (hidden_act), RMSNorm gains (1 + w) in float32,
           embeddings times sqrt(hidden_size), head_dim, attention_bias; a config.json without pad_token_id
           takes the Gemma configs' 0 (the embedding's padding_idx), as for Gemma 2 / 3
  gemma2   Gemma2ForCausalLM -> Gemma plus the sandwich norms (post_attention / pre_feedforward /
           post_feedforward_layernorm), attention scale query_pre_attn_scalar ** -0.5,
           attn_logit_softcapping, final_logit_softcapping (logits and loss), sliding_window in the
           layers layer_types marks "sliding_attention" (default: every other one, from layer 0)
  gemma3_text  Gemma3ForCausalLM (text only) -> Gemma 2 plus q_norm/k_norm and Gemma 3's RoPE: the
           sliding layers' rope_parameters["sliding_attention"] (or the older rope_local_base_freq,
           plain RoPE only), the others' rope_parameters["full_attention"] (or rope_theta / rope_scaling:
           linear, llama3, yarn, dynamic); default layer_types from sliding_window_pattern (6).
           attn_logit_softcapping must be null: transformers' Gemma3Attention does not apply it (loading
           either way could be silently wrong). gemma3 (the multimodal wrapper), gemma3n, gemma4: not
           supported.
  deepseek_v3  DeepseekV3ForCausalLM -> Llama with multi-head latent attention (kv_lora_rank, q_lora_rank or
           null, qk_nope/qk_rope/v_head_dim, rope_interleave; the softmax scale with YaRN's mscale_all_dim
           correction as transformers applies it) and, from layer first_k_dense_replace on, the aux-loss-free
           MoE (n_routed_experts of moe_intermediate_size, num_experts_per_tok, sigmoid scores with
           e_score_correction_bias for the choice, n_group / topk_group, norm_topk_prob, routed_scaling_factor,
           n_shared_experts ungated). No aux loss, as transformers (output_router_logits adds none for it).
           Multi-token-prediction layers (num_nextn_predict_layers, stored as the layers past
           num_hidden_layers) are ignored with a warning, as transformers ignores them. Refused, naming the key:
           topk_method other than "noaux_tc", scoring_func other than "sigmoid", moe_layer_freq != 1 (keys of
           DeepSeek's own code that transformers ignores), quantization_config, attention_bias,
           num_key_value_heads != num_attention_heads, another hidden_act.
  deepseek_v2  DeepseekV2ForCausalLM (DeepSeek-V2, V2-Lite with q_lora_rank null) -> the same Llama with MLA
           (V2's RoPE always rotates interleaved pairs; YaRN's mscale_all_dim scale as V3) and, from layer
           first_k_dense_replace on (default 0), V2's MoE (moe_router "softmax_group"): float32 softmax scores,
           topk_method "greedy" (plain top-k; n_group / topk_group ignored, as transformers does) or
           "group_limited_greedy" (the best topk_group of n_group groups by their best score, then top-k), no
           selection bias, no renormalisation (transformers' V2 router has none), times routed_scaling_factor;
           n_shared_experts ungated. No aux loss, as transformers. Refused, naming the key: another topk_method,
           scoring_func other than "softmax", moe_layer_freq != 1, norm_topk_prob true and rope_interleave false
           (DeepSeek's own code would renormalise / the key would mean another RoPE; transformers ignores both),
           quantization_config, attention_bias, mlp_bias, num_key_value_heads != num_attention_heads, another
           hidden_act.
  gpt_neox GPTNeoXForCausalLM (Pythia, GPT-NeoX-20B) -> NeoX (llmkern/models/neox.py): the fused
           query_key_value (rows per head [q_h, k_h, v_h]) split into q/k/v_proj; use_parallel_residual (default
           true: x + attn(ln_1(x)) + mlp(ln_2(x))), attention_bias, rotary_pct / rotary_emb_base (or the RoPE
           dict's partial_rotary_factor / rope_theta: RoPE on the first int(head_dim * factor) channels of each
           head), hidden_act (the exact or a tanh GELU, relu), hidden_dropout, attention_dropout,
           tie_word_embeddings; the LM head as embed_out or lm_head; old checkpoints' attention.bias /
           masked_bias / rotary_emb.inv_freq buffers ignored, as transformers ignores them
  phi      PhiForCausalLM (Phi-1, Phi-1.5, Phi-2) -> NeoX with one input_layernorm feeding both parallel branches,
           the LM head's bias, num_key_value_heads (GQA), qk_layernorm (per-head q/k LayerNorms), head_dim,
           partial_rotary_factor / rope_theta (the RoPE dict's, else the top-level keys), resid_pdrop,
           embd_pdrop, attention_dropout, pad_token_id (the embedding's padding_idx). For both: rope scaling, an
           odd number of rotary channels or another activation raise ValueError naming the key
Expert weights load from either checkpoint layout: one tensor per expert (Mixtral's
block_sparse_moe.experts.{e}.w1/w3/w2, Qwen's mlp.experts.{e}.gate_proj/up_proj/down_proj, which is what
transformers 5's save_pretrained writes) or the stacked mlp.experts.gate_up_proj / down_proj.
router_aux_loss_coef is taken only when output_router_logits is set (transformers adds the aux loss to
the loss only then); router_jitter_noise (training-time noise) is not implemented and warns.
Every Llama-family model uses hidden_act "silu", tie_word_embeddings, rope_theta / rope_parameters
(or the older rope_scaling) and rms_norm_eps as transformers reads them. Anything else that would
change the outputs (another activation, mixture-of-experts keys on a dense family, Qwen-MoE sliding
windows, other model_types; for Gemma use_bidirectional_attention, another hidden activation, a
rope_type on Gemma 3's sliding layers) raises a ValueError naming the config key: nothing loads silently
wrong.

Reads config.json and model.safetensors (or the shards listed in model.safetensors.index.json);
no network, no transformers import. GPT-2's Conv1D weights ([in, out]) are transposed into
nn.Linear layout and its fused c_attn is split into q/k/v. The zoo models' hf_module_names() give the
same correspondence per linear layer (zoo name -> HFModule(HF name, output rows, Conv1D or not)); the
PEFT adapter reader/writer (llmkern.peft.load_peft_adapter / save_peft_adapter) uses it.
"""
import json
import os
import warnings

import torch

from llmkern.models._attn import HFModule  # noqa: F401  (re-exported: the zoo <-> HF name table's entries)
from llmkern.models._attn import check_backend
from llmkern.models.configs import ModelConfig, _check_rope_scaling, yarn_mscale
from llmkern.models.gpt import GPT
from llmkern.models.llama import Llama
from llmkern.models.neox import NEOX_FAMILY, NeoX, neox_config, neox_state


LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",  # the zoo's Llama loads
                "granite", "olmo2")
PHI3_FAMILY = ("phi3",)  # the zoo's Llama too, from fused qkv_proj / gate_up_proj weights (phi3_config)
MOE_FAMILY = ("mixtral", "qwen2_moe", "qwen3_moe")
GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")  # also the zoo's Llama, with the Gemma options
DEEPSEEK_FAMILY = ("deepseek_v3", "deepseek_v2")  # the zoo's Llama with MLA and DeepSeek's MoE (deepseek.py)


def _load_state(path):
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for fn in files:
            state.update(load_file(os.path.join(path, fn)))
        return state
    raise FileNotFoundError(f"from_hf: no model.safetensors or model.safetensors.index.json in {path!r} "
                            f"(only safetensors checkpoints are supported)")


def _strip(state, prefixes):
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def gpt2_config(hf):
    act = hf.get("activation_function", "gelu_new")
    # transformers' ACT2FN names of the same three functions (tanh approximation, erf, relu)
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
            "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu",
            "relu": "relu"}
    if act not in acts:
        raise ValueError(f"from_hf: GPT-2 activation_function {act!r} is not supported")
    # (reorder_and_upcast_attn only changes the precision of the attention scores: accepted)
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"from_hf: GPT-2 config {flag}={hf[flag]!r} is not supported")
    # (transformers' GPT-2 drops at three places; the zoo's GPT has one rate for all three)
    drops = {k: hf.get(k, 0.1) for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop")}
    if len(set(drops.values())) > 1:
        raise ValueError(f"from_hf: GPT-2 dropout rates must be equal (the zoo's GPT has one), got {drops}")
    return ModelConfig(arch="gpt", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                       n_embd=hf["n_embd"], block_size=hf.get("n_positions", 1024), dropout=drops["attn_pdrop"],
                       intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"], bias=True,
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=acts[act],
                       tie_embeddings=hf.get("tie_word_embeddings", True), name=hf.get("_name_or_path", ""))


def _padding_idx(hf):
    """transformers' Llama-family embedding padding_idx: config.pad_token_id, when it is a token of the vocabulary
    (nn.Embedding refuses others; None: no padding row)."""
    pad = hf.get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < hf["vocab_size"]:
        return pad
    if pad is not None:
        raise ValueError(f"from_hf: pad_token_id={pad!r} is not a token id in [0, {hf['vocab_size']}) (transformers' "
                         f"embedding padding_idx)")
    return None


def _rope_parameters(hf):
    """(rope_theta, scaling dict) as transformers reads config.json: a non-empty rope_scaling (the
    pre-5.0 name) wins over rope_parameters; rope_theta from that dict, else the top-level key;
    llama3/yarn take a top-level original_max_position_embeddings first, then the dict's, then
    max_position_embeddings; yarn's factor defaults to max_position_embeddings / that original."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):  # Gemma-3 style, one per layer type: not read here
        raise ValueError(f"from_hf: rope_parameters with one dict per layer type ({sorted(rope)}) are not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    max_pos = hf.get("max_position_embeddings", 2048)  # (llama_config fills in each family's default)
    if kind in ("llama3", "yarn"):
        key = "original_max_position_embeddings"
        rope[key] = hf[key] if key in hf else rope.get(key, max_pos)
        if kind == "yarn" and rope.get("factor") is None and isinstance(rope[key], (int, float)) and rope[key] > 0:
            rope["factor"] = max_pos / rope[key]
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if kind != "default" and partial not in (None, 1, 1.0):
        raise ValueError(f"from_hf: partial_rotary_factor={partial!r} with rope_type {kind!r} is not supported")
    return theta, rope


def _hf_rope_scaling(rope, family):
    """The zoo's rope_scaling of a non-Phi-3 family's RoPE dict (ValueError naming the key). longrope is taken
    from phi3 checkpoints only (phi3_config): transformers' Phi3ForCausalLM.generate recomputes its cache where
    the factors switch, the other classes do not, and partial rotary there is Phi3's."""
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "longrope":
        raise ValueError(f"from_hf: {family} config rope_type 'longrope' is not supported (it is for model_type "
                         f"'phi3': Phi-3 128k, Phi-3.5, Phi-4-mini)")
    try:
        return _check_rope_scaling(rope, "llama")
    except ValueError as e:
        raise ValueError(f"from_hf: {e}") from None


# config.json defaults of the Llama-family classes (transformers 5), for keys a file may leave out
_QWEN_WINDOW = dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
_QWEN_MOE = dict(use_sliding_window=False, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)
_FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, head_dim=None),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, head_dim=None, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=None, **_QWEN_WINDOW),
    "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128, **_QWEN_WINDOW),
    "mixtral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, head_dim=None, sliding_window=None,
                    num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5),
    "qwen2_moe": dict(max_position_embeddings=32768, num_key_value_heads=16, head_dim=None, qkv_bias=True,
                      num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, **_QWEN_MOE),
    "qwen3_moe": dict(max_position_embeddings=32768, num_key_value_heads=4, head_dim=None, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, **_QWEN_MOE),
    "phi3": dict(max_position_embeddings=4096, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-5,
                 sliding_window=None, original_max_position_embeddings=4096),
    "granite": dict(max_position_embeddings=2048, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
                    embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=1.0, logits_scaling=1.0),
    "olmo2": dict(max_position_embeddings=2048, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-5),
}
# the config classes' pad_token_id defaults (None elsewhere): the embedding's padding_idx when config.json has
# no pad_token_id, as transformers builds it (that row gets no gradient)
_DEFAULT_PAD = {"phi3": 32000, "gemma": 0, "gemma2": 0, "gemma3_text": 0, "olmo2": 1}
# keys of mixture-of-experts variants (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek ...): a dense model would
# load without their expert weights, silently wrong
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


def _bool_key(hf, key, family):
    v = hf.get(key, False)
    if v not in (None, True, False):
        raise ValueError(f"from_hf: {family} config {key}={v!r} must be a bool")
    return bool(v)


def _sliding_window(hf, family):
    """(W or None, sliding layer indices or None = all), as transformers' Mistral / Qwen2 / Qwen3
    read config.json. Mistral: `sliding_window` (null: none) in every layer, unless config.json lists
    layer_types: transformers' AutoConfig then loads it as Ministral, which slides only in the layers
    marked "sliding_attention" (MistralForCausalLM itself would ignore them, and warns to use the Auto
    classes). Qwen2/3: only with use_sliding_window, in the layers layer_types marks
    "sliding_attention" (default: those from max_window_layers on)."""
    if family in ("llama", "granite", "olmo2"):  # (their transformers classes never slide)
        return None, None
    if family not in ("mistral", "phi3") and not _bool_key(hf, "use_sliding_window", family):
        return None, None
    W = hf["sliding_window"]
    if W is None:
        return None, None
    if isinstance(W, bool) or not isinstance(W, int) or W <= 0:
        raise ValueError(f"from_hf: {family} config sliding_window={W!r} must be a positive int or null")
    if family == "phi3" or (family == "mistral" and hf.get("layer_types") is None):  # (every layer)
        return W, None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        first = hf["max_window_layers"]
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"from_hf: {family} config layer_types must list 'full_attention' / 'sliding_attention' "
                         f"for each of the {n} layers, got {types!r}")
    return W, tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def llama_config(hf):
    """The zoo ModelConfig of a Llama-family config.json: LlamaForCausalLM, MistralForCausalLM (sliding
    window), Qwen2ForCausalLM (q/k/v biases, optional sliding windows per layer) and Qwen3ForCausalLM
    (qk-norm, explicit head_dim, attention_bias). Raises ValueError, naming the config key, for what the
    zoo cannot express."""
    family = hf.get("model_type", "llama")
    hf = {**_FAMILY_DEFAULTS[family], **hf}
    if family not in MOE_FAMILY:
        for key in _MOE_KEYS:
            if hf.get(key):
                raise ValueError(f"from_hf: {family} config {key}={hf[key]!r}: mixture-of-experts keys on a dense "
                                 f"model_type are not supported (the MoE families: {', '.join(MOE_FAMILY)})")
    # transformers >= 5 writes rope_parameters (theta and scaling in one dict); older configs
    # rope_theta and rope_scaling.
    theta, rope = _rope_parameters(hf)
    scaling = _hf_rope_scaling(rope, family)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"from_hf: {family} config hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if family in ("llama", "granite"):  # attention_bias: q/k/v/o; mlp_bias: gate/up/down
        qkv = o = _bool_key(hf, "attention_bias", family)
        mlp = _bool_key(hf, "mlp_bias", family)
    elif family in ("qwen3", "qwen3_moe", "olmo2"):  # (Olmo2MLP has no biases)
        qkv = o = _bool_key(hf, "attention_bias", family)
        mlp = False
    elif family == "qwen2_moe":  # q/k/v biased per qkv_bias (default True)
        qkv, o, mlp = _bool_key(hf, "qkv_bias", family), False, False
    else:  # Mistral, Mixtral: no biases; Qwen2: q/k/v always biased, o_proj and the MLP never
        qkv, o, mlp = family == "qwen2", False, False
    moe = _moe_options(hf, family) if family in MOE_FAMILY else {}
    # Granite's four scalars; OLMo 2's post-norm blocks and q/k norms over all the heads
    extra = _granite_options(hf) if family == "granite" else \
        dict(pre_norms=False, post_norms=True, qk_norm_full=True) if family == "olmo2" else {}
    # Mixtral slides like Mistral (every layer); Qwen-MoE windows follow their own layer rules: refused
    window, window_layers = _sliding_window(hf, "mistral" if family == "mixtral" else family)
    return ModelConfig(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                       n_head=hf["num_attention_heads"], n_kv_head=hf["num_key_value_heads"],
                       n_embd=hf["hidden_size"], head_dim=hf["head_dim"],
                       intermediate_size=hf["intermediate_size"],
                       block_size=hf["max_position_embeddings"], bias=mlp, qkv_bias=qkv, o_bias=o,
                       qk_norm=family in ("qwen3", "qwen3_moe", "olmo2"), sliding_window=window,
                       sliding_window_layers=window_layers, **moe, **extra,
                       dropout=float(hf.get("attention_dropout") or 0.0),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                       tie_embeddings=hf.get("tie_word_embeddings", False), name=hf.get("_name_or_path", ""))


def _granite_options(hf):
    """The ModelConfig fields of GraniteForCausalLM's scalars: embedding_multiplier and residual_multiplier as
    they are, attention_multiplier as the softmax scale (in place of head_dim ** -0.5), the logits divided by
    logits_scaling. Each must be a number > 0 (ValueError naming the key)."""
    return dict(embedding_multiplier=_positive(hf, "embedding_multiplier", "granite"),
                residual_multiplier=_positive(hf, "residual_multiplier", "granite"),
                attn_scale=_positive(hf, "attention_multiplier", "granite"),
                logits_scaling=_positive(hf, "logits_scaling", "granite"))


def phi3_config(hf):
    """The zoo ModelConfig of a Phi3ForCausalLM config.json (see the module docstring): the Phi-3-specific keys
    are checked here, the rest as a Llama's (llama_config). Raises ValueError, naming the config key, for what
    the zoo's Llama cannot express."""
    hf = {**_FAMILY_DEFAULTS["phi3"], **hf}
    # (Phi3Config: a non-empty rope_scaling wins over rope_parameters; "su" / "yarn" are renamed "longrope")
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"from_hf: phi3 config {key}={rope!r} must be a dict or null")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rotary_dim = _phi3_rotary_dim(hf, rope)
    scaling = _phi3_longrope(hf, rope, key)
    resid = hf.get("resid_pdrop") or 0.0
    if isinstance(resid, bool) or not isinstance(resid, (int, float)) or resid != 0:
        raise ValueError(f"from_hf: phi3 config resid_pdrop={resid!r} is not supported (only 0: the zoo's Llama "
                         f"has no residual dropout)")
    if hf.get("layer_types") is not None:
        raise ValueError("from_hf: phi3 config layer_types is not supported (transformers' Phi3 reads none and "
                         "slides in every layer when sliding_window is set)")
    # (the RoPE keys are read above: llama_config sees plain RoPE of that base)
    plain = {**hf, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
             "partial_rotary_factor": None}
    try:
        return llama_config(plain).replace(hf_fused_projections=True, rotary_dim=rotary_dim, rope_scaling=scaling)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith("from_hf") else f"from_hf: phi3 config: {e}") from None


def _phi3_rotary_dim(hf, rope):
    """The rotated channels of each head (None: all), as Phi3's RoPE: int(head_dim * partial_rotary_factor), the
    factor from the RoPE dict, else config.json's top-level key (Phi-4-mini's 0.75), else 1."""
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ValueError(f"from_hf: phi3 config partial_rotary_factor={partial!r} must be a number in (0, 1]")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    dim = int(head_dim * partial)
    if dim == head_dim:
        return None
    if dim < 2 or dim % 2:  # (transformers' frequencies would not match its rotated width)
        raise ValueError(f"from_hf: phi3 config partial_rotary_factor={partial!r} gives int(head_dim={head_dim} * "
                         f"factor) = {dim} rotary channels; only an even number >= 2 is supported")
    return dim


def _phi3_longrope(hf, rope, key):
    """The zoo's rope_scaling of a Phi-3 RoPE dict: None (rope_type "default") or longrope ("su" and "yarn" are
    its old names, as Phi3Config renames them) with short_factor / long_factor, factor and attention_factor from
    the dict and original_max_position_embeddings from config.json's top-level key (Phi3Config's, default 4096,
    which wins over the dict's). Another rope_type is refused, as Phi3Config refuses it."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind
    if kind == "default":
        return None
    if kind != "longrope":
        raise ValueError(f"from_hf: phi3 config {key} rope_type={kind!r} is not supported (Phi3: 'default' or "
                         f"'longrope')")
    scaling = {"rope_type": "longrope", "original_max_position_embeddings": hf["original_max_position_embeddings"]}
    for name in ("short_factor", "long_factor", "factor", "attention_factor"):
        if rope.get(name) is not None:
            scaling[name] = rope[name]
    return scaling


def _split_phi3(state, cfg):
    """Phi-3's fused projections -> the zoo's, in place: layers.{i}.self_attn.qkv_proj.weight
    [(n_head + 2 n_kv_head) * head_dim, d] (rows q, then k, then v, as Phi3Attention slices them) into
    q_proj / k_proj / v_proj, and mlp.gate_up_proj.weight [2 F, d] (rows gate, then up, as Phi3MLP's chunk)
    into gate_proj / up_proj."""
    q, kv, F = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    for i in range(cfg.n_layer):
        for fused, names, rows in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), (q, kv, kv)),
                                   ("mlp.gate_up_proj", ("gate_proj", "up_proj"), (F, F))):
            key = f"layers.{i}.{fused}.weight"
            if key not in state:
                continue  # (load_state_dict reports the missing q/k/v or gate/up weights)
            w = state.pop(key)
            if w.dim() != 2 or w.shape[0] != sum(rows):
                raise ValueError(f"from_hf: checkpoint does not match the phi3 config: {key} has shape "
                                 f"{tuple(w.shape)}, expected {sum(rows)} rows")
            prefix = f"layers.{i}.{fused.split('.')[0]}."
            for name, part in zip(names, w.split(list(rows))):
                state[f"{prefix}{name}.weight"] = part
    return state


# config.json defaults of the Gemma classes (transformers 5), for keys a file may leave out
_GEMMA_COMMON = dict(head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     attention_bias=False, use_bidirectional_attention=None)
_GEMMA2_COMMON = dict(_GEMMA_COMMON, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=256, sliding_window=4096, layer_types=None)
_GEMMA_DEFAULTS = {
    "gemma": dict(_GEMMA_COMMON, vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192),
    "gemma2": dict(_GEMMA2_COMMON, vocab_size=256000, max_position_embeddings=8192, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA2_COMMON, vocab_size=262208, max_position_embeddings=131072,
                        final_logit_softcapping=None, attn_logit_softcapping=None, sliding_window_pattern=6),
}
# transformers' ACT2FN names -> the zoo MLP's activation (GeGLU with the tanh or the erf gelu; SwiGLU)
_GEMMA_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu", "silu": "silu", "swish": "silu"}


def _positive(hf, key, family, optional=False):
    """hf[key] as a float > 0 (None allowed when optional), else a ValueError naming the key."""
    v = hf.get(key)
    if optional and v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"from_hf: {family} config {key}={v!r} must be a number > 0{' or null' if optional else ''}")
    return float(v)


def _gemma_activation(hf, family):
    """The MLP activation: GemmaConfig reads hidden_act (its legacy "gelu" means the tanh approximation, as
    transformers converts it), Gemma 2/3 hidden_activation."""
    key = "hidden_act" if family == "gemma" else "hidden_activation"
    act = hf.get(key)
    if family == "gemma" and act == "gelu":
        return "gelu_tanh"
    if act not in _GEMMA_ACTS:
        raise ValueError(f"from_hf: {family} config {key}={act!r} is not supported ({', '.join(_GEMMA_ACTS)})")
    return _GEMMA_ACTS[act]


def _gemma_layer_types(hf, family):
    """The sliding layers (a tuple of indices) per layer_types, or transformers' default when it is null:
    Gemma 2 slides in every other layer (0, 2, ...), Gemma 3 in all but every sliding_window_pattern-th."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        period = 2 if family == "gemma2" else _int_key(hf, "sliding_window_pattern", family)
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"from_hf: {family} config layer_types must list 'full_attention' / 'sliding_attention' "
                         f"for each of the {n} layers, got {types!r}")
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _gemma3_rope(hf):
    """(rope_theta, rope scaling dict, local theta) of a Gemma 3 text config, as Gemma3TextConfig reads it:
    rope_parameters holds one dict per layer type (a missing one: plain RoPE); the older keys fill in what
    it leaves out: rope_scaling updates the full-attention dict, rope_theta (default 1e6) and
    rope_local_base_freq (default 1e4) are the two bases. The sliding layers must use plain RoPE."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or not set(params) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"from_hf: gemma3_text config rope_parameters must hold one dict per layer type "
                         f"('full_attention', 'sliding_attention'), got {params!r}")
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    full.update(hf.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    if "type" in full and full.get("rope_type", full["type"]) != full["type"]:  # transformers keeps rope_type
        raise ValueError(f"from_hf: gemma3_text config rope_scaling / rope_parameters['full_attention'] give "
                         f"conflicting 'type' and 'rope_type': {full!r}")
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    for name, d in (("full_attention", full), ("sliding_attention", local)):
        if d.get("partial_rotary_factor", hf.get("partial_rotary_factor")) not in (None, 1, 1.0):
            raise ValueError(f"from_hf: gemma3_text config partial_rotary_factor ({name}) is not supported")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"from_hf: gemma3_text config rope_parameters['sliding_attention'] rope_type "
                         f"{local.get('rope_type', local.get('type'))!r} is not supported (only 'default')")
    kind = full.get("rope_type", full.get("type", "default"))
    if kind in ("llama3", "yarn"):
        full.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        if kind == "yarn" and full.get("factor") is None:
            full["factor"] = hf["max_position_embeddings"] / full["original_max_position_embeddings"]
    if kind == "yarn" and full.get("truncate", True) is not True:
        # transformers reads `truncate` from the outer per-layer-type dict, so a Gemma 3 model always runs
        # with truncate=True whatever the config says: refuse rather than pick one of the two meanings
        raise ValueError(f"from_hf: gemma3_text config yarn 'truncate'={full['truncate']!r} is not supported "
                         f"(transformers ignores it for Gemma 3 and truncates; only truncate=True matches)")
    return _positive(full, "rope_theta", "gemma3_text"), full, _positive(local, "rope_theta", "gemma3_text")


def _gemma_refusals(hf, family):
    """ValueError, naming the key, for what changes a Gemma model's outputs and the zoo does not do."""
    for key in _MOE_KEYS:
        if hf.get(key):
            raise ValueError(f"from_hf: {family} config {key}={hf[key]!r}: mixture-of-experts keys are not supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"from_hf: {family} config use_bidirectional_attention=True is not supported (the zoo's "
                         f"attention is causal)")
    if family == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        raise ValueError(f"from_hf: gemma3_text config attn_logit_softcapping={hf['attn_logit_softcapping']!r} is "
                         f"not supported: transformers' Gemma3Attention ignores it, so its meaning is ambiguous "
                         f"(set it to null)")


def _gemma2_options(hf, family, local_theta):
    """The ModelConfig fields of Gemma 2/3's block and attention: the sandwich norms, the attention scale,
    the soft-caps, the sliding windows (and Gemma 3's local RoPE base on those layers)."""
    layers = _gemma_layer_types(hf, family)
    window = _int_key(hf, "sliding_window", family) if layers else None
    return dict(post_norms=True, sliding_window=window, sliding_window_layers=layers if window else None,
                attn_scale=_positive(hf, "query_pre_attn_scalar", family) ** -0.5,
                attn_softcap=_positive(hf, "attn_logit_softcapping", family, optional=True),
                logit_softcap=_positive(hf, "final_logit_softcapping", family, optional=True),
                rope_local_theta=local_theta if window else None)


def gemma_config(hf):
    """The zoo ModelConfig of a Gemma / Gemma 2 / Gemma 3 text config.json (see the module docstring).
    Raises ValueError, naming the config key, for what the zoo cannot express."""
    family = hf["model_type"]
    hf = {**_GEMMA_DEFAULTS[family], **hf}
    _gemma_refusals(hf, family)
    if family == "gemma3_text":
        theta, rope, local_theta = _gemma3_rope(hf)
    else:
        (theta, rope), local_theta = _rope_parameters(hf), None
    scaling = _hf_rope_scaling(rope, family)
    bias = _bool_key(hf, "attention_bias", family)
    options = {} if family == "gemma" else _gemma2_options(hf, family, local_theta)
    return ModelConfig(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                       n_head=hf["num_attention_heads"], n_kv_head=hf["num_key_value_heads"],
                       n_embd=hf["hidden_size"], head_dim=hf["head_dim"], intermediate_size=hf["intermediate_size"],
                       block_size=hf["max_position_embeddings"], bias=False, qkv_bias=bias, o_bias=bias,
                       activation=_gemma_activation(hf, family), norm_offset=1.0, scale_embeddings=True,
                       qk_norm=family == "gemma3_text", **options,
                       dropout=float(hf.get("attention_dropout") or 0.0), norm_eps=hf["rms_norm_eps"],
                       rope_theta=float(theta), rope_scaling=scaling,
                       tie_embeddings=hf["tie_word_embeddings"], name=hf.get("_name_or_path", ""))


def _int_key(hf, key, family, low=1):
    v = hf.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"from_hf: {family} config {key}={v!r} must be an int >= {low}")
    return v


def _moe_options(hf, family):
    """The ModelConfig MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json (ValueError naming the
    key for what the zoo cannot express)."""
    n = hf["num_hidden_layers"]
    # transformers 5 writes num_local_experts for all three (num_experts is its alias); older Qwen files num_experts
    key = "num_local_experts" if hf.get("num_local_experts") is not None or family == "mixtral" else "num_experts"
    E = _int_key(hf, key, family)
    k = _int_key(hf, "num_experts_per_tok", family)
    if k > E:
        raise ValueError(f"from_hf: {family} config num_experts_per_tok={k} exceeds {key}={E}")
    out = dict(n_experts=E, n_experts_per_tok=k)
    coef = hf.get("router_aux_loss_coef", 0.001) or 0.0
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
        raise ValueError(f"from_hf: {family} config router_aux_loss_coef={coef!r} must be a number >= 0")
    # transformers adds coef * aux to the loss only when output_router_logits is set: the same loss here
    out["router_aux_loss_coef"] = float(coef) if _bool_key(hf, "output_router_logits", family) else 0.0
    if family == "mixtral":
        if hf.get("router_jitter_noise"):
            warnings.warn(f"from_hf: mixtral config router_jitter_noise={hf['router_jitter_noise']!r} is ignored "
                          f"(training-time multiplicative noise on the router input; not implemented)")
        if hf.get("layer_types") is not None:
            raise ValueError("from_hf: mixtral config layer_types is not supported (Mixtral slides in every layer)")
        return out
    if _bool_key(hf, "use_sliding_window", family):
        raise ValueError(f"from_hf: use_sliding_window=True is not supported for model_type {family!r} (the Qwen "
                         f"MoE families' per-layer window rules differ from Qwen2/3's)")
    out["moe_ffn_dim"] = _int_key(hf, "moe_intermediate_size", family)
    out["moe_renormalize"] = _bool_key(hf, "norm_topk_prob", family)
    if family == "qwen2_moe":
        out["moe_shared_ffn_dim"] = _int_key(hf, "shared_expert_intermediate_size", family)
    step, dense = _int_key(hf, "decoder_sparse_step", family), hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ValueError(f"from_hf: {family} config mlp_only_layers={dense!r} must list layer indices")
    sparse = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
    if not sparse:  # every layer dense: a plain Llama would do, but a zoo MoE config needs a sparse layer
        raise ValueError(f"from_hf: {family} config mlp_only_layers={dense!r} / decoder_sparse_step={step} leave "
                         f"no sparse layer")
    if len(sparse) < n:
        out["moe_layers"] = sparse
    return out


# per-expert checkpoint names (gate, up, down) of each family: stacked into gate_up_proj / down_proj
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                 "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                 "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
                 "deepseek_v2": ("gate_proj", "up_proj", "down_proj")}


# DeepseekV3Config's / DeepseekV2Config's defaults (transformers 5), for keys a config.json may leave out
_DEEPSEEK_DEFAULTS = {
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=None, n_shared_experts=1,
                        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
                        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
                        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_interleave=True, attention_bias=False, num_nextn_predict_layers=1),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, n_shared_experts=2,
                        n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=None, topk_group=None,
                        topk_method="greedy", num_experts_per_tok=None, first_k_dense_replace=0,
                        norm_topk_prob=False, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
}
# keys of the original DeepSeek code's config.json that transformers' DeepseekV3 / DeepseekV2 ignores, and their
# only value that means what it runs (anything else would load silently different: refused). DeepSeek-V2's own
# code renormalises the routing weights when norm_topk_prob is set, and reads no rope_interleave (its RoPE, as
# transformers' V2, always rotates interleaved pairs)
_DEEPSEEK_FIXED = {
    "deepseek_v3": dict(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1),
    "deepseek_v2": dict(scoring_func="softmax", moe_layer_freq=1, norm_topk_prob=False, rope_interleave=True),
}
_DEEPSEEK_WHY = {  # (family, key) -> what transformers runs instead; default: the family's router
    ("deepseek_v3", None): "DeepSeek-V3's router; transformers' DeepseekV3 ignores the key and runs that one",
    ("deepseek_v2", None): "DeepSeek-V2's softmax router; transformers' DeepseekV2 ignores the key and runs that one",
    ("deepseek_v2", "norm_topk_prob"): "transformers' DeepseekV2 ignores the key and never renormalises the routing "
                                       "weights; DeepSeek's own code would",
    ("deepseek_v2", "rope_interleave"): "transformers' DeepseekV2 ignores the key and always rotates interleaved "
                                        "pairs",
}
# DeepSeek-V2's topk_method values (transformers' DeepseekV2TopkRouter runs these two; anything else fails there)
_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def _deepseek_refusals(hf, fam):
    """ValueError, naming the key, for DeepSeek-V3 / V2 configs (fam: the model_type) transformers would run
    differently from the checkpoint's intent or not at all, and for what the zoo does not do."""
    for key, ok in _DEEPSEEK_FIXED[fam].items():
        if hf.get(key) not in (None, ok):
            why = _DEEPSEEK_WHY.get((fam, key), _DEEPSEEK_WHY[fam, None])
            raise ValueError(f"from_hf: {fam} config {key}={hf[key]!r} is not supported (only {ok!r}: {why})")
    if fam == "deepseek_v2" and hf.get("topk_method") not in _V2_TOPK_METHODS:
        raise ValueError(f"from_hf: {fam} config topk_method={hf.get('topk_method')!r} is not supported (only "
                         f"{', '.join(repr(m) for m in _V2_TOPK_METHODS)}, which transformers' DeepseekV2 runs)")
    if fam == "deepseek_v3" and hf.get("head_dim") not in (None, hf.get("qk_rope_head_dim", 64)):
        # (transformers' DeepseekV3 builds its RoPE frequencies from head_dim; the checkpoints have head_dim equal
        # to the rotary channels, which the zoo reads)
        raise ValueError(f"from_hf: {fam} config head_dim={hf['head_dim']!r} differs from qk_rope_head_dim="
                         f"{hf.get('qk_rope_head_dim', 64)!r} (transformers would rotate with other frequencies)")
    if hf.get("quantization_config") is not None:
        raise ValueError(f"from_hf: {fam} config quantization_config is not supported (quantized weights, e.g. the "
                         f"fp8 release: dequantize the checkpoint first)")
    if hf.get("hidden_act") != "silu":
        raise ValueError(f"from_hf: {fam} config hidden_act={hf.get('hidden_act')!r} is not supported (only 'silu')")
    # (q_a_proj / kv_a_proj_with_mqa / o_proj biases: MLAttention could hold them, but ModelConfig's qkv_bias /
    # o_bias and the parameter counts (llmkern.flops) mean the per-head q/k/v biases; no DeepSeek release has them)
    if _bool_key(hf, "attention_bias", fam):
        raise ValueError(f"from_hf: {fam} config attention_bias=True is not supported")
    if fam == "deepseek_v2" and _bool_key(hf, "mlp_bias", fam):
        raise ValueError(f"from_hf: {fam} config mlp_bias=True is not supported (biases on the dense MLPs and "
                         f"shared experts)")
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    if kv is not None and kv != heads:  # (transformers' MLA repeats kv_b_proj's heads: it cannot run either)
        raise ValueError(f"from_hf: {fam} config num_key_value_heads={kv!r} must equal num_attention_heads={heads} "
                         f"(MLA makes one key/value head per query head)")


def _deepseek_scale(rope, qk_head_dim, fam="deepseek_v3"):
    """The softmax scale: qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared when
    rope_parameters has a rope_type other than default and a nonzero mscale_all_dim (transformers'
    yarn_apply_mscale, the same in V2 and V3); None when that is plain qk_head_dim ** -0.5."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    m_all = rope.get("mscale_all_dim")
    if kind == "default" or not m_all:
        return None
    factor = _positive(rope, "factor", f"{fam} rope_parameters")
    return qk_head_dim ** -0.5 * yarn_mscale(factor, m_all) * yarn_mscale(factor, m_all)


def _deepseek_groups(moe, fam="deepseek_v3"):
    """The router's group limit, checked under config.json's names (ModelConfig checks the same as moe_n_group ...):
    n_group must split n_routed_experts into equal groups (V3: of >= 2, as groups rank by their top-2 scores),
    topk_group lie in 1..n_group, and the kept groups hold num_experts_per_tok experts."""
    E, k, G, Gk = moe["n_experts"], moe["n_experts_per_tok"], moe["moe_n_group"], moe["moe_topk_group"]
    least = 2 if fam == "deepseek_v3" else 1
    if E % G or E // G < least:
        raise ValueError(f"from_hf: {fam} config n_group={G} must divide n_routed_experts={E} into groups"
                         f"{' of >= 2 experts' if least == 2 else ''}")
    if Gk > G or k > Gk * (E // G):
        raise ValueError(f"from_hf: {fam} config topk_group={Gk} must be <= n_group={G} and keep "
                         f"num_experts_per_tok={k} experts (groups of {E // G})")


def _deepseek_router(hf, fam):
    """The router's ModelConfig fields: V3's sigmoid router (n_group / topk_group, norm_topk_prob), or V2's
    softmax router: topk_method "greedy" is one group (transformers then ignores n_group / topk_group),
    "group_limited_greedy" reads them; never renormalised (transformers' V2 ignores norm_topk_prob, refused
    when true)."""
    if fam == "deepseek_v3":
        return dict(moe_router="sigmoid", moe_renormalize=_bool_key(hf, "norm_topk_prob", fam),
                    moe_n_group=_int_key(hf, "n_group", fam), moe_topk_group=_int_key(hf, "topk_group", fam))
    if hf["topk_method"] == "greedy":
        return dict(moe_router="softmax_group", moe_renormalize=False, moe_n_group=1, moe_topk_group=1)
    return dict(moe_router="softmax_group", moe_renormalize=False, moe_n_group=_int_key(hf, "n_group", fam),
                moe_topk_group=_int_key(hf, "topk_group", fam))


def deepseek_config(hf):
    """The zoo ModelConfig of a DeepSeek-V3 or DeepSeek-V2 config.json (model_type "deepseek_v3" / "deepseek_v2";
    see the module docstring). Raises ValueError, naming the config key, for what the zoo cannot express."""
    fam = hf.get("model_type", "deepseek_v3")
    hf = {**_DEEPSEEK_DEFAULTS[fam], **hf}
    _deepseek_refusals(hf, fam)
    theta, rope = _rope_parameters(hf)
    scaling = _hf_rope_scaling(rope, fam)
    n, first = _int_key(hf, "num_hidden_layers", fam), _int_key(hf, "first_k_dense_replace", fam, low=0)
    if first >= n:
        raise ValueError(f"from_hf: {fam} config first_k_dense_replace={first} leaves no MoE layer of "
                         f"num_hidden_layers={n}")
    nope, rope_dim = _int_key(hf, "qk_nope_head_dim", fam, low=0), _int_key(hf, "qk_rope_head_dim", fam)
    q_rank = None if hf.get("q_lora_rank") is None else _int_key(hf, "q_lora_rank", fam)
    # (V2 always rotates interleaved pairs; V3 per rope_interleave)
    interleave = True if fam == "deepseek_v2" else _bool_key(hf, "rope_interleave", fam)
    mla = dict(kv_lora_rank=_int_key(hf, "kv_lora_rank", fam), q_lora_rank=q_rank, qk_rope_head_dim=rope_dim,
               v_head_dim=_int_key(hf, "v_head_dim", fam), rope_interleave=interleave,
               head_dim=nope + rope_dim, attn_scale=_deepseek_scale(rope, nope + rope_dim, fam))
    F = _int_key(hf, "moe_intermediate_size", fam)
    moe = dict(n_experts=_int_key(hf, "n_routed_experts", fam),
               n_experts_per_tok=_int_key(hf, "num_experts_per_tok", fam), moe_ffn_dim=F,
               # (ungated, one MLP; 0 is refused: transformers then saves zero-width shared-expert weights)
               moe_shared_ffn_dim=_int_key(hf, "n_shared_experts", fam) * F,
               moe_routed_scaling=_positive(hf, "routed_scaling_factor", fam),
               moe_layers=tuple(range(first, n)) if first else None, **_deepseek_router(hf, fam))
    _deepseek_groups(moe, fam)
    try:
        return ModelConfig(arch="llama", vocab_size=hf["vocab_size"], n_layer=n, n_head=hf["num_attention_heads"],
                           n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                           block_size=hf["max_position_embeddings"], bias=False, **mla, **moe,
                           dropout=float(hf.get("attention_dropout") or 0.0), norm_eps=hf["rms_norm_eps"],
                           rope_theta=float(theta), rope_scaling=scaling, tie_embeddings=hf["tie_word_embeddings"],
                           name=hf.get("_name_or_path", ""))
    except ValueError as e:  # (ModelConfig's checks name its fields: say which file they came from)
        raise ValueError(f"from_hf: {fam} config: {e}") from None


def _drop_mtp_layers(state, cfg, hf):
    """DeepSeek-V3's multi-token-prediction modules are stored as layers num_hidden_layers .. +
    num_nextn_predict_layers - 1; transformers' DeepseekV3ForCausalLM has no such layers and ignores their
    weights: so does this, with a warning (they serve speculative decoding only, never the logits)."""
    extra = [k for k in state if k.startswith("layers.") and int(k.split(".")[1]) >= cfg.n_layer]
    if not extra:
        return state
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 1)) or 0
    if isinstance(mtp, bool) or not isinstance(mtp, int) or \
            any(int(k.split(".")[1]) >= cfg.n_layer + mtp for k in extra):
        raise ValueError(f"from_hf: deepseek_v3 checkpoint holds layers past num_hidden_layers={cfg.n_layer} beyond "
                         f"num_nextn_predict_layers={mtp!r} (e.g. {extra[0]})")
    warnings.warn(f"from_hf: deepseek_v3: ignoring the {mtp} multi-token-prediction layer(s) "
                  f"(num_nextn_predict_layers; {len(extra)} tensors), as transformers does: the model predicts the "
                  f"next token only")
    extra = set(extra)
    return {k: v for k, v in state.items() if k not in extra}


def _stack_experts(state, cfg, family):
    """Per-expert weights -> the zoo's stacked experts, in place: layers.{i}.mlp.experts.{e}.<gate>.weight
    [F, d] and <up> into experts.gate_up_proj [E, 2F, d] (gate rows first), <down> [d, F] into
    experts.down_proj [E, d, F]. Mixtral's block_sparse_moe is renamed mlp (as transformers 5 does).
    A checkpoint already stacked (transformers 5's in-memory names) passes through."""
    for key in [k for k in state if ".block_sparse_moe." in k]:
        state[key.replace(".block_sparse_moe.", ".mlp.")] = state.pop(key)
    gate, up, down = _EXPERT_NAMES[family]
    for i in range(cfg.n_layer):
        p = f"layers.{i}.mlp.experts."
        if not cfg.layer_is_moe(i) or p + "gate_up_proj" in state:
            continue
        try:
            w = [[state.pop(f"{p}{e}.{name}.weight") for e in range(cfg.n_experts)] for name in (gate, up, down)]
        except KeyError as exc:
            raise ValueError(f"from_hf: checkpoint does not match model_type {family!r}: missing expert weight "
                             f"{exc}") from None
        state[p + "gate_up_proj"] = torch.cat([torch.stack(w[0]), torch.stack(w[1])], dim=1)  # [E, 2F, d]
        state[p + "down_proj"] = torch.stack(w[2])  # [E, d, F]
    return state


class _Reads(dict):
    """A state dict that records which keys were read (what is left over was not loaded)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def left(self):
        return [k for k in self if k not in self.read]


# GPT-2 keys a causal LM does not use and transformers' GPT2LMHeadModel skips too: the causal-mask buffers of
# old checkpoints, and cross-attention (add_cross_attention: only an encoder-decoder's encoder states use it)
_GPT2_UNUSED = (".attn.bias", ".attn.masked_bias")
_GPT2_CROSS = (".crossattention.", ".ln_cross_attn.")


def _gpt2_state(state, cfg):
    """The zoo GPT's state dict from a GPT2LMHeadModel checkpoint's; keys it does not use (other than
    _GPT2_UNUSED / _GPT2_CROSS, and a tied lm_head) are returned under their own names, so that
    load_state_dict reports them as unexpected (a config with fewer layers than the file: refused)."""
    state = _Reads(_strip(state, ("transformer.",)))
    out = {"wte.weight": state["wte.weight"], "wpe.weight": state["wpe.weight"],
           "ln_f.weight": state["ln_f.weight"], "ln_f.bias": state["ln_f.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    d = cfg.n_embd
    for i in range(cfg.n_layer):
        p, q = f"h.{i}.", f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[q + ln + ".weight"] = state[p + ln + ".weight"]
            out[q + ln + ".bias"] = state[p + ln + ".bias"]
        w, b = state[p + "attn.c_attn.weight"].t(), state[p + "attn.c_attn.bias"]  # Conv1D [in, 3d]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[q + f"attn.{name}.weight"] = w[j * d:(j + 1) * d]
            out[q + f"attn.{name}.bias"] = b[j * d:(j + 1) * d]
        out[q + "attn.o_proj.weight"] = state[p + "attn.c_proj.weight"].t()
        out[q + "attn.o_proj.bias"] = state[p + "attn.c_proj.bias"]
        out[q + "mlp.up_proj.weight"] = state[p + "mlp.c_fc.weight"].t()
        out[q + "mlp.up_proj.bias"] = state[p + "mlp.c_fc.bias"]
        out[q + "mlp.down_proj.weight"] = state[p + "mlp.c_proj.weight"].t()
        out[q + "mlp.down_proj.bias"] = state[p + "mlp.c_proj.bias"]
    for k in state.left():
        if not (k.endswith(_GPT2_UNUSED) or any(c in k for c in _GPT2_CROSS)
                or (cfg.tie_embeddings and k == "lm_head.weight")):
            out[k] = dict.__getitem__(state, k)  # (unexpected by the model: reported)
    return out


def _llama_state(state, cfg):
    state = _strip(state, ("model.",))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def _resolve_tie(cfg, state, emb):
    """transformers' from_pretrained rule for tie_word_embeddings=True: a checkpoint that holds the
    embedding and lm_head.weight with different values is loaded untied (with a warning); one that
    holds lm_head.weight only ties the embedding to it."""
    head = state.get("lm_head.weight")
    if not cfg.tie_embeddings or head is None:
        return cfg
    if emb not in state:
        state[emb] = head
        return cfg
    if state[emb].shape == head.shape and torch.equal(state[emb], head):
        return cfg
    warnings.warn(f"from_hf: config.json sets tie_word_embeddings but the checkpoint's lm_head.weight differs "
                  f"from {emb}: loading them untied, as transformers does")
    return cfg.replace(tie_embeddings=False)


def _parse_dtype(dtype, what="dtype"):
    """float32 / bfloat16 / float16 / float64 from a torch.dtype or its name ("bfloat16", "torch.bfloat16",
    "float16", "half", "float32", "float", ...); ValueError naming `what` otherwise."""
    d = dtype
    if isinstance(d, str):
        name = d.strip()
        name = name[len("torch."):] if name.startswith("torch.") else name
        d = getattr(torch, name, None) if name.isidentifier() else None
    if d not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):  # (no float8 compute)
        raise ValueError(f"from_hf: {what} must be a floating-point torch.dtype (not float8) or its name (e.g. "
                         f"torch.bfloat16, 'bfloat16', 'float16', 'float32'), or 'auto', got {dtype!r}")
    return d


def _auto_dtype(hf, state):
    """transformers' dtype="auto": config.json's dtype (transformers 5) or torch_dtype, else the dtype of the
    checkpoint's first floating-point weight (float32 without one)."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name is not None:
        return _parse_dtype(name, "config.json torch_dtype (dtype='auto')")
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def _generation_defaults(path, hf):
    """The checkpoint's generation defaults for generate (model.generation_config: eos / pad token ids and the
    knobs of GenerationDefaults), as transformers' from_pretrained reads them: generation_config.json when there
    is one (a key it lacks is None there too), else config.json (legacy generation keys there count, as in
    transformers). Values are checked where generate uses them."""
    import dataclasses

    from llmkern.generation import GenerationDefaults

    gen_file = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_file):
        with open(gen_file) as f:
            hf = json.load(f)
        if not isinstance(hf, dict):
            raise ValueError(f"{gen_file} must hold a JSON object, got {type(hf).__name__}")
    return GenerationDefaults(**{f.name: hf.get(f.name) for f in dataclasses.fields(GenerationDefaults)})


def _on_meta(cls, cfg, backend):
    """The zoo model of `cfg` on the meta device: no memory and no random init (its weights are the checkpoint's)."""
    with torch.device("meta"):
        return cls(cfg, backend=backend)


def _own_tensor(t, dtype, device):
    """t in `dtype` on `device`, contiguous, in memory of its own: one copy, the cast's (or a clone when no cast is
    needed). Never the checkpoint's tensor itself: safetensors maps the file, so a parameter on those pages would
    change, or crash the process (SIGBUS), when the file is rewritten in place; and a row slice of a fused tensor
    (Phi-3's qkv_proj) would share its storage with the other slices."""
    out = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)
    return t.clone(memory_format=torch.contiguous_format) if out is t else out


def _assign_state(model, state, cfg, dtype, device):
    """`model` (on the meta device) with the checkpoint tensors of `state` as its parameters and buffers, each cast
    once to the dtype the model cast to `dtype` gives it (float32 for None, as a freshly built model; DeepSeek's
    routers stay float32) on `device` (None: the default device), its non-persistent buffers computed there and a
    tied LM head tied. `state` is emptied as it goes (a source tensor is dropped once converted). ValueError for
    keys missing from the checkpoint or left over."""
    model = model.to(dtype=dtype or torch.float32)  # (on meta: only the dtypes the parameters will have)
    targets = model.state_dict(keep_vars=True)
    device = torch.device(device) if device is not None else torch.get_default_device()
    converted = {}
    for key in list(state):
        t, like = state.pop(key), targets.get(key)
        converted[key] = t if like is None else _own_tensor(t, like.dtype, device)
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if not k.endswith(_GPT2_UNUSED)]  # (old checkpoints' mask buffers)
    if missing or unexpected:
        raise ValueError(f"from_hf: checkpoint does not match the model: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")
    return model.init_buffers(device)  # (load_state_dict tied the head to the embedding's new parameter)


def from_hf(path, backend="llmkern", dtype=None, device=None):
    """A zoo model with the weights of the local Hugging Face checkpoint directory `path` (config.json
    and safetensors weights), in eval mode.

    model_type "gpt2" gives a GPT; "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
    "qwen3_moe", "granite", "olmo2", "phi3", "gemma", "gemma2", "gemma3_text", "deepseek_v3" and "deepseek_v2"
    give a Llama whose config carries the family's options (Mistral's sliding window, Qwen2's q/k/v biases and
    per-layer sliding windows, Phi-3's fused projections split into the zoo's, Qwen3's qk-norm and head_dim, the
    MoE families' experts, Granite's multipliers, OLMo 2's post-norms and full-width q/k norms, Gemma's GeGLU,
    norms, scales and soft-caps, DeepSeek's latent attention and V3's sigmoid / V2's softmax router; see the
    module docstring); "gpt_neox" (Pythia) and "phi" (Phi-1, 1.5, 2) give a NeoX (llmkern.models.neox: parallel
    residual blocks, LayerNorms, partial RoPE, Phi's head bias). The logits equal those of transformers'
    *ForCausalLM on the same checkpoint. Unsupported configurations raise ValueError naming the config key.
    dtype/device: the model's (default float32, the default device); it is built on the meta device (no random
    init, no float32 copy of a 16-bit model) and each checkpoint tensor is cast once to dtype on device and becomes
    the parameter (the RoPE frequencies are computed there, float32; DeepSeek's routers stay float32); dtype is a
    floating torch.dtype, its name ("bfloat16", "torch.float16", ...) or "auto" (transformers': config.json's
    dtype / torch_dtype, else the checkpoint weights' dtype).
    model.generation_config (llmkern.generation.GenerationDefaults) holds the checkpoint's eos_token_id,
    pad_token_id and the generation knobs generate defaults to (repetition_penalty, temperature, top_p, ...:
    generation_config.json, else config.json), as transformers' generate."""
    if not isinstance(path, (str, os.PathLike)):  # (os.path.join's TypeError did not name it)
        raise TypeError(f"from_hf: path must be a checkpoint directory (a str or os.PathLike), got "
                        f"{type(path).__name__}")
    check_backend(backend)  # (before reading the checkpoint)
    if device is not None:  # (a bad name raised torch's device-string error after loading, naming no argument)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"from_hf: device must be None or a torch device, got {device!r} ({e})") from None
    if dtype is not None and not (isinstance(dtype, str) and dtype == "auto"):
        dtype = _parse_dtype(dtype)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"from_hf: {cfg_file!r} not found (give a local checkpoint directory)")
    with open(cfg_file) as f:
        hf = json.load(f)
    mtype = hf.get("model_type")
    if hf.get("quantization_config") is not None:  # (the zoo's layers hold float weights: the codes would not load)
        quant = hf["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ValueError(f"from_hf: config quantization_config (quant_method={method!r}) is not supported: the zoo "
                         f"loads float weights (dequantize the checkpoint first; for 4-bit NF4 base layers load the "
                         f"float checkpoint and call llmkern.peft.quantize_nf4)")
    if mtype == "gpt2":
        cfg = gpt2_config(hf)
        state = _strip(_load_state(path), ("transformer.",))
        cfg = _resolve_tie(cfg, state, "wte.weight")
        try:
            model, state = _on_meta(GPT, cfg, backend), _gpt2_state(state, cfg)
        except KeyError as e:
            raise ValueError(f"from_hf: checkpoint does not match the model: missing {e}") from None
    elif mtype in LLAMA_FAMILY or mtype in PHI3_FAMILY or mtype in GEMMA_FAMILY or mtype in DEEPSEEK_FAMILY:
        cfg = llama_config(hf) if mtype in LLAMA_FAMILY else phi3_config(hf) if mtype in PHI3_FAMILY else \
            gemma_config(hf) if mtype in GEMMA_FAMILY else deepseek_config(hf)
        cfg = cfg.replace(pad_token_id=_padding_idx({"pad_token_id": _DEFAULT_PAD.get(mtype), **hf}))
        state = _strip(_load_state(path), ("model.",))
        if mtype in PHI3_FAMILY:
            state = _split_phi3(state, cfg)
        cfg = _resolve_tie(cfg, state, "embed_tokens.weight")
        if mtype == "deepseek_v3":  # (DeepSeek-V2 has no multi-token prediction)
            state = _drop_mtp_layers(state, cfg, hf)
        if mtype in MOE_FAMILY or mtype in DEEPSEEK_FAMILY:
            state = _stack_experts(state, cfg, mtype)
        model, state = _on_meta(Llama, cfg, backend), _llama_state(state, cfg)
    elif mtype in NEOX_FAMILY:  # (neox.py: the config and the checkpoint's names)
        cfg, state = neox_state(_load_state(path), neox_config(hf))
        model = _on_meta(NeoX, cfg, backend)
    else:
        families = LLAMA_FAMILY + PHI3_FAMILY + GEMMA_FAMILY + DEEPSEEK_FAMILY + NEOX_FAMILY
        raise ValueError(f"from_hf: model_type {mtype!r} is not supported (gpt2, {', '.join(families)})")
    if isinstance(dtype, str):  # "auto"
        dtype = _auto_dtype(hf, state)
    if cfg.tie_embeddings:  # load the shared matrix once, through the embedding
        state.pop("lm_head.weight", None)
    model = _assign_state(model, state, cfg, dtype, device)
    model.generation_config = _generation_defaults(path, hf)  # (generate's default eos / pad, as transformers')
    return model.eval()
