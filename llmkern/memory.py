"""Training memory per GPU: model states (ZeRO) and saved activations (Korthikanti et al.) — the seed deck's
"175B: 350GB in fp16, ~3 x 350GB for training; parameter, gradient, optimizer states, activation".

Model states (ZeRO, Rajbhandari et al. 2019, arXiv 1910.02054, §3.1 and Figure 1), Ψ parameters:
    mixed precision (bf16/fp16) Adam   2Ψ params + 2Ψ grads + KΨ optimizer, K = 12 (fp32 master 4, momentum 4,
                                       variance 4): 16Ψ in all. SGD with momentum K = 8; optimizer=None K = 0.
    fp32 Adam                          4Ψ + 4Ψ + 8Ψ (no master copy: the parameters are fp32 already).
    ZeRO stage 1 (P_os) divides the optimizer states by dp, stage 2 (P_os+g) the gradients too, stage 3
    (P_os+g+p) the parameters too: Ψ = 7.5B, dp = 64 gives 120, 31.4, 16.6 and 1.9 GB (the paper's Figure 1).
    gpt3-175b: 2 x 174,604M = 349.2 GB of fp16 parameters (the deck's 350 GB); 16Ψ = 2.79 TB of model states
    (8 x 350 GB). The deck's "~3 x 350 GB" is parameters + gradients + ONE 16-bit state (SGD with momentum, no
    master copy); with the two Adam states it names, in 16-bit and without a master copy, it is 4 x 350 GB.
Tensor and pipeline parallelism (Megatron-LM's layout; the approximation is explicit here): a pipeline stage
holds n_layer / pp layers (pp must divide n_layer). In a layer, tp shards every weight and the biases of the
column-parallel projections (q/k/v, up/gate); norm gains and the row-parallel biases (o_proj, down_proj) are
replicated. The token embedding is vocabulary-parallel (V·d / tp) on the first stage, the position embedding
(GPT) replicated there; the final norm and the output head (V·d / tp) sit on the last stage — with tied
embeddings and pp > 1 the last stage keeps its own copy of the word embedding, as Megatron-LM does. With
pp = 1 the one stage holds all of it (a tied head counted once). ZeRO then shards each GPU's own states over
dp (elements rounded up: ceil(Ψ_gpu / dp)).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
arXiv 2205.05198, §4 and Table 2), bytes per transformer layer, s tokens, micro-batch b, width h, a heads,
16-bit activations, 1-byte dropout masks, GPT blocks (LayerNorm, 4h GELU MLP, dropout):
    no parallelism                      s·b·h·(34 + 5·a·s/h)
    tensor parallel t                   s·b·h·(10 + 24/t + 5·a·s/(h·t))
    tensor + sequence parallel          s·b·h·(34/t + 5·a·s/(h·t))
    selective recompute                 drops the 5·a·s/h term (s·b·h·(10 + 24/t), or 34/t with sequence parallel)
    full recompute                      s·b·h·2 (the layer's input; / t with sequence parallel, where the
                                        layer input is sharded along the sequence)
The 34: attention 11 (QKV input 2, Q and K 4, V 2, o_proj input 2, dropout mask 1) + 5·a·s/h (softmax 2,
its dropout mask 1, the dropped scores 2), MLP 19 (input 2, GELU input 8, its output 8, dropout mask 1),
two LayerNorm inputs 4. The "10" are the tensors outside the tensor-parallel region (the norms' inputs, the
two dropout masks, the inputs of the QKV and up projections), which sequence parallelism shards too.
A fused / flash attention kernel never stores the s×s scores (5·a·s/h dropped, its dropout mask regenerated
from a seed) and keeps a per-row softmax statistic instead: the fp32 log-sum-exp, 4·a·s·b/t bytes. Generalised
here term by term (`layer_activation_terms`): q_w = n_head·head_dim, kv = n_kv_head·head_dim, f =
intermediate_size; the GPT terms with q_w = kv = h, f = 4h sum to exactly Table 2. Without dropout
(config.dropout == 0, the zoo's default) the two hidden-size masks are gone: 32 instead of 34.
Llama-style blocks (RMSNorm, RoPE, SwiGLU, GQA, no dropout), derived from what the implementations save:
    impl="fused" (Megatron-core / llmkern: a norm keeps its input and the fp32 1/rms per row; RoPE's output
    is what attention keeps; SwiGLU keeps gate and up and recomputes silu):
        norms' inputs 2·2 + QKV input 2 + up/gate input 2 + q 2·q_w/h + k, v 2·2·kv/h + o_proj input 2·q_w/h
        + SwiGLU 3·2·f/h   ->  llama-7b (q_w = kv = h, f = 2.69h): s·b·h·(8 + 8 + 16.1) = 32.1·s·b·h
    impl="torch" (the zoo's torch backend, HF's eager modules): each RMSNorm also keeps an fp32 copy of its
    input (4 bytes; in fp32 training that copy is the input itself) and the normalised tensor (2), the MLP
    also keeps silu(gate) (8·f/h instead of 6·f/h): llama-7b 8 + 2·(4 + 2 - 2) + 8 + 21.5 = 45.5·s·b·h.
    Both: + the fp32 per-row norm statistics and, with flash attention, the log-sum-exp. Without flash,
    the scores 2·a·s/h (+ 3·a·s/h with attention dropout); eager attention with GQA keeps K and V repeated to
    every head (q_w wide). Qwen3's qk_norm and Gemma's extra norms are not counted; MoE and MLA are refused.
GPT-NeoX / Phi blocks (llmkern.models.neox; a NeoXConfig or its name): GPT's terms, with the parallel residual's
second LayerNorm reading the block input the first keeps (only its statistics added), Phi's one shared norm feeding
q/k/v and the MLP (one tensor), Phi's per-head q/k LayerNorms (inputs + per-head statistics), a dropout mask per
branch output (resid_dropout), embd_dropout / attn_dropout as GPT's dropout, cos/sin over the rotary_dim channels
only; impl="torch" adds the attention output that SDPA keeps when partial RoPE or the q/k norms make it head-major
(o_proj's input is then a second copy). Measured equal to the byte (tests/test_neox_library_audit26.py). Model
states: param_counts exactly; LayerNorms, o_proj's and down_proj's biases replicated under tp, Phi's head bias
vocabulary-parallel with the head.
Pipeline parallelism, 1F1B (Korthikanti §4.2, "the first stage must store p micro-batches of L/p layers"): stage
i holds min(pp - i, num_microbatches) micro-batches in flight, so the first stage holds L layers' activations of
one micro-batch whatever pp is. Interleaved schedules (their 1 + (p-1)/(p·m) factor) are not modelled.
Outside the layers (Korthikanti §4.3, which the paper then neglects; counted here): the embedding dropout mask
(s·b·h, / t with sequence parallel) per micro-batch on the first stage; on the last stage the final norm's input
2·s·b·h, the output projection's input 2·s·b·h (both / t with sequence parallel) and the loss: fp32 log-probs
4·s·b·V/t (loss="torch": PyTorch's cross_entropy, and the paper's 4sbv/t), the 16-bit logits 2·s·b·V/t + an
8-byte row statistic (loss="llmkern": llmkern.cross_entropy), or, for our fused linear_cross_entropy
(loss="fused", no logits at all), the input gradient it computes in the forward (2·s·b·h; the vocabulary-parallel
loss of a head sharded over t > 1 ranks takes the whole, replicated h and keeps the whole dh on every rank, sequence
parallel or not) and the head's weight gradient that it keeps until the backward: 2·V·h/t in bf16 (kept in the
weight's dtype), 4·V·h/t in fp32 and in fp16 (kept in fp32: fp16's range cannot hold the summed loss's dW), t = 1
for linear_cross_entropy, t > 1 for llmkern.parallel.vocab's sharded head — in bf16 less than the fp32 log-probs
only when the micro-batch has more than h/2 tokens (s·b > h/2): llama-7b at b = 1, s = 2048 keeps 0.26 GB of dW,
as much as its 0.26 GB of log-probs. Plus the small things a measurement sees: token
ids and labels (int64), GPT's position ids, Llama's RoPE cos/sin tables, the loss's scalar.
What "activations" is: the tensors autograd keeps between the forward and the backward (what
`saved_activation_bytes` measures), not transient buffers: the activation gradients in flight, the layer being
recomputed under full recomputation (about one layer without recompute: `layer_activation_bytes`), allocator
fragmentation, communication buffers, the CUDA context. Measured against the zoo (tests/test_memory.py): the
estimate equals what autograd saves, byte for byte, for gpt-tiny (with and without dropout, recomputed) and
llama-tiny on the torch backend in float32 (mask_bytes=4: PyTorch's CPU dropout keeps a float mask; SDPA on
CPU runs its math path, which stores the scores, when there is attention dropout: flash_attention=False), and in
bf16 for llama-tiny; gpt-tiny in bf16 on CPU keeps 1,280 bytes less (CPU LayerNorm keeps bf16 statistics; CUDA fp32).
impl="fused" follows the save_for_backward calls of llmkern's autograd functions (norm, rope, swiglu, attention,
cross_entropy); on CPU those ops run reference paths, so it has not been measured here (no GPU in these tests).
"""
import contextvars
import dataclasses
import math
import numbers

