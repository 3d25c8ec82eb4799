"""Parameter counts, FLOPs per token, MFU/HFU and the dense peak table — the seed deck's formulas.

Parameters of a decoder-only Transformer (seed deck, "Parameter concentration"):
    token embedding  V·d            position embedding  T·d
    attention        L·(3·d·d_h·H + (d_h·H)·d) = 4·L·d²         (weights)
    FFN              L·((d·4d + 4d) + (4d·d + d)) ≈ 8·L·d²       (weights and biases)
For gpt3-175b this gives 617M, 25M, 57,982M and 115,970M (the seed's table; shares 0.35%, 0.01%,
33.21%, 66.42%). `param_counts` also lists what the four columns leave out (attention biases,
LayerNorms, an untied lm_head) so that "total" equals the model's parameter count exactly:
174,604M for gpt3-175b (the seed's total reads 174,597M, 2.2M above the sum of its columns).

FLOPs per token for training, forward + backward = (1 + 2) × forward:
    "seed"  6·N + 6·L·T·d        forward 2N + 2·L·T·d (seed deck, "Computation concentration")
    "palm"  6·N + 12·L·H·Q·T     PaLM appendix B / nanoGPT's estimate_mfu (H·Q = attention width)
N is the number of parameters that take part in matmuls: `matmul_params(config)` (all parameters
but the position embedding and, when the lm_head is untied, the input embedding — a lookup). For a
sparse mixture of experts (config.n_experts > 0) N counts the active parameters, those one token
runs through: k of the E experts per MoE layer, the router, the rest of the model
(param_counts(...)["active"]; "total" counts every expert: Mixtral 8x7B 46.7B total, 12.9B active). For
GPT-2 this is nanoGPT's N (get_num_params(): all but wpe). llm.c's gpt2_estimate_mfu uses the seed's
formula, 6N + 6·L·T·d, with N = every parameter (wpe too: +6·T·d per token, 0.6% for gpt2 at T=1024).
The seed's N ≈ 12Ld² leaves out the tied lm_head (2·V·d per token forward), which N here counts.
Causal masking: the seed's attention term 6·L·T·d is PaLM's 12·L·T·d halved — a causal query
attends to T/2 keys on average; PaLM and nanoGPT count the full T×T score matrix (no halving).
MFU = observed tokens/s × FLOPs per token / peak FLOP/s. HFU counts the FLOPs the hardware really
does: with full activation recomputation the forward runs twice, (1 + 1 + 2) × forward.
"""
import dataclasses
import numbers
import re
import warnings

import torch

from llmkern.ops._checks import bool_arg

# Dense peak FLOP/s (no sparsity: half the datasheets' starred numbers). A100 SXM/PCIe; H100 SXM;
# H100 PCIe; H100 NVL and H200 NVL (datasheets: bf16 1,671, fp8 3,341, tf32 835 sparse; fp32 60);
# H200 SXM (same SMs and clocks as H100 SXM).
_NVL = {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60e12}
PEAK_FLOPS = {
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "h100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1979e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100-pcie": {"bf16": 756.5e12, "fp16": 756.5e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51.2e12},
    "h100-nvl": dict(_NVL),
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1979e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h200-nvl": dict(_NVL),
}
PRECISIONS = ("bf16", "fp16", "fp8", "tf32", "fp32")
CONVENTIONS = ("seed", "palm")


