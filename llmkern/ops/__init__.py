"""Public ops: one module per op (validation, registration, dispatch, autograd).

`import llmkern` registers the sampling ops only; the others register their torch.ops.llmkern.*
entries when first used (importing Triton costs seconds). `register_all()` registers every op at
once: call it before torch.export.load / torch.ops.llmkern lookups in a fresh process.
speculative_accept is plain PyTorch (no custom op to register) and light to import."""
from llmkern.ops.speculative import speculative_accept  # noqa: F401


def register_all():
    """Import every op module, registering all torch.ops.llmkern.* custom ops."""
    from llmkern.ops import attention, cross_entropy, lora, merge_attention_states, mla_decode, sampling  # noqa: F401
    from llmkern.ops import norm  # noqa: F401
    from llmkern.ops import rope, swiglu  # noqa: F401
