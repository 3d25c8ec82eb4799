"""Parameter-efficient finetuning: LoRA and DoRA (on the fused llmkern.lora_linear op), bottleneck
adapters and prefix-tuning, with Hugging Face PEFT checkpoint interop.

    from llmkern.peft import inject_lora, save_peft_adapter, load_peft_adapter
    inject_lora(model, ["q_proj", "v_proj"], r=16, alpha=32, dropout=0.05)
    inject_lora(model, ["k_proj"], r=8, alpha=16, use_dora=True)  # DoRA: dora_linear, PEFT's semantics
    inject_lora(model, ["embed_tokens"], r=8, alpha=16)  # LoRAEmbedding: PEFT's LoRA on nn.Embedding
    inject_lora(model, ["conv1", "conv2"], r=8, alpha=16)  # LoRAConv: PEFT's LoRA on nn.Conv1d/2d/3d
    quantize_nf4(model); inject_lora(model, ["q_proj", "v_proj"])  # QLoRA: frozen 4-bit NF4Linear bases

Parameter counts follow the seed deck's formulas (llmkern.peft.counts).
"""
from llmkern.peft.adapter import Adapter, AdapterWrapper, add_adapters  # noqa: F401
from llmkern.peft.dora import dora_linear, dora_weight_norm  # noqa: F401
from llmkern.peft.checkpoint import load_peft_adapter, save_peft_adapter  # noqa: F401
from llmkern.peft.counts import (  # noqa: F401
    adapter_params,
    adapter_params_exact,
    lora_params,
    prefix_params,
    prefix_params_reparam,
)
from llmkern.peft.lora import (  # noqa: F401
    LoRALinear,
    count_trainable_parameters,
    inject_lora,
    lora_conv_modules,
    lora_embedding_modules,
    lora_modules,
    merge_lora,
    unmerge_lora,
)
from llmkern.peft.lora_conv import LoRAConv  # noqa: F401
from llmkern.peft.lora_embedding import LoRAEmbedding  # noqa: F401
from llmkern.peft.qlora import NF4Linear, nf4_dora_linear, quantize_nf4  # noqa: F401
from llmkern.peft.prefix import PrefixTuning, extend_kv, prefix_attention  # noqa: F401
