"""Suite "mfu": training steps of zoo models, tokens/s and MFU, backend="llmkern" vs backend="torch".

One step = forward, backward, AdamW (fused on CUDA), on random tokens. On CUDA: bf16 autocast with
fp32 master weights; on CPU: fp32 and a tiny model (quick mode finishes in well under a minute).
FLOPs per token follow the seed deck (llmkern.flops.model_flops_per_token, "seed" convention:
6N + 6·L·T·d); MFU is reported against the detected device's peak (`mfu`, None on CPU) and against
the A100 peak (extra["mfu_a100"]); extra also holds the PaLM-convention MFU and the torch
backend's numbers. The LoRA row freezes the base model (LoRA r=16 on q_proj and v_proj, the LoRA
paper's choice): its model FLOPs are 4N + 6·L·T·d (no base weight gradients) + 6·N_lora. The MoE rows
(Mixtral-style sparse experts: llmkern.moe_mlp vs transformers' loop over experts) count the active
parameters, N = those one token runs through (k of the E experts), and run eager unless
LLMKERN_BENCH_COMPILE is set. The QLoRA row
is the same finetune over a 4-bit base: llmkern.peft.quantize_nf4 (every linear but lm_head, NF4,
blocksize 64, no double quantization) + inject_lora, against what PEFT users run: plain LoRA over
bitsandbytes Linear4bit (NF4) layers on the torch backend (without bitsandbytes: over llmkern's
NF4Linear, said in the notes); same FLOP count. On CUDA every row's extra holds the peak memory of one
step (torch.cuda.max_memory_allocated: weights, optimizer state, activations; "peak_mem_bytes" and
"torch_peak_mem_bytes"); on CPU they are None (not measured). The "train (recompute)" row is the plain
step with full activation recomputation on both backends (the zoo's gradient_checkpointing_enable): MFU
counts the model's FLOPs as every row does, extra["hfu"] / ["hfu_a100"] the hardware FLOPs (the
blocks' recomputed forward too: model_flops_per_token(recompute=True), Megatron-LM's count, the LM head not
recomputed), and the peak memory shows what recomputation saves.

Under torchrun (WORLD_SIZE > 1) the gpt2 step also runs data parallel (PyTorch's FSDP2,
fully_shard per block) and tensor parallel (llmkern.parallel.tensor_parallelize) over all ranks, and the
first MoE row expert parallel (llmkern.parallel.expert_parallelize: each rank its own batch and E/p whole
experts, the replicated gradients averaged by all_reduce_replicated_grads), and the first row pipeline
parallel (llmkern.parallel.pipeline_parallelize, 1F1B over m micro-batches, eager: one batch through p
stages); tokens/s and MFU are then per GPU (global tokens / world size), and every rank yields its rows.

LLMKERN_BENCH_COMPILE wraps both backends' models in torch.compile: "1" / "default" (Inductor),
"reduce-overhead" (Inductor and CUDA graphs: no host time per kernel launch, which is what bounds an
eager GPT-2 step on llmkern's ops), "max-autotune-no-cudagraphs", or "0" (eager). Unset: "default"
for CUDA runs that are not quick, eager otherwise. The rows then say which mode ran.
"""
import math
import os
import warnings

import torch
import torch.nn as nn

from llmkern import flops
from llmkern.bench.registry import Result, suite
from llmkern.bench.timing import time_fn
from llmkern.models import build, get_config


LORA_TARGETS, LORA_R, LORA_ALPHA = ("q_proj", "v_proj"), 16, 32


class _TorchLoRA(nn.Module):
    """Plain-PyTorch LoRA (what PEFT runs): W x + (alpha/r) · B A x, base frozen (a dense, bitsandbytes 4-bit
    or llmkern NF4 layer)."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        device = next(iter(list(base.parameters()) + list(base.buffers()))).device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scaling


def _torch_lora(model, targets, r, alpha, kinds=(nn.Linear,)):
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and n.rsplit(".", 1)[-1] in targets]
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, _TorchLoRA(model.get_submodule(n), r, alpha))
    return model


def _ours_lora(model, targets, r, alpha):
    try:
        from llmkern.peft import inject_lora
    except Exception as exc:  # not landed: same plain LoRA, said in the notes
        return _torch_lora(model, targets, r, alpha), f"llmkern.peft unavailable ({type(exc).__name__})"
    inject_lora(model, list(targets), r=r, alpha=alpha)
    return model, ""


def _bnb():
    """The bitsandbytes module, or None where it does not import (not installed, no binary for here)."""
    try:
        import bitsandbytes
    except Exception:
        return None
    return bitsandbytes


def _bnb_quantize(model, compute_dtype):
    """Every nn.Linear but lm_head -> bitsandbytes Linear4bit (NF4, blocksize 64, no double quantization),
    in place, as transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") does."""
    bnb = _bnb()
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or name.rsplit(".", 1)[-1] == "lm_head":
            continue
        q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=False, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(m.weight.detach(), requires_grad=False, compress_statistics=False,
                                     quant_type="nf4", blocksize=64)
        if m.bias is not None:
            q.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
        # moving a Params4bit quantizes it; train mode: in eval mode bnb repacks CPU weights for inference
        q = q.to(m.weight.device).train()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