def _number(fn, name, v, positive=False):
    """v as a finite Python number >= 0 (> 0 when positive; an int stays an int: a numpy int32 would wrap in the
    products), a 0-dim real tensor read as one; else ValueError naming it (a string or None raised a bare
    comparison TypeError, inf gave inf FLOPs, True counted as 1)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype != torch.bool and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < float("inf") or (positive and v == 0):
        raise ValueError(f"{fn}: {name} must be a finite number {'>' if positive else '>='} 0, got {v!r}")
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def _cfg(config):
    from llmkern.models.configs import get_config

    return get_config(config)  # (a ModelConfig or NeoXConfig as given; a name looked up)


def param_counts(config):
    """Parameters by component (dict of ints) for a zoo config or its name.

    Keys: token_embedding, position_embedding, attention (weights, the seed's 4Ld² for MHA),
    ffn (weights + biases; every expert of a mixture of experts, and its shared expert), attention_bias
    (q/k/v and o_proj biases, as the config has them), norm (qk-norm gains included), lm_head (0 when
    tied), router (MoE routers and shared-expert gates; 0 for dense models), total (the sum of those),
    experts (the routed experts' share of ffn), active (the parameters one token uses: total less the
    E - k experts it is not routed to in each MoE layer; total for dense models), and
    shares: each of the first four as a fraction of total. A NeoXConfig (GPT-NeoX / Pythia, Phi): the same keys,
    LayerNorm gains and biases in norm, Phi's LM head bias in lm_head.
    """
    c = _cfg(config)
    if c.arch == "neox":
        return _with_totals(_neox_counts(c))
    L, d, V, T = c.n_layer, c.n_embd, c.vocab_size, c.block_size
    attn_w = L * (d * c.attn_dim + 2 * d * c.n_kv_head * c.head_dim + c.attn_dim * d)
    if c.kv_lora_rank:
        attn_w = L * _mla_weights(c)
    qkv_bias, o_bias, mlp_bias = c.biases  # (Llama-family options: Qwen2 biases q/k/v only)
    attn_b = L * ((c.attn_dim + 2 * c.n_kv_head * c.head_dim if qkv_bias else 0) + (d if o_bias else 0))
    f = c.intermediate_size
    router = experts = inactive = 0
    if c.arch == "gpt":
        ffn = L * (d * f + f + f * d + d) if mlp_bias else L * 2 * d * f
        norm = (2 * L + 1) * d * (2 if c.bias else 1)
        pos = T * d
    else:
        def swiglu(width):  # gate, up, down (+ their biases)
            return 3 * d * width + ((2 * width + d) if mlp_bias else 0)

        L_moe = c.n_moe_layers  # (0 for a dense model)
        ffn = (L - L_moe) * swiglu(f)
        if L_moe:
            E, k, F = c.n_experts, c.n_experts_per_tok, c.moe_ffn_dim
            experts = L_moe * E * 3 * d * F  # the routed experts (no biases)
            inactive = L_moe * (E - k) * 3 * d * F  # the experts a token does not use
            shared = L_moe * swiglu(c.moe_shared_ffn_dim) if c.moe_shared_ffn_dim else 0
            ffn += experts + shared
            gated = c.moe_shared_ffn_dim and c.moe_router == "softmax"  # (DeepSeek's shared experts: no gate)
            router = L_moe * d * (E + (1 if gated else 0))  # + Qwen2-MoE's shared expert gate
        norm = d + (2 * L * d if c.pre_norms else 0)  # the final norm, the blocks' input norms (not OLMo-2's)
        if c.qk_norm:  # + Qwen3's per-head q_norm/k_norm gains, or OLMo-2's over all heads' channels
            norm += L * (c.attn_dim + c.n_kv_head * c.head_dim if c.qk_norm_full else 2 * c.head_dim)
        norm += 2 * L * d if c.post_norms else 0  # Gemma 2/3's (OLMo-2's) norms after attention and the MLP
        norm += L * (c.kv_lora_rank + (c.q_lora_rank or 0))  # MLA's kv_a_layernorm and q_a_layernorm
        pos = 0
    out = dict(token_embedding=V * d, position_embedding=pos, attention=attn_w, ffn=ffn,
               attention_bias=attn_b, norm=norm, lm_head=0 if c.tie_embeddings else V * d, router=router)
    return _with_totals(out, experts, inactive)


def _with_totals(out, experts=0, inactive=0):
    """param_counts' dict: the components `out`, then total, experts, active and shares."""
    out["total"] = sum(out.values())
    out["experts"] = experts
    out["active"] = out["total"] - inactive
    out["shares"] = {k: out[k] / out["total"] for k in ("token_embedding", "position_embedding", "attention", "ffn")}
    return out


def _neox_counts(c):
    """param_counts' components for a NeoXConfig (GPT-NeoX / Phi). The parallel residual changes no weight; Phi's
    shared norm is one LayerNorm per block instead of two; partial RoPE has no parameters; Phi's LM head bias
    counts with the head (a tied head keeps its bias)."""
    L, d, V, f = c.n_layer, c.n_embd, c.vocab_size, c.intermediate_size
    kv = c.n_kv_head * c.head_dim
    layer_norms = 1 if c.shared_norm else 2
    norm = (L * layer_norms + 1) * 2 * d  # LayerNorms with gain and bias, the final one included
    if c.qk_layernorm:  # per-head q / k LayerNorms: head_dim gains and biases each
        norm += L * 2 * 2 * c.head_dim
    head = (0 if c.tie_embeddings else V * d) + (V if c.lm_head_bias else 0)
    return dict(token_embedding=V * d, position_embedding=0,
                attention=L * (d * c.attn_dim + 2 * d * kv + c.attn_dim * d),
                ffn=L * (d * f + f + f * d + d),  # (up / down with biases)
                attention_bias=L * (c.attn_dim + 2 * kv + d) if c.attn_bias else 0, norm=norm, lm_head=head,
                router=0)


def _mla_weights(c):
    """One layer's multi-head latent attention weights: q (q_proj, or q_a_proj + q_b_proj), kv_a_proj_with_mqa
    (the latent and the shared rotary key), kv_b_proj (per head: the keys' other channels and the values),
    o_proj. (Biases are refused with MLA; its norms are counted with the norms.)"""
    d, H, D, Dv, R, Dr = c.n_embd, c.n_head, c.head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
    q = d * H * D if c.q_lora_rank is None else d * c.q_lora_rank + c.q_lora_rank * H * D
    return q + d * (R + Dr) + R * H * (D - Dr + Dv) + H * Dv * d


def matmul_params(config):
    """N for the FLOP formulas: parameters used in matmuls (the token embedding counts when it is
    the tied output head; the position embedding and an input-only embedding are lookups). For a
    mixture of experts, the *active* parameters: a token runs k of the E experts (and the router)."""
    c = _cfg(config)
    p = param_counts(c)
    n = p["active"] - p["position_embedding"]
    if not c.tie_embeddings:  # (the tie, not lm_head's count: a tied Phi head's bias alone is counted there)
        n -= p["token_embedding"]
    return n


def flops_per_token(n_params, n_layers, seq_len, attn_dim, convention="seed", recompute=False):
    """Training FLOPs per token (forward + backward).

    convention="seed": 6·N + 6·L·T·d (the seed deck); "palm": 6·N + 12·L·T·attn_dim (PaLM, nanoGPT).
    attn_dim is d (= H·d_h) for the seed formula and H·Q for PaLM's. recompute=True counts a
    second forward of everything (full activation checkpointing of the whole model: 8N + 8·L·T·d with
    the seed's formula), i.e. hardware FLOPs for HFU; the zoo recomputes its blocks only
    (model_flops_per_token(recompute=True) counts that).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"flops_per_token: convention must be one of {CONVENTIONS}, got {convention!r}")
    n_params, n_layers, seq_len, attn_dim = (_number("flops_per_token", name, v) for name, v in (
        ("n_params", n_params), ("n_layers", n_layers), ("seq_len", seq_len), ("attn_dim", attn_dim)))
    recompute = bool_arg("flops_per_token: recompute", recompute)  # (bool() read "False" as True)
    passes = 4 if recompute else 3  # forward 1 + backward 2 (+ recomputed forward 1)
    attn_fwd = 2 * n_layers * seq_len * attn_dim if convention == "seed" else 4 * n_layers * seq_len * attn_dim
    return passes * (2 * n_params + attn_fwd)


def model_flops_per_token(config, seq_len=None, convention="seed", recompute=False):
    """flops_per_token for a zoo config (N = matmul_params, T = seq_len or block_size). recompute=True: the
    hardware FLOPs of the zoo's activation recomputation (gradient_checkpointing_enable), which runs the
    transformer blocks' forward a second time but not the LM head's (V·d per token, tied or not): the
    model's FLOPs + 2·(N - V·d) + the attention forward, for HFU (mfu() of these FLOPs). With PaLM's
    attention term this is Megatron-LM's full-recomputation count (Korthikanti et al.). torch's
    non-reentrant checkpoint stops recomputing once every saved tensor is back, so each block's last
    projection (whose output no gradient needs) is not run again: the hardware does a little less."""
    c = _cfg(config)
    T = c.block_size if seq_len is None else seq_len  # (0 is 0 tokens of context, not block_size)
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 0:
        raise ValueError(f"model_flops_per_token: seq_len must be None or an int >= 0, got {seq_len!r}")
    T = int(T)  # (a numpy int32 would wrap in the products below)
    recompute = bool_arg("model_flops_per_token: recompute", recompute)
    frac = attention_fraction(c, T)  # the attention term's T shrinks for sliding-window layers' shorter rows
    T_attn = T if frac == 1.0 else T * frac
    # PaLM's 4·T·H·Q per layer forward is q·k (2·T·H·D) plus p·v (2·T·H·Dv): their mean for MLA (Dv != D)
    d = c.n_embd if convention == "seed" else c.attn_dim if c.out_dim == c.attn_dim else (c.attn_dim + c.out_dim) / 2
    n = matmul_params(c)
    model = flops_per_token(n, c.n_layer, T_attn, d, convention)
    if not recompute:
        return model
    blocks_fwd = flops_per_token(n - c.vocab_size * c.n_embd, c.n_layer, T_attn, d, convention) / 3
    return model + blocks_fwd


def attention_fraction(config, seq_len):
    """The causal attention work a zoo config does at seq_len tokens, as a fraction of full causal attention's,
    averaged over the layers: 1 without a sliding window; a layer with window W has its query i (1-based) see
    min(i, W) keys, sum min(i, W) / (T (T + 1) / 2) of the full causal work (Mistral-7B, W = 4096, at 32768
    tokens: 0.23). The attention terms of the FLOP formulas scale by it."""
    c = _cfg(config)
    # (2.5 was truncated to 2 tokens, -1 taken as a sequence shorter than the window)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 0:
        raise ValueError(f"attention_fraction: seq_len must be an int >= 0, got {seq_len!r}")
    windowed = c.n_layer if c.sliding_window_layers is None else len(c.sliding_window_layers)
    return window_fraction(c.n_layer, c.sliding_window, windowed, int(seq_len))


def window_fraction(n_layer, window, n_windowed, T):
    """attention_fraction's arithmetic: n_windowed of n_layer layers with window `window` (None: none)."""
    if window is not None and not (window >= 1 and 0 <= n_windowed <= n_layer):
        raise ValueError(f"window_fraction: window must be >= 1 and n_windowed in 0..{n_layer}, got window={window!r}, "
                         f"n_windowed={n_windowed!r}")
    if window is None or T <= window:
        return 1.0
    window, T = int(window), int(T)
    kept = (window * (window + 1) / 2 + (T - window) * window) / (T * (T + 1) / 2)
    return (n_layer - n_windowed + n_windowed * kept) / n_layer


def mfu(tokens_per_second, flops_per_token, peak_flops):
    """Model FLOPs utilisation: tokens/s × FLOPs/token ÷ peak FLOP/s. `peak_flops` is a number or
    a device name ("a100", "h100", ...; bf16 peak) or a (device, precision) pair."""
    if isinstance(peak_flops, str):
        peak_flops = peak(peak_flops)
    elif isinstance(peak_flops, tuple):
        if not 1 <= len(peak_flops) <= 2:  # (() was the A100's bf16 peak, a longer one peak()'s TypeError)
            raise ValueError(f"mfu: peak_flops as a tuple must be (device,) or (device, precision), got {peak_flops!r}")
        peak_flops = peak(*peak_flops)
    peak_flops = _number("mfu", "peak_flops", peak_flops, positive=True)  # (NaN fails too)
    tokens_per_second, flops_per_token = (_number("mfu", name, v) for name, v in (
        ("tokens_per_second", tokens_per_second), ("flops_per_token", flops_per_token)))
    return tokens_per_second * flops_per_token / peak_flops


def hfu(tokens_per_second, flops_per_token, peak_flops, recompute=True):
    """Hardware FLOPs utilisation: MFU with the recomputed forward counted (× 4/3 when the whole model's
    forward runs again, LM head included; equal to MFU without it). `flops_per_token` is the model's (3
    passes). For the zoo's recomputation (gradient_checkpointing_enable: the blocks run again, the LM head
    does not, Megatron-LM's count) use mfu(tokens_per_second, model_flops_per_token(cfg, recompute=True),
    peak) instead, as the mfu suite does: this rule is 1-8% higher there (GPT-2: 7.8%)."""
    recompute = bool_arg("hfu: recompute", recompute)
    flops_per_token = _number("hfu", "flops_per_token", flops_per_token)
    return mfu(tokens_per_second, flops_per_token * (4 / 3 if recompute else 1), peak_flops)


def _precision(dtype):
    if isinstance(dtype, str):
        p = dtype.lower().replace("float", "fp").replace("bfloat16", "bf16").replace("half", "fp16")
        p = {"fp16": "fp16", "bfp16": "bf16", "bf16": "bf16", "fp32": "fp32", "tf32": "tf32", "fp8": "fp8"}.get(p, p)
    elif dtype in (torch.bfloat16,):
        p = "bf16"
    elif dtype in (torch.float16,):
        p = "fp16"
    elif dtype in (torch.float32,):
        p = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    elif "float8" in str(dtype):
        p = "fp8"
    else:
        p = str(dtype)
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or a torch dtype, got {dtype!r}")
    return p


def peak(device="a100", dtype="bf16"):
    """Dense peak FLOP/s of a device name in PEAK_FLOPS at a precision (name or torch dtype)."""
    name = str(device).lower()
    if name not in PEAK_FLOPS:
        raise ValueError(f"peak: unknown device {device!r}; known: {sorted(PEAK_FLOPS)}")
    p = _precision(dtype)
    if p not in PEAK_FLOPS[name]:
        raise ValueError(f"peak: {name} has no dense {p} peak")
    return PEAK_FLOPS[name][p]


def device_name(name):
    """The PEAK_FLOPS key for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3' -> 'h100'), or None."""
    n = name.upper()
    if "H200" in n:  # GH200 (NVL2 too) has the H100 SXM's peaks, as the H200 SXM
        return "h200-nvl" if "NVL" in n and "GH200" not in n else "h200"
    if "H100" in n:
        return "h100-pcie" if "PCIE" in n else "h100-nvl" if "NVL" in n else "h100"
    if re.search(r"\bA100\b", n):  # (a whole token: the RTX A1000 is not an A100)
        return "a100"
    return None


_WARNED = set()


def detect_device(device=None):
    """The PEAK_FLOPS key of `device` (default: current CUDA device), None on CPU or unknown cards."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:  # (torch's device-string error named no argument)
            raise ValueError(f"detect_device: device must be None or a torch device, got {device!r} ({e})") from None
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    gpu = torch.cuda.get_device_name(device)
    key = device_name(gpu)
    if key is None and gpu not in _WARNED:
        _WARNED.add(gpu)
        warnings.warn(f"llmkern.flops: unknown GPU {gpu!r}: no dense peak in PEAK_FLOPS, so MFU against "
                      f"this card is not reported (only against the A100's peak)", stacklevel=2)
    return key


def device_peak(device=None, dtype="bf16"):
    """Dense peak FLOP/s of `device` at `dtype`, None where unknown (CPU, other cards)."""
    name = detect_device(device)
    if name is None:
        return None
    try:
        return peak(name, dtype)
    except ValueError:
        return None


@dataclasses.dataclass
class Utilization:
    tokens_per_second: float
    flops_per_token: float
    tflops: float                 # achieved model TFLOP/s
    mfu_a100: float               # against the A100 peak at the same precision
    mfu_device: float = None      # against the detected device's peak (None on CPU/unknown)
    device: str = None


def utilization(tokens_per_second, flops_per_token, dtype="bf16", device=None):
    """MFU against the A100 peak and against the detected device's peak, in one record."""
    p = _precision(dtype)
    a100 = PEAK_FLOPS["a100"].get(p, PEAK_FLOPS["a100"]["bf16"])  # fp8, which the A100 lacks: its bf16 peak
    dev_peak = device_peak(device, p)
    return Utilization(tokens_per_second, flops_per_token, tokens_per_second * flops_per_token / 1e12,
                       mfu(tokens_per_second, flops_per_token, a100),
                       None if dev_peak is None else mfu(tokens_per_second, flops_per_token, dev_peak),
                       detect_device(device))
