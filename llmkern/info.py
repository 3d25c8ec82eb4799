"""`python -m llmkern.info`: versions, what llmkern._C contains, the device, and the backend each op
dispatches to on this machine."""
import importlib
import os

import torch

from llmkern import _backend

# Modules that register their op's dispatch with _backend.register_op when imported.
_OP_MODULES = ("llmkern.ops.sampling", "llmkern.ops.attention", "llmkern.ops.lora", "llmkern.ops.cross_entropy")
_OP_MODULES += ("llmkern.ops.norm",)
_OP_MODULES += ("llmkern.ops.rope", "llmkern.ops.swiglu", "llmkern.ops.nf4", "llmkern.ops.moe", "llmkern.ops.mla_decode",
                 "llmkern.ops.merge_attention_states")


def collect():
    info = {"llmkern": importlib.import_module("llmkern").__version__, "torch": torch.__version__,
            "torch CUDA": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    ext = _backend.extension()
    if ext is None:
        info["llmkern._C"] = f"not built ({_backend.extension_error()})"
    else:
        kernels = []
        for op in ("llmkern::sample", "llmkern::top_k_top_p_filter", "llmkern::top_logprobs"):
            keys = [k for k in ("CPU", "CUDA") if _backend.has_kernel(op, k)]
            kernels.append(f"{op.split('::')[1]} [{', '.join(keys)}]")
        info["llmkern._C"] = f"{ext.__file__}: " + "; ".join(kernels)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        cap = torch.cuda.get_device_capability()
        info["device"] = f"cuda: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    else:
        dev = torch.device("cpu")
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    info["LLMKERN_BACKEND"] = os.environ.get("LLMKERN_BACKEND", "(unset)")
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "(unset)")
    for mod in _OP_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            info[f"import {mod}"] = f"failed: {exc}"
    info["TMA kernels (attention, LoRA)"] = _tma_status(dev)
    info["launch front (autotuned kernels)"] = ("off (LLMKERN_FAST_LAUNCH=0)" if os.environ.get("LLMKERN_FAST_LAUNCH") == "0"
                                                else "on")
    try:
        from llmkern.ops.lora import fused_min_mnk

        info["LoRA fused from M*N*K"] = (f"{fused_min_mnk()} on CUDA in eager (smaller layers: cuBLAS "
                                         f"composition; LLMKERN_LORA_FUSED_MIN_MNK)")
    except (ImportError, ValueError) as exc:
        info["LoRA fused from M*N*K"] = f"error: {exc}"
    try:
        from llmkern.kernels.nf4 import fused_max_m

        info["NF4 GEMM in-loop dequant"] = (f"up to {fused_max_m()} rows (more: dequantize W first, then the dense "
                                            f"GEMM; LLMKERN_NF4_FUSED_MAX_M)")
    except (ImportError, ValueError) as exc:
        info["NF4 GEMM in-loop dequant"] = f"error: {exc}"
    for op, fn in sorted(_backend.OP_DISPATCH.items()):
        try:
            info[f"op {op}"] = fn(dev, torch.float16 if dev.type == "cuda" else torch.float32)
        except Exception as exc:  # report, never crash the report
            info[f"op {op}"] = f"error: {exc}"
    return info


def _tma_status(dev):
    """Whether the sm_90+ tensor-descriptor kernels would run for fp16/bf16 calls here, and why not."""
    switches = {"LLMKERN_ATTN_TMA": os.environ.get("LLMKERN_ATTN_TMA", "1"),
                "LLMKERN_LORA_TMA": os.environ.get("LLMKERN_LORA_TMA", "1")}
    off = [k for k, v in switches.items() if v == "0"]
    try:
        from llmkern.kernels import _tma
    except ImportError as exc:
        return f"off (Triton not importable: {exc})"
    if _tma.TensorDescriptor is None:
        return "off (this Triton has no host tensor descriptors)"
    if dev.type != "cuda":
        forced = [k for k, v in switches.items() if v == "force"]
        if forced and os.environ.get("TRITON_INTERPRET") == "1":
            return f"on under the interpreter ({', '.join(forced)}=force; no CUDA device)"
        return "off (no CUDA device)" + ("; LLMKERN_*_TMA=force runs them under the interpreter" if not off else "")
    cap = torch.cuda.get_device_capability(dev)
    if cap < (9, 0):
        return f"off (sm_{cap[0]}{cap[1]}: needs sm_90+)"
    return "on" + (f", except {', '.join(off)}=0" if off else "")


def main():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