def qlora_baseline():
    """(name, note) of the QLoRA row's baseline on this machine."""
    if _bnb() is not None:
        return "torch backend + plain LoRA on bitsandbytes Linear4bit (NF4)", ""
    return ("torch backend + plain LoRA on llmkern NF4Linear",
            "bitsandbytes not importable here: the baseline's 4-bit layers are llmkern NF4Linear (nf4_linear)")


def _qlora(model, backend, compute_dtype):
    """The QLoRA finetune of the module docstring on `model` (in place); returns (model, note)."""
    from llmkern.peft import NF4Linear, inject_lora, quantize_nf4

    if backend == "llmkern":
        quantize_nf4(model, double_quant=False)
        inject_lora(model, list(LORA_TARGETS), r=LORA_R, alpha=LORA_ALPHA)
        return model, ""
    if _bnb() is not None:
        return _torch_lora(_bnb_quantize(model, compute_dtype), LORA_TARGETS, LORA_R, LORA_ALPHA), ""
    quantize_nf4(model, double_quant=False)
    return _torch_lora(model, LORA_TARGETS, LORA_R, LORA_ALPHA, kinds=(nn.Linear, NF4Linear)), qlora_baseline()[1]


def _plan(device, quick):
    """(label, config, batch, seq, kind) rows for this device and mode (kind: False, "lora", "qlora" or
    "recompute": a plain training step with full activation recomputation);
    LLMKERN_BENCH_MFU_ROWS (comma-separated labels, e.g. "gpt3-1.3b") picks rows from every mode's list
    instead."""
    pick = os.environ.get("LLMKERN_BENCH_MFU_ROWS")
    if pick:
        rows = {(r[0], r[2], r[3], r[4]): r for r in _rows(device, quick=False) + _rows(device, quick=True)}
        wanted = [w.strip() for w in pick.split(",") if w.strip()]
        chosen = [r for w in wanted for r in rows.values() if r[0].split(" ")[0] == w]
        if not chosen:
            labels = sorted({r[0].split(" ")[0] for r in rows.values()})
            raise ValueError(f"LLMKERN_BENCH_MFU_ROWS: none of {wanted} is a row here; rows: {labels}")
        return chosen
    return _rows(device, quick)


def _rows(device, quick):
    if device.type != "cuda":
        tiny = get_config("gpt-tiny", n_layer=2, n_embd=128, n_head=4, block_size=128, vocab_size=512)
        tiny_l = get_config("llama-tiny", n_layer=2, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=352,
                            block_size=128, vocab_size=512)
        B, T = (2, 64) if quick else (4, 128)
        # (the QLoRA row on gpt-tiny: every in_features a multiple of 64, as bitsandbytes' CPU 4-bit needs)
        # sparse MoE: 4 experts of width 176, top-2 (the same active FFN width as llama-tiny's 352)
        tiny_moe = get_config("mixtral-tiny", n_layer=2, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=176,
                              block_size=128, vocab_size=512)
        rows = [("gpt-tiny (2L d128)", tiny, B, T, False), ("llama-tiny (2L d128 GQA)", tiny_l, B, T, False),
                ("mixtral-tiny (2L d128 E4 top-2)", tiny_moe, B, T, False),
                ("gpt-tiny (2L d128)", tiny, B, T, "lora"), ("gpt-tiny (2L d128)", tiny, B, T, "qlora"),
                ("gpt-tiny (2L d128)", tiny, B, T, "recompute")]
        if not quick:
            rows.insert(0, ("gpt2-124m", get_config("gpt2"), 1, 256, False))
        return rows
    # (quick keeps a Llama row, whose RMSNorm + residual, RoPE and SwiGLU run llmkern's fused ops, and a MoE row)
    rows = [("gpt2-124m", get_config("gpt2"), 8, 1024, False),
            ("gpt2-124m", get_config("gpt2"), 8, 1024, "lora"),
            ("gpt2-124m", get_config("gpt2"), 8, 1024, "qlora"),
            ("llama-350m", get_config("llama-350m"), 8, 1024, False),
            # Mixtral-style: llama-350m's width and attention, 12 layers of 8 experts (its FFN width), top-2:
            # 0.93B parameters, 0.31B active per token
            ("mixtral-12L-d1024-8e", get_config("mixtral-tiny", n_layer=12, n_embd=1024, n_head=16, n_kv_head=4,
                                                intermediate_size=2816, vocab_size=32000, block_size=2048,
                                                n_experts=8, n_experts_per_tok=2), 8, 1024, False),
            # (last: gpu_check's time limit cuts the suite from the end)
            ("gpt2-124m", get_config("gpt2"), 8, 1024, "recompute")]
    if not quick:
        rows += [("gpt3-1.3b", get_config("gpt3-1.3b"), 4, 1024, False)]
    return rows