from llmkern.ops._checks import bool_arg, int_arg

GB, GIB = 1e9, 2 ** 30
OPTIMIZERS = ("adamw", "adam", "sgd", None)  # "sgd": SGD with momentum (one state); None: no optimizer states
RECOMPUTE = ("none", "selective", "full")
LOSSES = ("torch", "llmkern", "fused")
IMPLS = ("fused", "torch")
_STATES = {"adamw": 2, "adam": 2, "sgd": 1, None: 0}
_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


def _cfg(config):
    from llmkern.models.configs import ModelConfig, get_config

    return config if isinstance(config, ModelConfig) else get_config(config)


def dtype_bytes(dtype, what="dtype"):
    """Bytes per element of a precision name ("bf16", "fp16", "fp32", "tf32") or a torch float dtype."""
    if not isinstance(dtype, str):
        name = str(dtype).replace("torch.", "")
        if name in _BYTES:
            return _BYTES[name]
    elif dtype.lower() in _BYTES:
        return _BYTES[dtype.lower()]
    raise ValueError(f"{what} must be one of 'bf16', 'fp16', 'fp32' (or a torch float dtype), got {dtype!r}")


def _is_bf16(dtype):
    """Whether a precision name or torch dtype (as dtype_bytes takes) is bfloat16."""
    name = dtype.lower() if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    return name in ("bf16", "bfloat16")


