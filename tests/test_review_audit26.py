"""Review of the second wave (meta-device zoo models, init_weights).

init_weights(seed=N) draws each parameter from a generator seeded by N and the parameter's name, so that a
model's weights are the same however it is split (pipeline stages). A LoRA / DoRA wrapper moves a layer's weight
to `<name>.base_layer.weight`: was, the seed came from that name, so a wrapped layer got other weights than the
plain model's, and a tied LM head wrapped by LoRA missed the tie's name mapping (the tied weight took the head's
draw on an unsplit model, the embedding's on a pipeline's first stage: the two stages' copies differed)."""
import pytest
import torch

from llmkern.models import build, get_config
from llmkern.peft import inject_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["llama-tiny", "gpt-tiny"])
def test_init_weights_refuses_adapters_and_seeds_look_through_wrappers(name):
    """init_weights on a model holding adapters raises (their inits, e.g. DoRA's magnitude from the base weight,
    would no longer hold: initialise first, then add them); the seed a parameter draws from looks through a
    wrapper's `.base_layer` (the name-seeded draw of a wrapped layer, and a wrapped tied head's mapping to the
    embedding's name, equal the plain model's)."""
    cfg = get_config(name, tie_embeddings=True)
    plain = build(cfg, backend="torch").init_weights(seed=7)
    wrapped = build(cfg, backend="torch")
    targets = ["q_proj", "lm_head"] if name == "llama-tiny" else ["q_proj", "up_proj", "lm_head"]
    assert inject_lora(wrapped, targets, r=2, use_dora=True)
    with pytest.raises(ValueError, match="init_weights: the model holds adapter modules .*LoRALinear"):
        wrapped.init_weights(seed=7)
    with torch.no_grad():  # the name-seeded draw, as init_weights makes it, of every wrapped weight
        for key, prm in wrapped.named_parameters():
            if "lora_" not in key and key.endswith("base_layer.weight"):
                wrapped._normal_(prm, 0.02, 7, key)
    want = plain.state_dict()
    got = wrapped.state_dict()
    for key, value in got.items():
        if key.endswith("base_layer.weight") and not key.startswith("lm_head"):  # (tied: the embedding's)
            assert torch.equal(value, want[key.replace(".base_layer", "")]), key
    emb = wrapped.wte if name == "gpt-tiny" else wrapped.embed_tokens
    assert wrapped.lm_head.base_layer.weight is emb.weight