def _world():
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist


def _parallelize(model, mode, device):
    """FSDP2 ("dp"), llmkern tensor parallel ("tp") or expert parallel ("ep", MoE models: each rank its own
    batch and E/p whole experts) over the default process group."""
    if mode == "dp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "h", None) or model.layers:
            fully_shard(block)
        fully_shard(model)
    elif mode == "tp":
        from llmkern.parallel import tensor_parallelize

        tensor_parallelize(model)
    elif mode == "ep":
        from llmkern.parallel import expert_parallelize

        expert_parallelize(model)
    return model


def pp_microbatches(batch, world):
    """The pipeline row's micro-batches: the most, up to 4 per stage, that divide the batch and feed 1F1B
    (m >= p); None when the batch has no such split."""
    return next((m for m in range(min(batch, 4 * world), world - 1, -1) if batch % m == 0), None)


def _step_fn(cfg, backend, batch, seq, kind, device, compile_, parallel=None):
    torch.manual_seed(0)  # same weights on every rank
    model = build(cfg, backend=backend).to(device)
    pipe = None
    if parallel == "pp":  # (eager: the stages run inside torch.distributed.pipelining's schedule)
        from llmkern.parallel import pipeline_parallelize

        world = torch.distributed.get_world_size()
        pipe = pipeline_parallelize(model, n_microbatches=pp_microbatches(batch, world), schedule="1f1b")
        compile_ = None
    elif parallel:
        model = _parallelize(model, parallel, device)
    note = ""
    if kind == "qlora":  # bnb's compute dtype: the dtype the step computes in (bf16 autocast on CUDA)
        model, note = _qlora(model, backend, torch.bfloat16 if device.type == "cuda" else torch.float32)
    elif kind == "recompute":
        model.gradient_checkpointing_enable()  # (both backends: the same recomputation)
    elif kind:
        if backend == "llmkern":
            model, note = _ours_lora(model, LORA_TARGETS, LORA_R, LORA_ALPHA)
        else:
            model = _torch_lora(model, LORA_TARGETS, LORA_R, LORA_ALPHA)
    if kind in FINETUNE:
        model.to(device)
    opt = model.configure_optimizer(lr=1e-4)
    data = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    fwd = model if not compile_ else torch.compile(model, mode=None if compile_ == "default" else compile_)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _Null()

    def step():
        if pipe is not None:  # forward and backward of every micro-batch, through every stage
            with amp:
                pipe.step(data, data)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        with amp:
            _, loss = fwd(data, labels=data)
        loss.backward()
        if parallel == "ep":  # the replicated weights' data-parallel mean (DDP's job elsewhere)
            from llmkern.parallel import all_reduce_replicated_grads

            all_reduce_replicated_grads(model, op="mean")
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad) if kind in FINETUNE else 0
    return step, n_lora, note


def _measure(cfg, backend, batch, seq, kind, device, compile_, parallel, quick):
    """(median ms, n_lora, note, peak bytes) of one backend's step; the model is freed on return. The peak
    (CUDA only, None elsewhere) is that of one steady-state step, measured apart from the timing (the
    timer's own buffers are not the step's)."""
    step, n_lora, note = _step_fn(cfg, backend, batch, seq, kind, device, compile_, parallel)
    peak = None
    if device.type == "cuda":
        step()  # (the first step makes the optimizer state, and compiles)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return time_fn(step, device=device, quick=quick), n_lora, note, peak


