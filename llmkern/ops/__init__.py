"""Public ops: one module per op (validation, registration, dispatch, autograd).

`import llmkern` registers the sampling ops only; the others register their torch.ops.llmkern.*
entries when first used (importing Triton costs seconds). `register_all()` registers every op at
once: call it before torch.export.load / torch.ops.llmkern lookups in a fresh process.
speculative_accept is plain PyTorch (no custom op to register) and light to import."""
from llmkern.ops.speculative import speculative_accept  # noqa: F401


def register_all():
    """Import every op module, registering all torch.ops.llmkern.* custom ops (every module of this package:
    a list by hand had left MoE's out)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
