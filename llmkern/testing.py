"""Helpers shared by the tests: devices, dtypes, tolerances and comparison against references."""
import os

import torch

# Tolerances for comparing a kernel in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


def triton_device():
    """Where Triton kernels run in this process: "cuda", or "cpu" under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "cpu"
    return None


def interpreter_dtypes():
    """Dtypes the Triton kernels can be tested in here (the interpreter has no bfloat16)."""
    if torch.cuda.is_available():
        return [torch.float16, torch.bfloat16, torch.float32]
    return [torch.float32, torch.float16]


def assert_close(actual, expected, dtype=None, msg="", **overrides):
    """Compare `actual` with a (usually float64) reference, with tolerances for `dtype`."""
    dtype = dtype or actual.dtype
    tol = dict(TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
    tol.update(overrides)
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               msg=lambda m: f"{msg}\n{m}" if msg else m, **tol)


def max_abs_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def tiny_hf_llama(seed=0, vocab=64, hidden=32, layers=2, heads=4):
    """A tiny random transformers LlamaForCausalLM (float32, eager attention, eval mode): the PEFT and
    integration tests' model. Imports transformers when called."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=64, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def save_tiny_hf(path, config_cls, model_cls, config, seed=0, router_std=None):
    """A tiny random transformers model (`config_cls` / `model_cls` names in transformers, `config` its
    keyword arguments) saved to `path` and returned (eval mode, no eos). Norm gains and biases are random
    so that a loading mix-up shows; router_std: MoE routers (``mlp.gate``) drawn with this std, large enough
    for decisive top-k choices (no near-ties that rounding could flip)."""
    import transformers

    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif router_std is not None and n.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
    hf.save_pretrained(path)
    return hf
