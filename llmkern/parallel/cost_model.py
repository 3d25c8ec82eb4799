"""Cost model of tensor-parallel training: step time and exposed communication on p GPUs.

    from llmkern.parallel import cost_model
    r = cost_model.predict("gpt3-175b", p=8, hardware="H100", sequence_parallel=True, overlap="ring")
    print(cost_model.table("gpt3-175b", p=8))          # markdown, the README table

What is modelled (one micro-batch of `micro_batch` sequences through all layers, forward +
backward, tensor parallelism only: no pipeline or data parallelism, no recomputation):

- Compute: the per-layer GEMMs (QKV, attention output, MLP: 2 matrices, 3 when gated), each
  split p ways, at ``gemm_efficiency`` x the dense bf16 peak; backward GEMMs = 2x forward;
  attention core 4*B*H*T*T*D (halved: causal) per forward, 2.5x that in backward, at
  ``attention_efficiency`` x peak; the LM head (vocab-parallel, split p ways) once per step.
- Communication per layer (bf16 activations, S = tokens x hidden x 2 bytes): without sequence
  parallelism 2 all-reduces forward + 2 backward; with it 2 all-gathers + 2 reduce-scatters in
  each direction (the same bytes). Ring algorithms: an all-gather or reduce-scatter moves
  (p-1)/p * S per GPU at ``link_efficiency`` x the per-direction link bandwidth (NVLink: half of
  the 900 GB/s (H100) or 600 GB/s (A100) bidirectional figure), plus ``latency_us`` per step;
  an all-reduce is twice that.
- overlap="none": every collective is exposed (its time adds to the step). overlap="ring": each all-gather/reduce-scatter is
  decomposed into p steps, each transfer hidden under the 1/p chunk of the GEMM it feeds (in
  backward: of the dgrad + wgrad GEMMs): exposed = (p-1) * max(0, t_step - g/p); without sequence
  parallelism the all-reduce is split in ``chunks`` pieces pipelined with the GEMM chunks
  (backward: hidden under the weight-gradient GEMM), each piece an all-reduce of its own (1/chunks of the
  bytes, all of the latency).
- Backward all-reduces: one input gradient per column-parallel group, as Megatron-LM's fused QKV and fused
  MLP input projections give. The zoo's models under ``tensor_parallelize`` keep q/k/v (and gate/up) as
  separate column-parallel layers, each all-reducing its own input gradient: 3 (+ 2 gated) per layer in place of
  2, more traffic than modelled here. Overlapped GEMMs run ``overlap_slowdown``
  slower (communication kernels take SMs and memory bandwidth).
"""
import dataclasses
import math
import numbers
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float     # dense peak
    link_gbps: float       # NVLink, GB/s per GPU, bidirectional (the datasheet figure)


HARDWARE: Dict[str, Hardware] = {
    "H100": Hardware("H100 SXM", 989.4, 900.0),
    "H200": Hardware("H200 SXM", 989.4, 900.0),
    "A100": Hardware("A100 SXM", 312.0, 600.0),
}

# Model dimensions used when llmkern.models is not importable (GPT-3 Table 2.1, n_ctx 2048).
GPT3 = {
    "gpt3-125m": (12, 768, 12), "gpt3-350m": (24, 1024, 16), "gpt3-760m": (24, 1536, 16),
    "gpt3-1.3b": (24, 2048, 16), "gpt3-2.7b": (32, 2560, 32), "gpt3-6.7b": (32, 4096, 32),
    "gpt3-13b": (40, 5120, 40), "gpt3-175b": (96, 12288, 96),
}


@dataclasses.dataclass(frozen=True)
class Dims:
    name: str
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn: int
    gated: bool
    vocab: int
    seq: int
    sliding_window: Optional[int] = None  # (Mistral-style: query i sees its last W keys)
    n_window_layers: Optional[int] = None  # the layers that slide (None: all of them, with a window)

    def params(self):
        """Parameters (weights of the layers + embeddings, biases and norms ignored)."""
        attn = self.hidden * self.head_dim * (2 * self.n_head + 2 * self.n_kv_head)
        mlp = (3 if self.gated else 2) * self.hidden * self.ffn
        return self.n_layer * (attn + mlp) + self.vocab * self.hidden