def _measure_or_eager(args, quick, notes):
    """_measure(*args, quick); torch.compile trouble: measured eagerly, and said so in `notes`."""
    cfg, backend, batch, seq, kind, device, compile_, parallel = args
    try:
        return _measure(*args, quick)
    except Exception as exc:
        if not compile_ or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        notes.append(f"{backend}: torch.compile failed ({type(exc).__name__}), eager")
    # (outside the except block: the failed model, held by the traceback, is freed first)
    return _measure(cfg, backend, batch, seq, kind, device, False, parallel, quick)


def _finetune_notes(kind, peaks):
    """The notes a (Q)LoRA row starts with: its FLOP convention, its base, its peak memory (CUDA)."""
    notes = ["MFU counts 4N + 6LTd + 6N_lora FLOPs/token (frozen base: no weight gradients)"]
    if kind == "qlora":
        notes.append(f"NF4 base (blocksize 64, no double quant) on all linears but lm_head; LoRA r={LORA_R} on "
                     f"{'/'.join(LORA_TARGETS)}")
    if peaks.get("llmkern") is not None:
        other = f" vs {peaks['torch'] / 2 ** 30:.2f} GiB baseline" if peaks.get("torch") is not None else ""
        notes.append(f"peak memory of a step {peaks['llmkern'] / 2 ** 30:.2f} GiB{other}")
    return notes


_KIND = {False: "train", True: "LoRA finetune", "lora": "LoRA finetune", "qlora": "QLoRA finetune",
         "recompute": "train (recompute)"}
FINETUNE = (True, "lora", "qlora")
_PARALLEL_LABEL = {"dp": "FSDP2 dp", "tp": "llmkern TP tp", "ep": "llmkern EP ep", "pp": "llmkern PP pp"}


def _baseline_name(kind):
    if kind == "qlora":
        return qlora_baseline()[0]
    return "torch backend" + (" + plain LoRA" if kind in FINETUNE else " (recompute)" if kind else "")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _model_flops(cfg, seq, kind, n_lora, convention):
    f = flops.model_flops_per_token(cfg, seq, convention)
    if kind in FINETUNE:  # frozen base: no weight gradients (2N of the 6N), plus the LoRA weights' 6·N_lora
        f = f - 2 * flops.matmul_params(cfg) + 6 * n_lora
    return f


def _moe_note(cfg):
    p = flops.param_counts(cfg)
    return (f"MoE: MFU counts the active parameters, k={cfg.n_experts_per_tok} of E={cfg.n_experts} experts per "
            f"token (6N_active + 6LTd; {p['active'] / 1e6:.3g}M active of {p['total'] / 1e6:.3g}M)")


def _moe_compile(compile_):
    """(compile mode, note) of an MoE row: eager unless LLMKERN_BENCH_COMPILE asks for a mode (the torch
    backend's loop over experts has data-dependent shapes; compiled, it runs every expert on every token)."""
    if os.environ.get("LLMKERN_BENCH_COMPILE") is None:
        return None, "; eager (the torch baseline is transformers' loop over experts)" if compile_ else ""
    if compile_:
        return compile_, "; torch baseline compiled: every expert on every token (E/k x its expert FLOPs)"
    return None, ""