def _int(name, v, least, fn):
    """int_arg, named after the function `fn` it is an argument of."""
    return int_arg(f"{fn}: {name}", v, least)


def _flag(name, v, fn, allow_none=False):
    """bool_arg's bool (None too where allow_none), named after `fn`; not an int (a string such as "no" is truthy, an
    int is not a flag: both were taken silently before), and a ValueError, as this module's other checks raise."""
    return bool_arg(f"{fn}: {name}", v, allow_none=allow_none, ints=False, type_error=ValueError)


def _check_choice(name, v, allowed, fn):
    if v not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {allowed}, got {v!r}")


def model_state_bytes(n_params, *, dtype="bf16", optimizer="adamw", master_weights=True, state_dtype="fp32",
                      grad_dtype=None, zero_stage=0, dp=1):
    """(parameters, gradients, optimizer_states) bytes per GPU for n_params parameters (Ψ) — ZeRO §3.1.

    dtype: the parameters' (and, with grad_dtype None, the gradients') precision. master_weights: with 16-bit
    parameters the optimizer keeps an fp32 copy (4Ψ, part of ZeRO's K); ignored for fp32 parameters and with
    optimizer=None. state_dtype: the precision of momentum / variance (fp32 in mixed precision). zero_stage 1 / 2
    / 3 shards the optimizer states / + the gradients / + the parameters over dp data-parallel ranks (each shard
    ceil(Ψ / dp) elements). bf16 Adam, Ψ = 7.5e9, dp = 64: 120e9 bytes at stage 0, 31.4e9, 16.6e9, 1.9e9.
    """
    fn = "model_state_bytes"
    if isinstance(n_params, bool) or not isinstance(n_params, numbers.Real) or not 0 <= n_params < float("inf"):
        raise ValueError(f"{fn}: n_params must be a finite number >= 0, got {n_params!r}")
    _check_choice("optimizer", optimizer, OPTIMIZERS, fn)
    if zero_stage not in (0, 1, 2, 3) or isinstance(zero_stage, bool):
        raise ValueError(f"{fn}: zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    dp = _int("dp", dp, 1, fn)
    master_weights = _flag("master_weights", master_weights, fn)
    p_bytes = dtype_bytes(dtype, "dtype")
    g_bytes = p_bytes if grad_dtype is None else dtype_bytes(grad_dtype, "grad_dtype")
    s_bytes = dtype_bytes(state_dtype, "state_dtype")
    k = _STATES[optimizer] * s_bytes + (4 if master_weights and p_bytes < 4 and optimizer is not None else 0)
    n = math.ceil(n_params)
    shard = -(-n // dp)  # ceil(Ψ / dp)
    params = (shard if zero_stage >= 3 else n) * p_bytes
    grads = (shard if zero_stage >= 2 else n) * g_bytes
    states = (shard if zero_stage >= 1 else n) * k
    return params, grads, states


def stage_params(config, *, tp=1, pp=1, stage=0):
    """Parameters one GPU holds: pipeline stage `stage` of pp, its 1/tp tensor-parallel shard (module docstring:
    layers L/pp per stage; weights and column-parallel biases / tp; norms and row-parallel biases replicated;
    token embedding / tp and position embedding on the first stage, final norm and head (/ tp; a tied head's
    copy when pp > 1) on the last). tp = pp = 1 gives param_counts(config)["total"]."""
    from llmkern.flops import param_counts

    c = _cfg(config)
    fn = "stage_params"
    tp, pp = _int("tp", tp, 1, fn), _int("pp", pp, 1, fn)
    stage = _int("stage", stage, 0, fn)
    if stage >= pp:
        raise ValueError(f"{fn}: stage must be in 0..pp-1={pp - 1}, got {stage}")
    if c.n_layer % pp:
        raise ValueError(f"{fn}: pp={pp} must divide n_layer={c.n_layer} (a stage holds n_layer / pp layers)")
    p = param_counts(c)
    L, d, V = c.n_layer, c.n_embd, c.vocab_size
    final_norm, row_biases, head_bias = _norm_and_bias_layout(c)
    layer_total = p["attention"] + p["attention_bias"] + p["ffn"] + p["router"] + p["norm"] - final_norm
    replicated = (p["norm"] - final_norm) + L * row_biases
    per_layer = (layer_total - replicated) / (tp * L) + replicated / L
    n = per_layer * (L // pp)
    if stage == 0:
        n += math.ceil(V / tp) * d + p["position_embedding"]
    if stage == pp - 1:
        n += final_norm
        if not c.tie_embeddings or pp > 1:  # an untied head, or a tied head's copy on the last stage
            n += math.ceil(V / tp) * d
        if head_bias:  # (Phi's: vocabulary-parallel with the head's rows, kept by a tied head too)
            n += math.ceil(V / tp)
    return n


def _norm_and_bias_layout(c):
    """(final norm parameters, replicated row-parallel bias parameters per layer, whether the LM head has a bias)
    for stage_params. GPT-NeoX / Phi: LayerNorms with gain and bias, o_proj's bias (attn_bias) and down_proj's
    bias replicated; every other parameter of a layer, the qk LayerNorms aside, is sharded as GPT's."""
    d = c.n_embd
    if c.arch == "neox":
        return 2 * d, d * ((1 if c.attn_bias else 0) + 1), c.lm_head_bias
    _, o_bias, mlp_bias = c.biases
    return d * (2 if c.arch == "gpt" and c.bias else 1), (d if o_bias else 0) + (d if mlp_bias else 0), False


def layer_activation_bytes(s, b, h, a, *, t=1, sequence_parallel=False, recompute="none"):
    """Korthikanti et al. Table 2, verbatim: one GPT layer's activation bytes (16-bit, dropout, unfused attention).
    none: sbh(34 + 5as/h); t > 1: sbh(10 + 24/t + 5as/(ht)); sequence parallel: sbh(34/t + 5as/(ht));
    selective: without the 5as/h term; full: 2sbh (/ t with sequence parallel)."""
    fn = "layer_activation_bytes"
    # (as Python ints: numpy int32 sizes wrapped in s * b * h, 65536 * 65536 giving 0 bytes)
    s, b, h, a, t = (_int(name, v, 1, fn) for name, v in (("s", s), ("b", b), ("h", h), ("a", a), ("t", t)))
    sequence_parallel = _flag("sequence_parallel", sequence_parallel, fn)
    _check_choice("recompute", recompute, RECOMPUTE, fn)
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    attn = 0 if recompute == "selective" else 5 * a * s / (h * t)
    return sbh * ((34 / t if sequence_parallel else 10 + 24 / t) + attn)


def _check_arch(c, fn):
    # (getattr: a NeoXConfig has no n_experts, and its __getattr__ raises for it)
    if getattr(c, "n_experts", 0) or c.kv_lora_rank:
        raise ValueError(f"{fn}: activations of mixture-of-experts and MLA models are not modelled "
                         f"({c.name or 'config'}); model_state_bytes(param_counts(config)['total']) gives their "
                         f"model states")


def layer_activation_terms(config, seq_len, batch_size, *, tp=1, sequence_parallel=False, recompute="none",
                           flash_attention=True, dtype="bf16", mask_bytes=1, dropout=None, impl="fused",
                           row_stats=True):
    """One transformer layer's saved activations for one micro-batch on one GPU, term by term ({name: bytes}).

    The module docstring lists the terms and their sources. dropout: None reads config.dropout (> 0: the masks
    and, without flash attention, the dropped scores are kept); True/False forces it. mask_bytes: 1 for CUDA's
    fused dropout (a bool mask, Megatron's accounting); PyTorch's CPU dropout keeps a mask of the activation
    dtype. row_stats=False leaves out the per-row statistics (the norms' fp32 mean / 1/rms) that Korthikanti's
    accounting neglects; flash attention's log-sum-exp is always counted. With GPT blocks, dtype="bf16",
    mask_bytes=1, dropout=True, flash_attention=False, row_stats=False the sum is Table 2
    (`layer_activation_bytes`)."""
    fn = "layer_activation_terms"
    c = _cfg(config)
    _check_arch(c, fn)
    s, b = _int("seq_len", seq_len, 1, fn), _int("batch_size", batch_size, 1, fn)
    t = _check_tp(c, tp, fn)
    _check_choice("recompute", recompute, RECOMPUTE, fn)
    _check_choice("impl", impl, IMPLS, fn)
    A = dtype_bytes(dtype)
    M = _int("mask_bytes", mask_bytes, 1, fn)
    sequence_parallel = _flag("sequence_parallel", sequence_parallel, fn)
    flash_attention, row_stats = _flag("flash_attention", flash_attention, fn), _flag("row_stats", row_stats, fn)
    dropout = _flag("dropout", dropout, fn, allow_none=True)
    N, h = s * b, c.n_embd
    rep = t if sequence_parallel else 1  # the tensors outside the tensor-parallel region: sharded with SP only
    if recompute == "full":
        return {"layer_input": A * N * h / rep}
    if c.arch == "neox":
        return _neox_layer_terms(c, s, b, t=t, rep=rep, recompute=recompute, eager=not flash_attention, A=A, M=M,
                                 drops=_neox_dropouts(c, dropout), impl=impl, row_stats=row_stats)
    drop = c.dropout > 0 if dropout is None else dropout
    a, f = c.n_head, c.intermediate_size
    q_w, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    gpt = c.arch == "gpt"
    terms = {}
    stat = 8 if gpt else 4  # LayerNorm: mean and rstd; RMSNorm: rstd (fp32 per row)

    def norm(name):
        if gpt or impl == "fused":
            terms[f"{name}_input"] = A * N * h / rep
        else:  # the zoo's torch RMSNorm: an fp32 copy of the input (the input itself in fp32) + the normalised x
            terms[f"{name}_input"] = 4 * N * h / rep
            terms[f"{name}_normalized"] = A * N * h / rep
        if row_stats:
            terms[f"{name}_stats"] = stat * N / rep

    norm("norm1")
    terms["qkv_input"] = A * N * h / rep
    eager = not flash_attention
    kv_kept = q_w if eager and kv != q_w else kv  # eager attention repeats K/V to every query head
    terms["q"] = A * N * q_w / t
    terms["k"] = A * N * kv_kept / t
    terms["v"] = A * N * kv_kept / t
    if eager and recompute != "selective":
        terms["attention_probs"] = A * a * s * s * b / t
        if drop:
            terms["attention_dropout_mask"] = M * a * s * s * b / t
            terms["attention_dropped_probs"] = A * a * s * s * b / t
    if not eager:
        terms["attention_lse"] = 4 * a * s * b / t
    terms["o_proj_input"] = A * N * q_w / t
    if gpt and drop:
        terms["attention_out_dropout_mask"] = M * N * h / rep
    norm("norm2")
    terms["mlp_input"] = A * N * h / rep
    if gpt:
        terms["mlp_act_input"] = A * N * f / t
        terms["down_proj_input"] = A * N * f / t
        if drop:
            terms["mlp_out_dropout_mask"] = M * N * h / rep
    else:
        terms["gate"] = A * N * f / t
        terms["up"] = A * N * f / t
        if impl == "torch":
            terms["act_gate"] = A * N * f / t
        terms["down_proj_input"] = A * N * f / t
    return terms


def _neox_dropouts(c, dropout):
    """{"embedding", "residual", "attention"}: whether a GPT-NeoX / Phi config drops there (dropout None: its
    embd_dropout / resid_dropout / attn_dropout > 0; True / False forces all three)."""
    rates = {"embedding": c.embd_dropout, "residual": c.resid_dropout, "attention": c.attn_dropout}
    return {k: (r > 0 if dropout is None else dropout) for k, r in rates.items()}


def _neox_layer_terms(c, s, b, *, t, rep, recompute, eager, A, M, drops, impl, row_stats):
    """layer_activation_terms of a GPT-NeoX / Phi block (llmkern.models.neox), GPT's terms (LayerNorm input + fp32
    mean and rstd, the GELU's input and output) with its differences: the parallel residual's second LayerNorm
    reads the block input that the first one keeps already (only its statistics are new; sequential blocks keep
    x + attn as GPT's do); Phi's shared norm feeds the q/k/v and up projections one tensor (no second norm, no
    separate MLP input); Phi's per-head q/k LayerNorms keep their inputs and per-head statistics; a dropout mask on
    each branch's output (resid_dropout). impl="torch" (PyTorch's SDPA): when the query comes out head-major (the
    partial RoPE's cat, or the q/k LayerNorms), so does the flash kernel's output, which it keeps, and o_proj's
    input is a second, token-major copy of it (measured; full RoPE or none with no q/k norm keeps one)."""
    N, h, a, f = s * b, c.n_embd, c.n_head, c.intermediate_size
    q_w, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    terms = {"norm1_input": A * N * h / rep}
    stats = 8 * N / rep if row_stats else 0  # (LayerNorm: fp32 mean and rstd per row)
    if stats:
        terms["norm1_stats"] = stats
    if not c.shared_norm:
        if not c.parallel_residual:  # (the parallel block's second norm reads the block input: counted above)
            terms["norm2_input"] = A * N * h / rep
        if stats:
            terms["norm2_stats"] = stats
    terms["qkv_input"] = A * N * h / rep
    if c.qk_layernorm:
        terms["q_norm_input"], terms["k_norm_input"] = A * N * q_w / t, A * N * kv / t
        if row_stats:
            terms["q_norm_stats"], terms["k_norm_stats"] = 8 * N * a / t, 8 * N * c.n_kv_head / t
    kv_kept = q_w if eager and kv != q_w else kv  # eager attention repeats K/V to every query head
    terms.update(q=A * N * q_w / t, k=A * N * kv_kept / t, v=A * N * kv_kept / t)
    if eager and recompute != "selective":
        terms["attention_probs"] = A * a * s * s * b / t
        if drops["attention"]:
            terms["attention_dropout_mask"] = M * a * s * s * b / t
            terms["attention_dropped_probs"] = A * a * s * s * b / t
    if not eager:
        terms["attention_lse"] = 4 * a * s * b / t
        head_major = c.qk_layernorm or 0 < c.rotary_dim < c.head_dim
        if impl == "torch" and head_major:
            terms["attention_out"] = A * N * q_w / t
    terms["o_proj_input"] = A * N * q_w / t
    if drops["residual"]:
        terms["attention_out_dropout_mask"] = M * N * h / rep
    if not c.shared_norm:
        terms["mlp_input"] = A * N * h / rep
    terms["mlp_act_input"] = A * N * f / t
    terms["down_proj_input"] = A * N * f / t
    if drops["residual"]:
        terms["mlp_out_dropout_mask"] = M * N * h / rep
    return terms


def _check_tp(c, tp, fn):
    t = _int("tp", tp, 1, fn)
    if c.n_head % t or c.n_kv_head % t:
        raise ValueError(f"{fn}: tp={t} must divide n_head={c.n_head} and n_kv_head={c.n_kv_head} "
                         f"(tensor parallelism splits the heads)")
    return t


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
    """Bytes per GPU (the busiest pipeline stage unless one was asked for). total = the four summed;
    activation_terms: (name, bytes) pairs whose sum is activations; params_per_gpu: Ψ on this GPU before ZeRO."""
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    params_per_gpu: float
    stage: int = 0
    activation_terms: tuple = ()
    name: str = ""
    total: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "total", self.parameters + self.gradients + self.optimizer_states + self.activations)

    @property
    def model_states(self):
        return self.parameters + self.gradients + self.optimizer_states

    def gib(self, field="total"):
        """A field in GiB (2^30 bytes)."""
        return getattr(self, field) / GIB

    def gb(self, field="total"):
        """A field in GB (10^9 bytes: the deck's and ZeRO's unit)."""
        return getattr(self, field) / GB

    def terms(self):
        return dict(self.activation_terms)

    def __str__(self):
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer_states", self.optimizer_states), ("activations", self.activations), ("total", self.total)]
        head = f"training memory per GPU{' for ' + self.name if self.name else ''} (stage {self.stage}, " \
               f"{self.params_per_gpu / 1e6:,.1f}M parameters on it):"
        return "\n".join([head] + [f"  {k:<17}{v / GIB:>12,.2f} GiB {v / GB:>12,.2f} GB" for k, v in rows])


def training_memory(config, batch_size, seq_len=None, *, dtype="bf16", optimizer="adamw", master_weights=True,
                    state_dtype="fp32", grad_dtype=None, zero_stage=0, dp=1, tp=1, pp=1, sequence_parallel=False,
                    recompute="none", flash_attention=True, loss="torch", impl="fused", mask_bytes=1,
                    dropout=None, num_microbatches=None, stage=None, row_stats=True):
    """Memory per GPU to train a zoo model (ModelConfig or its name): a TrainingMemory (bytes).

    batch_size: the micro-batch b per data-parallel rank; seq_len: s (None: config.block_size). Model states:
    model_state_bytes of stage_params (dtype, optimizer, master_weights, state_dtype, grad_dtype, zero_stage over
    dp). Activations: layer_activation_terms × the layers of the stage × its micro-batches in flight under 1F1B
    (min(pp - stage, num_microbatches); None: >= pp), + the embedding terms on the first stage and the final norm,
    head and loss on the last ("torch": fp32 log-probs; "llmkern": llmkern.cross_entropy's 16-bit logits;
    "fused": linear_cross_entropy, no logits). stage: None reports the stage with the largest total, else that
    stage (0..pp-1). See the module docstring for every formula and its source.
    """
    fn = "training_memory"
    c = _cfg(config)
    _check_arch(c, fn)
    b = _int("batch_size", batch_size, 1, fn)
    s = c.block_size if seq_len is None else _int("seq_len", seq_len, 1, fn)
    _check_choice("optimizer", optimizer, OPTIMIZERS, fn)
    _check_choice("recompute", recompute, RECOMPUTE, fn)
    _check_choice("loss", loss, LOSSES, fn)
    if zero_stage not in (0, 1, 2, 3) or isinstance(zero_stage, bool):
        raise ValueError(f"{fn}: zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    dp, pp = _int("dp", dp, 1, fn), _int("pp", pp, 1, fn)
    t = _check_tp(c, tp, fn)
    if c.n_layer % pp:
        raise ValueError(f"{fn}: pp={pp} must divide n_layer={c.n_layer} (a stage holds n_layer / pp layers)")
    m = pp if num_microbatches is None else _int("num_microbatches", num_microbatches, 1, fn)
    mask_bytes = _int("mask_bytes", mask_bytes, 1, fn)  # (a numpy int32 overflowed in the embedding mask's bytes)
    if stage is not None:
        stage = _int("stage", stage, 0, fn)
        if stage >= pp:
            raise ValueError(f"{fn}: stage must be None or in 0..pp-1={pp - 1}, got {stage}")
    sequence_parallel = _flag("sequence_parallel", sequence_parallel, fn)
    for name, v in (("flash_attention", flash_attention), ("master_weights", master_weights), ("row_stats", row_stats)):
        _flag(name, v, fn)
    dropout = _flag("dropout", dropout, fn, allow_none=True)
    if sequence_parallel and t == 1:
        sequence_parallel = False  # (nothing to shard)
    A = dtype_bytes(dtype)
    layer = layer_activation_terms(c, s, b, tp=t, sequence_parallel=sequence_parallel, recompute=recompute,
                                   flash_attention=flash_attention, dtype=dtype, mask_bytes=mask_bytes,
                                   dropout=dropout, impl=impl, row_stats=row_stats)
    neox = c.arch == "neox"
    drop = _neox_dropouts(c, dropout)["embedding"] if neox else c.dropout > 0 if dropout is None else dropout
    layer_norms = c.arch in ("gpt", "neox")  # (LayerNorm: fp32 mean and rstd per row; RMSNorm: rstd)
    rep = t if sequence_parallel else 1
    N, h, V = s * b, c.n_embd, c.vocab_size

    def one(i):
        in_flight = min(pp - i, m)
        n_params = stage_params(c, tp=t, pp=pp, stage=i)
        states = model_state_bytes(n_params, dtype=dtype, optimizer=optimizer, master_weights=master_weights,
                                   state_dtype=state_dtype, grad_dtype=grad_dtype, zero_stage=zero_stage, dp=dp)
        terms = {f"layers ({in_flight * c.n_layer // pp} layer-microbatches): {k}": v * in_flight * (c.n_layer // pp)
                 for k, v in layer.items()}
        if i == 0:
            terms["input_ids"] = 8 * N * in_flight
            if c.arch == "gpt":
                terms["position_ids"] = 8 * s * in_flight
            if drop and c.arch in ("gpt", "neox"):
                terms["embedding_dropout_mask"] = mask_bytes * N * h / rep * in_flight
            if c.arch != "gpt":  # (NeoX / Phi: the rotated channels only; none for rotary_dim 0)
                width = c.rotary_dim if neox else c.head_dim
                if width:
                    terms["rope_cos_sin"] = 2 * A * s * width * in_flight
        if i == pp - 1:
            fused_rms_torch = not layer_norms and impl == "torch"
            terms["final_norm_input"] = (4 if fused_rms_torch else A) * N * h / rep
            if fused_rms_torch:
                terms["final_norm_normalized"] = A * N * h / rep
            if row_stats:
                terms["final_norm_stats"] = (8 if layer_norms else 4) * N / rep
            if loss == "fused":
                # (tp > 1: llmkern.parallel.vocab's loss takes the whole h, replicated: its dh is [s·b, h] on every
                # rank, not / t under sequence parallelism)
                terms["loss_input_grad"] = A * N * h
                # (linear_cross_entropy and the vocabulary-parallel loss of a sharded head (tp > 1,
                # llmkern.parallel.vocab) keep a bf16 head's dW in bf16, any other in fp32: ops/cross_entropy._dw_dtype)
                terms["loss_weight_grad"] = (2 if _is_bf16(dtype) else 4) * math.ceil(V / t) * h
                if neox and c.lm_head_bias:  # (Phi's head bias: its fp32 gradient, computed in the forward too)
                    terms["loss_bias_grad"] = 4 * math.ceil(V / t)
            else:
                terms["head_input"] = A * N * h / rep
                if loss == "torch":
                    terms["loss_fp32_logprobs"] = 4 * N * V / t
                else:
                    terms["loss_logits"] = A * N * V / t
                    terms["loss_row_stats"] = 8 * N
            terms["labels"] = 8 * N + 4  # int64 labels + the loss's scalar
        acts = math.ceil(sum(terms.values()))
        return TrainingMemory(*states, acts, n_params, i, tuple(terms.items()), c.name)

    if stage is not None:
        return one(stage)
    candidates = {0, pp - 1}  # (a middle stage has no embedding and fewer micro-batches than the first)
    return max((one(i) for i in sorted(candidates)), key=lambda r: r.total)


def max_batch_size(config, memory_bytes, seq_len=None, **kwargs):
    """The largest micro-batch whose training_memory(config, b, seq_len, **kwargs).total fits memory_bytes
    (0 when the model states alone, or b = 1, do not fit)."""
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, numbers.Real) or not memory_bytes > 0:
        raise ValueError(f"max_batch_size: memory_bytes must be a number > 0, got {memory_bytes!r}")

    def fits(b):
        return training_memory(config, b, seq_len, **kwargs).total <= memory_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2 ** 40:
            raise ValueError("max_batch_size: no limit found (memory_bytes too large)")
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# The innermost saved_activations block open in this context (thread / asyncio task): torch calls only the innermost
# saved_tensors_hooks, so a block hands what it sees on to the one enclosing it.
_OPEN_BLOCK = contextvars.ContextVar("llmkern_saved_activations", default=None)


def _storage_key(t):
    """The identity of t's storage: its StorageImpl, shared by every view of it. Not its data_ptr: meta tensors and
    FakeTensors (shape-only memory estimates) all have address 0, and counted as one storage (or as a parameter's)."""
    return t.untyped_storage()._cdata


class saved_activations:
    """Context manager: the tensors autograd saves for the backward inside it (torch.autograd.graph.
    saved_tensors_hooks), each distinct storage counted once, parameters excluded (model states, not
    activations): the storages of `exclude` (modules' parameters and buffers, or tensors) and of any trainable
    leaf tensor or view of one. .bytes, .tensors: [(shape, dtype, storage bytes)] in the order first saved.
    The saved tensors are held until the block ends (so that a freed storage is never mistaken for a new one);
    a storage is counted whole, even when only a view of it was saved. Meta tensors and FakeTensors are counted
    by their sizes (an estimate that allocates nothing). Blocks nest: an enclosing block also counts what is saved
    inside an inner one (each with its own `exclude`).

        with saved_activations(exclude=model) as saved:
            loss = model(ids, labels)[1]
        saved.bytes
    """

    def __init__(self, exclude=()):
        import torch

        items = exclude if isinstance(exclude, (list, tuple, set)) else (exclude,)
        self._skip = set()
        for x in items:
            if isinstance(x, torch.nn.Module):
                for p in list(x.parameters()) + list(x.buffers()):
                    self._skip.add(_storage_key(p))
            elif torch.is_tensor(x):
                self._skip.add(_storage_key(x))
            else:
                raise ValueError(f"saved_activations: exclude must hold modules or tensors, got {type(x).__name__}")
        self.bytes, self.tensors, self._held = 0, [], {}
        self._outer = None

    def _count(self, t):
        base = t if t._base is None else t._base
        st = t.untyped_storage()
        key = _storage_key(t)
        if not (key in self._skip or key in self._held or (base.is_leaf and base.requires_grad)):
            self._held[key] = t
            self.bytes += st.nbytes()
            self.tensors.append((tuple(t.shape), t.dtype, st.nbytes()))
        if self._outer is not None:
            self._outer._count(t)

    def _pack(self, t):
        self._count(t)
        return t

    def __enter__(self):
        import torch

        self._outer = _OPEN_BLOCK.get()
        self._token = _OPEN_BLOCK.set(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _OPEN_BLOCK.reset(self._token)
        self._outer, self._held = None, {}
        return False


def saved_activation_bytes(fn, *args, exclude=None, **kwargs):
    """Bytes autograd saves for the backward during fn(*args, **kwargs) (saved_activations; fn's parameters
    excluded when fn is a module or a module's bound method, and those of `exclude`). Compare with
    training_memory(...).activations for the same micro-batch (dtype and conventions matched)."""
    import torch

    skip = [] if exclude is None else list(exclude) if isinstance(exclude, (list, tuple)) else [exclude]
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        skip.append(owner)
    skip += [x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.nn.Module)]
    with saved_activations(exclude=skip) as saved:
        out = fn(*args, **kwargs)
        n = saved.bytes
    del out
    return n