def dims(model):
    """Dims of a zoo model name / ModelConfig (llmkern.models.configs), else of the GPT-3 table; a
    Dims as it is."""
    if isinstance(model, Dims):
        return model
    try:
        from llmkern.models.configs import ModelConfig, get_config

        cfg = model if isinstance(model, ModelConfig) else get_config(model)
        # (getattr: a GPT-NeoX / Phi NeoXConfig has no n_experts; it is dense, its MLP ungated: modelled as GPT's
        # block, the parallel residual's two row-parallel all-reduces kept apart as tensor_parallelize runs them)
        if getattr(cfg, "n_experts", 0) or cfg.kv_lora_rank:  # (one dense FFN, MHA projections: understated)
            raise ValueError(f"cost_model: {cfg.name or model} is a mixture-of-experts or latent-attention model; "
                             f"the cost model covers dense models with multi-head / grouped-query attention")
        windowed = None if cfg.sliding_window_layers is None else len(cfg.sliding_window_layers)  # None: all
        return Dims(cfg.name or str(model), cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                    cfg.intermediate_size, cfg.arch == "llama", cfg.vocab_size, cfg.block_size,
                    cfg.sliding_window, windowed)
    except ImportError:
        pass
    key = str(model).lower()
    if key not in GPT3:
        raise ValueError(f"cost_model: unknown model {model!r} (llmkern.models is not importable; known: "
                         f"{', '.join(GPT3)})")
    L, h, H = GPT3[key]
    return Dims(key, L, h, H, H, h // H, 4 * h, False, 50257, 2048)


def _ring_exposed(g, t_comm, p, latency, slowdown):
    """Exposed time of a collective decomposed into p ring steps under a GEMM of time g. t_comm is
    the whole collective's time, its (p - 1) step latencies included (predict's t_ag), so one ring
    step takes t_comm / (p - 1): with free GEMMs (g = 0) the ring exposes exactly t_comm. (`latency`,
    the per-step latency, is in t_comm already; the argument is kept for callers.)"""
    if p == 1 or t_comm <= 0:
        return 0.0
    step = t_comm / (p - 1)
    g_chunk = g * (1 + slowdown) / p
    return (p - 1) * max(0.0, step - g_chunk) + g * slowdown


def _chunked_allreduce_exposed(g, t_bytes, t_latency, chunks, slowdown, after=0.0):
    """Exposed time of an all-reduce split in `chunks` pieces pipelined behind the GEMM chunks
    (time g in all), followed by `after` more compute it can hide under (backward: the wgrad). The
    all-reduce moves its bytes in t_bytes and pays t_latency (its ring steps' latencies): each piece is
    an all-reduce of its own (AsyncChunkAllReduce), so it moves 1/chunks of the bytes but pays the
    whole latency."""
    if t_bytes + t_latency <= 0:
        return 0.0
    k = max(1, chunks)
    gc, ac = g * (1 + slowdown) / k, t_bytes / k + t_latency
    comm_end = gc + (k - 1) * max(gc, ac) + ac
    compute_end = (g + after) * (1 + slowdown)
    return max(comm_end, compute_end) - (g + after)


def _count(name, v, optional=False):
    """v as an int >= 1 (a whole float such as 8.0 too; None when optional), else ValueError naming it: a bool was
    taken for 1, 2.5 micro-batches counted as 2 tokens' worth here and 2.5 there, 0 and negatives gave times
    below zero or a division by zero."""
    if v is None and optional:
        return None
    if not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and v == int(v) and v >= 1:
        return int(v)
    raise ValueError(f"cost_model.predict: {name} must be an int >= 1{' or None' if optional else ''}, got {v!r}")


def _positive(name, v, optional=False, zero=False):
    """v as a finite float > 0 (>= 0 with zero; None when optional), else ValueError naming it: 0 divided by zero
    or was taken for the default, negatives gave negative times."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
            or not (v >= 0 if zero else v > 0):
        raise ValueError(f"cost_model.predict: {name} must be a finite number {'>= 0' if zero else '> 0'}"
                         f"{' or None' if optional else ''}, got {v!r}")
    return float(v)


def _hardware(hardware):
    if isinstance(hardware, Hardware):
        return hardware
    if isinstance(hardware, str) and hardware in HARDWARE:
        return HARDWARE[hardware]
    raise ValueError(f"cost_model: hardware must be one of {sorted(HARDWARE)} or a Hardware, got {hardware!r}")


def predict(model="gpt3-175b", p=8, hardware="H100", *, micro_batch=1, seq=None, sequence_parallel=True,
            overlap="ring", dtype_bytes=2, gemm_efficiency=0.7, attention_efficiency=0.5, link_efficiency=0.8,
            latency_us=10.0, chunks=4, overlap_slowdown=0.05, link_gbps: Optional[float] = None):
    """Predicted times (ms) for one micro-batch, forward + backward, through the whole model."""
    if overlap not in ("none", "ring"):
        raise ValueError(f"cost_model.predict: overlap must be 'none' or 'ring', got {overlap!r}")
    from llmkern.ops._checks import bool_arg

    p, micro_batch, chunks = _count("p", p), _count("micro_batch", micro_batch), _count("chunks", chunks)
    seq = _count("seq", seq, optional=True)  # (0 was taken for the model's length)
    sequence_parallel = bool_arg("cost_model.predict: sequence_parallel", sequence_parallel)  # ("False" was True)
    dtype_bytes = _positive("dtype_bytes", dtype_bytes)
    gemm_efficiency = _positive("gemm_efficiency", gemm_efficiency)  # (> 1 allowed: a test makes GEMMs free)
    attention_efficiency = _positive("attention_efficiency", attention_efficiency)
    link_efficiency = _positive("link_efficiency", link_efficiency)
    latency_us = _positive("latency_us", latency_us, zero=True)
    overlap_slowdown = _positive("overlap_slowdown", overlap_slowdown, zero=True)
    link_gbps = _positive("link_gbps", link_gbps, optional=True)  # (0 was taken for the hardware's figure)
    d = dims(model)
    hw = _hardware(hardware)
    if d.n_head % p or d.n_kv_head % p or d.ffn % p:
        raise ValueError(f"cost_model.predict: {d.name} does not shard {p} ways (heads {d.n_head}/{d.n_kv_head}, "
                         f"ffn {d.ffn})")
    s_len = int(seq or d.seq)  # (Python ints: a numpy int32 would wrap in the products below)
    T = int(micro_batch) * s_len
    flops_rate = hw.bf16_tflops * 1e12 * gemm_efficiency
    attn_rate = hw.bf16_tflops * 1e12 * attention_efficiency
    bw = (link_gbps or hw.link_gbps) / 2 * 1e9 * link_efficiency  # per direction
    lat = latency_us * 1e-6

    def gemm(k, n):  # forward time of a [T, k] x [k, n/p] GEMM
        return 2 * T * k * n / p / flops_rate

    g_qkv = gemm(d.hidden, d.head_dim * (d.n_head + 2 * d.n_kv_head))
    g_o = gemm(d.head_dim * d.n_head, d.hidden)
    g_up = gemm(d.hidden, d.ffn * (2 if d.gated else 1))
    g_down = gemm(d.ffn, d.hidden)
    from llmkern.flops import window_fraction

    n_win = d.n_layer if d.n_window_layers is None else d.n_window_layers
    window = window_fraction(d.n_layer, d.sliding_window, n_win, s_len)  # (1.0 without a window)
    attn_core = 4 * micro_batch * d.n_head * s_len * s_len * d.head_dim / 2 * window / p / attn_rate
    fwd = g_qkv + g_o + g_up + g_down + attn_core
    bwd = 2 * (g_qkv + g_o + g_up + g_down) + 2.5 * attn_core
    S = T * d.hidden * dtype_bytes
    ag_bytes, ag_lat = ((p - 1) / p * S / bw, (p - 1) * lat) if p > 1 else (0.0, 0.0)
    t_ag = ag_bytes + ag_lat  # all-gather == reduce-scatter
    t_ar = 2 * t_ag
    ar = (2 * ag_bytes, 2 * ag_lat)  # an all-reduce: reduce-scatter + all-gather
    if sequence_parallel:
        comm = 8 * t_ag
        pairs = [(g_qkv, t_ag), (g_o, t_ag), (g_up, t_ag), (g_down, t_ag),             # forward
                 (2 * g_down, t_ag), (2 * g_up, t_ag), (2 * g_o, t_ag), (2 * g_qkv, t_ag)]  # backward
        exposed_ring = sum(_ring_exposed(g, t, p, lat, overlap_slowdown) for g, t in pairs)
    else:
        comm = 4 * t_ar
        exposed_ring = (_chunked_allreduce_exposed(g_o, *ar, chunks, overlap_slowdown)
                        + _chunked_allreduce_exposed(g_down, *ar, chunks, overlap_slowdown)
                        # backward: the input-gradient all-reduce runs under the dgrad chunks, then wgrad
                        + _chunked_allreduce_exposed(g_up, *ar, chunks, overlap_slowdown, after=g_up)
                        + _chunked_allreduce_exposed(g_qkv, *ar, chunks, overlap_slowdown, after=g_qkv))
    # the ring's exposed time includes the slowdown of the GEMMs it overlaps with
    exposed = comm if overlap == "none" or p == 1 else exposed_ring
    head = 3 * 2 * T * d.hidden * d.vocab / p / flops_rate
    compute_layer = fwd + bwd
    step = d.n_layer * (compute_layer + exposed) + head
    # MFU counts the model's FLOPs (the seed convention: causal-halved attention, its backward 2x its forward);
    # the flash backward's recompute of the scores (the 2.5x above) is time, not model FLOPs
    model_flops = (6 * T * d.params()
                   + d.n_layer * 3 * 4 * micro_batch * d.n_head * s_len * s_len * d.head_dim / 2 * window)
    return {
        "model": d.name, "p": p, "hardware": hw.name, "tokens": T, "sequence_parallel": sequence_parallel,
        "overlap": overlap,
        "compute_ms": 1e3 * (d.n_layer * compute_layer + head),
        "comm_ms": 1e3 * d.n_layer * comm,
        "exposed_ms": 1e3 * d.n_layer * exposed,
        "exposed_fraction": exposed / comm if comm > 0 else 0.0,
        "step_ms": 1e3 * step,
        "mfu": model_flops / p / (step * hw.bf16_tflops * 1e12),
        "layer": {"gemm_fwd_ms": 1e3 * (g_qkv + g_o + g_up + g_down), "attn_core_fwd_ms": 1e3 * attn_core,
                  "collective_ms": 1e3 * t_ag, "comm_ms": 1e3 * comm, "exposed_ms": 1e3 * exposed},
    }


def pipeline_bubble_fraction(p, m, virtual_stages=1):
    """The idle fraction of a pipeline-parallel step (llmkern.parallel.pipeline) on p stages with m micro-batches,
    the stages equally fast: (p - 1) / (m + p - 1) for GPipe or 1F1B. A micro-batch's forward and backward take
    t on each stage; the step takes (m + p - 1)·t (the first micro-batch reaches the last stage after p - 1
    forwards, the last one's gradient the first stage after p - 1 backwards), of which every rank works m·t
    (GPipe, Huang et al. 2018, section 2.2; Narayanan et al. 2021's bubble (p - 1) / m of the ideal time).
    1F1B leaves the same bubble; it bounds the activations in flight instead.

    virtual_stages=v > 1: interleaved 1F1B (Narayanan et al. 2021, section 2.2.2), each rank holding v chunks of
    1/v of its blocks, so the ramp-up and ramp-down are made of chunk passes of t/v: the bubble is (p - 1)·t/v
    against the same m·t of work, an idle fraction of (p - 1) / (v·m + p - 1) (the paper's bubble time fraction
    (1/v)·(p - 1)/m, taken of the whole step). Its price, not counted here: v times the stage-boundary P2P
    traffic. 0 for p = 1."""
    for name, v in (("p", p), ("m", m), ("virtual_stages", virtual_stages)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"pipeline_bubble_fraction: {name} must be a positive int, got {v!r}")
    if virtual_stages > 1 and m % p:  # (the schedule pipeline_parallelize refuses: no bubble to predict)
        raise ValueError(f"pipeline_bubble_fraction: interleaved 1F1B needs m a multiple of p, got m={m}, p={p}")
    return (p - 1) / (virtual_stages * m + p - 1)


def table(model="gpt3-175b", p=8, hardware=("H100", "A100"), micro_batches=(1, 4), **kw):
    """Markdown table: per GPU type, sequence parallelism and micro-batch, step time with plain
    collectives vs ring overlap and the exposed-communication fraction. hardware: one name (or Hardware) or a
    sequence of them; micro_batches: one int or a sequence."""
    if isinstance(hardware, (str, Hardware)):  # (a name was iterated letter by letter: KeyError 'H')
        hardware = (hardware,)
    if isinstance(micro_batches, numbers.Integral):
        micro_batches = (micro_batches,)
    taken = sorted({"micro_batch", "sequence_parallel", "overlap"} & set(kw))
    if taken:
        raise TypeError(f"cost_model.table: {taken[0]} is set by the table itself (its rows and columns), not an "
                        f"argument")
    for hw in hardware:
        _hardware(hw)
    lines = ["| GPU | SP | tokens | compute ms | comm ms | step ms, none | step ms, ring | exposed comm, ring | "
             "MFU none / ring |",
             "|---|---|---|---|---|---|---|---|---|"]
    for hw in hardware:
        for sp in (False, True):
            for b in micro_batches:
                n = predict(model, p, hw, micro_batch=b, sequence_parallel=sp, overlap="none", **kw)
                r = predict(model, p, hw, micro_batch=b, sequence_parallel=sp, overlap="ring", **kw)
                name = hw if isinstance(hw, str) else hw.name
                lines.append(f"| {name} | {'yes' if sp else 'no'} | {r['tokens']} | {r['compute_ms']:.0f} | "
                             f"{r['comm_ms']:.0f} | {n['step_ms']:.0f} | {r['step_ms']:.0f} | "
                             f"{r['exposed_fraction']:.2f} | {n['mfu']:.2f} / {r['mfu']:.2f} |")
    return "\n".join(lines)


ASSUMPTIONS = ("bf16; GEMMs at 70% of the dense peak (989 TFLOP/s H100, 312 A100), attention core at 50%; "
               "NVLink at 80% of half the bidirectional figure (900 / 600 GB/s) per direction, 10 us per ring "
               "step; overlapped GEMMs 5% slower (counted as exposed communication); one micro-batch of "
               "2048-token sequences, forward + backward, tensor parallelism only (no pipeline/data parallel, no recomputation); LM head vocab-parallel")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="tensor-parallel cost model")
    ap.add_argument("--model", default="gpt3-175b")
    ap.add_argument("-p", type=int, default=8)
    args = ap.parse_args()
    print(f"{args.model}, TP={args.p}: {ASSUMPTIONS}\n")
    print(table(args.model, args.p))