COMPILE_MODES = {"0": None, "1": "default", "default": "default", "reduce-overhead": "reduce-overhead",
                 "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}


def compile_mode(device, quick):
    """The torch.compile mode of the steps (None: eager), from LLMKERN_BENCH_COMPILE."""
    env = os.environ.get("LLMKERN_BENCH_COMPILE")
    if env is None:
        return "default" if device.type == "cuda" and not quick else None
    if env.strip() not in COMPILE_MODES:
        raise ValueError(f"LLMKERN_BENCH_COMPILE must be one of {sorted(COMPILE_MODES)}, got {env!r}")
    return COMPILE_MODES[env.strip()]


@suite("mfu", "training step (fwd+bwd+AdamW) of zoo models: tok/s and MFU, llmkern vs torch backend")
def run(ctx):
    device = torch.device(ctx.device)
    compile_ = compile_mode(device, ctx.quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prec = "bf16" if device.type == "cuda" else "fp32"
    dev_name = flops.detect_device(device)
    plan = [row + (None,) for row in _plan(device, ctx.quick)]
    dist = _world()
    world = dist.get_world_size() if dist is not None else 1
    if dist is not None:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        first = plan[0]
        moe = next((r for r in plan if r[1].n_experts and r[1].n_experts % world == 0 and not r[4]), None)
        pp = [first[:-1] + ("pp",)] if pp_microbatches(first[2], world) and first[1].n_layer >= world else []
        plan = [first[:-1] + ("dp",), first[:-1] + ("tp",)] + ([moe[:-1] + ("ep",)] if moe else []) + pp + plan
    for label, cfg, batch, seq, kind, parallel in ctx.progress(plan, desc="mfu"):
        times, notes = {}, []
        n_lora = 0
        peaks = {}
        row_compile = compile_
        if cfg.n_experts:
            row_compile, note = _moe_compile(compile_)
            notes.append(_moe_note(cfg) + note)
        for backend in ("llmkern", "torch"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    args = (cfg, backend, batch, seq, kind, device, row_compile, parallel)
                    times[backend], n_lora_b, note, peaks[backend] = _measure_or_eager(args, ctx.quick, notes)
                except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as exc:
                    if parallel is None and not isinstance(exc, torch.cuda.OutOfMemoryError):
                        raise
                    times[backend], peaks[backend] = None, None
                    notes.append(f"{backend}: {type(exc).__name__}: {str(exc)[:120]}")
                    note = ""
                    n_lora_b = 0
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if backend == "llmkern":
                n_lora = n_lora_b
            if note:
                notes.append(note)
            for w in caught:
                if "llmkern" in str(w.message):
                    notes.append(str(w.message).split(";")[-1].strip())
        if times.get("llmkern") is None:
            continue
        if kind in FINETUNE:
            notes = _finetune_notes(kind, peaks) + notes
        if device.type == "cuda" and dev_name is None:
            notes.append(f"unknown GPU {torch.cuda.get_device_name(device)!r}: no peak, MFU only vs A100 (extra)")
        # per GPU: data (and expert) parallel process `world` batches per step, tensor and pipeline parallel one
        tokens = batch * seq if parallel not in ("tp", "pp") else batch * seq / world
        if parallel == "pp":
            m = pp_microbatches(batch, world)
            notes.append(f"1F1B over {m} micro-batches of {batch // m}: bubble "
                         f"{(world - 1) / (m + world - 1):.0%} of the step (cost_model.pipeline_bubble_fraction)")
        tok_s = tokens / (times["llmkern"] / 1e3)
        fpt = _model_flops(cfg, seq, kind, n_lora, "seed")
        fpt_palm = _model_flops(cfg, seq, kind, n_lora, "palm")
        a100 = flops.peak("a100", prec)
        dev_peak = flops.device_peak(device, prec)
        extra = {"mfu_a100": flops.mfu(tok_s, fpt, a100),
                 "mfu_a100_palm": flops.mfu(tok_s, fpt_palm, a100),
                 "flops_per_token": fpt, "tflops": tok_s * fpt / 1e12, "device_peak": dev_name,
                 "params": flops.param_counts(cfg)["total"], "active_params": flops.param_counts(cfg)["active"],
                 "compiled": row_compile,
                 "peak_mem_bytes": peaks.get("llmkern"), "torch_peak_mem_bytes": peaks.get("torch")}
        if kind in FINETUNE:
            extra["lora_params"] = n_lora
        if kind == "recompute":  # hardware FLOPs: the blocks' recomputed forward counted (MFU does not count it)
            hw = flops.model_flops_per_token(cfg, seq, "seed", recompute=True)
            extra["hardware_flops_per_token"] = hw
            extra["hfu_a100"] = flops.mfu(tok_s, hw, a100)
            extra["hfu"] = flops.mfu(tok_s, hw, dev_peak) if dev_peak else None
            notes.append("full activation recomputation (gradient_checkpointing_enable), both backends; HFU "
                         f"{extra['hfu_a100']:.1%} of the A100 peak")
        if times.get("torch"):
            t_tok_s = tokens / (times["torch"] / 1e3)
            extra["torch_tok_s"] = t_tok_s
            extra["torch_mfu_a100"] = flops.mfu(t_tok_s, fpt, a100)
            if dev_peak:
                extra["torch_mfu"] = flops.mfu(t_tok_s, fpt, dev_peak)
        yield Result(
            op=f"{label} {_KIND[kind]} step"
               + (f" ({_PARALLEL_LABEL[parallel]}={world}, per GPU)" if parallel else ""),
            shape=f"B={batch} T={seq} {'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}"
                  + (f" torch.compile({row_compile})" if row_compile else ""),
            ours_ms=times["llmkern"], baseline=_baseline_name(kind),
            baseline_ms=times.get("torch"), throughput=tok_s, unit="tok/s",
            mfu=flops.mfu(tok_s, fpt, dev_peak) if dev_peak else None,
            notes="; ".join(dict.fromkeys(notes)), extra=extra)
