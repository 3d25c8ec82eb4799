"""The model zoo: GPT (GPT-2/GPT-3 family), Llama and NeoX (GPT-NeoX / Pythia, Phi-1/1.5/2), one readable file each.

    from llmkern.models import GPT, Llama, NeoX, get_config, build, from_hf
    model = GPT(get_config("gpt2"), backend="llmkern")   # or backend="torch"
    model = build("llama-tiny")                           # GPT, Llama or NeoX by config.arch
    model = build("pythia-70m")                           # a NeoX (its config: a NeoXConfig)
    model = from_hf("./checkpoint")                       # local GPT-2, Llama, Mistral, Qwen, Gemma, DeepSeek-V2/V3,
                                                          # Pythia, Phi

backend="llmkern" runs attention through llmkern.attention (and the KV-cache decode through
llmkern.attention_with_kvcache); backend="torch" uses plain PyTorch (SDPA, nn.Linear).
`model.backend = "torch"` switches an existing model.

Built on the meta device (no memory, no init), a model is materialised as torchtitan does:

    with torch.device("meta"):
        model = build("llama-tiny")
    model.to_empty(device="cuda")   # the RoPE buffers are computed again there; a tied head stays tied
    model.init_weights()            # the constructor's init (seed=: per parameter name, for pipeline stages)
    # or model.load_state_dict(sd), or load_state_dict(sd, assign=True) straight from meta
"""
from llmkern.models.configs import CONFIGS, ModelConfig, available_configs, get_config  # noqa: F401
from llmkern.models._attn import KVCache  # noqa: F401
from llmkern.models.gpt import GPT  # noqa: F401
from llmkern.models.llama import Llama  # noqa: F401
from llmkern.models.neox import NeoX, NeoXConfig  # noqa: F401
from llmkern.models.hf import from_hf  # noqa: F401

_CLASSES = {"gpt": GPT, "llama": Llama, "neox": NeoX}


def build(config, backend="llmkern", **overrides):
    """GPT, Llama or NeoX for a config (name, ModelConfig or NeoXConfig), chosen by config.arch."""
    cfg = get_config(config, **overrides)
    return _CLASSES[cfg.arch](cfg, backend=backend)
