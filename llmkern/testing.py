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
