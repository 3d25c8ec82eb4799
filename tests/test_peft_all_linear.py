"""inject_lora(model, "all-linear") against PEFT's LoraConfig(target_modules="all-linear"), and the other gaps of the
PEFT round-trip audit: list targets LoRA cannot wrap, mixed dropouts on save, disabled layers on load."""
import copy
import json
import warnings

import pytest
import torch

from llmkern import peft as lp
from llmkern.testing import randomize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61


def _ids(B=2, T=5):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=V)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{arch: (the HF model, its saved dir, PEFT's all-linear PeftModel on it)}."""
    out = {}
    for arch, make in (("gpt2", _gpt2), ("llama", _llama)):
        torch.manual_seed(1)
        model = make().eval()
        path = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (PEFT: "fan_in_fan_out is set to False but the target module is Conv1D")
            pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=2))
        out[arch] = (model, path, pm)
    return out


def _peft_targets(pm):
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["hf", "zoo"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_all_linear_targets_peft_modules_and_saves_peft_adapter(bases, arch, kind, tmp_path):
    """"all-linear" was refused ("matched no nn.Linear"). It now wraps the layers PEFT's all-linear wraps (every
    linear / Conv1D but the LM head; on a zoo model the layers of its transformers twin, GPT-2's c_attn as q/k/v
    sharing one A): as many trainable parameters as PEFT's, and save_peft_adapter writes PEFT's adapter (same keys
    and shapes, one rank) which PEFT loads with the same logits."""
    from llmkern.models import from_hf

    hf, path, pm = bases[arch]
    model = copy.deepcopy(hf) if kind == "hf" else from_hf(path, backend="torch")
    names = lp.inject_lora(model, "all-linear", r=2)
    if kind == "hf":
        assert sorted(names) == _peft_targets(pm)
    else:
        twin = model.hf_module_names()
        assert sorted({twin[n].name for n in names}) == _peft_targets(pm)
    assert lp.count_trainable_parameters(model) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    randomize_lora(model, seed=2, std=0.3)
    lp.save_peft_adapter(model, str(tmp_path))
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["r"] == 2 and config["rank_pattern"] == {}
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = {k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, _logits(model.eval()(_ids())), rtol=1e-5, atol=1e-5)


def test_all_linear_skips_layers_with_lora_and_the_output_layer(bases):
    """Layers already carrying LoRA (and their insides) are not targeted again, nor is the LM head (PEFT's rule)."""
    model = copy.deepcopy(bases["llama"][0])
    lp.inject_lora(model, ["q_proj"], r=2)
    names = lp.inject_lora(model, "ALL-LINEAR", r=2)
    want = ["down_proj", "gate_proj", "k_proj", "o_proj", "up_proj", "v_proj"]
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == want


@pytest.mark.parametrize("targets, what", [(["q_proj", "mlp"], r"model\.layers\.0\.mlp, a LlamaMLP"),
                                           (["q_proj", "model.norm"], r"model\.norm, a LlamaRMSNorm")],
                         ids=["block", "norm"])
def test_listed_target_lora_cannot_wrap_is_refused(bases, targets, what):
    """A listed name that matched a module LoRA cannot wrap was skipped without a word (only q_proj got LoRA; PEFT
    raises "Target module ... is not supported"). It now raises, naming the module and its type, and leaves the model
    unchanged; a regex string still selects the layers LoRA takes among its matches."""
    model = copy.deepcopy(bases["llama"][0])
    with pytest.raises(ValueError, match=what):
        lp.inject_lora(model, targets, r=2)
    assert not lp.lora_modules(model)
    assert len(lp.inject_lora(model, r".*\.(q_proj|mlp)", r=2)) == 1


def test_mixed_dropouts_warn_naming_the_layers(bases, tmp_path):
    """PEFT's config has one lora_dropout (and no per-module pattern): with layers of several dropouts the most common
    was written silently. It is still written, with a warning naming the layers that will load with another value;
    an embedding's dropout (which LoRAEmbedding, as PEFT, ignores) does not count."""
    model = copy.deepcopy(bases["llama"][0])
    lp.inject_lora(model, ["q_proj", "k_proj"], r=2, dropout=0.1)
    lp.inject_lora(model, ["v_proj"], r=2, dropout=0.2)
    lp.inject_lora(model, ["embed_tokens"], r=2, dropout=0.3)
    with pytest.warns(UserWarning, match=r"lora_dropout.*0\.1.*0\.2: model\.layers\.0\.self_attn\.v_proj") as rec:
        lp.save_peft_adapter(model, str(tmp_path))
    assert not any("embed_tokens" in str(w.message) for w in rec)
    assert json.load(open(tmp_path / "adapter_config.json"))["lora_dropout"] == 0.1
    lp.inject_lora(other := copy.deepcopy(bases["llama"][0]), ["q_proj", "embed_tokens"], r=2, dropout=0.1)
    lp.lora_embedding_modules(other)[0][1].dropout = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.save_peft_adapter(other, str(tmp_path))


def test_tensor_parallel_layers_do_not_count_for_the_dropout(bases, tmp_path, monkeypatch):
    """Tensor-parallel LoRA layers have no dropout (their records say 0.0, not a choice): two of them outvoted the
    one LoRALinear's 0.1. They no longer count (stand-ins for the gathered shards here: no process group)."""
    from types import SimpleNamespace

    from llmkern.peft import checkpoint

    model = copy.deepcopy(bases["llama"][0])
    lp.inject_lora(model, ["q_proj"], r=2, dropout=0.1)
    sharded = copy.deepcopy(bases["llama"][0])
    lp.inject_lora(sharded, ["k_proj", "v_proj"], r=2)
    records = [(n, SimpleNamespace(r=2, alpha=8.0, scaling=4.0, use_rslora=False, dropout=0.0, merged=False,
                                   lora_A=m.lora_A, lora_B=m.lora_B, use_dora=False, lora_magnitude_vector=None,
                                   conv1d=False)) for n, m in lp.lora_modules(sharded)]
    monkeypatch.setattr(checkpoint, "_parallel_lora", lambda model, use_rslora: (records, True, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.save_peft_adapter(model, str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["lora_dropout"] == 0.1


def test_loading_an_adapter_enables_disabled_layers(bases, tmp_path):
    """A LoRA layer switched off (disabled=True, PEFT's disable_adapters) stayed off when an adapter was loaded into
    it: the model gave the base model's logits, not the adapter's, unlike the same load into a plain model. A loaded
    layer is now enabled (the model is the checkpoint's, whatever LoRA it carried before)."""
    base = bases["llama"][0]
    src = copy.deepcopy(base)
    lp.inject_lora(src, ["q_proj", "embed_tokens"], r=2)
    randomize_lora(src, seed=3, std=0.3)
    lp.save_peft_adapter(src, str(tmp_path))
    dst = copy.deepcopy(base)
    lp.inject_lora(dst, ["q_proj", "embed_tokens"], r=2)
    for _, m in lp.lora_modules(dst) + lp.lora_embedding_modules(dst):
        m.disabled = True
    lp.load_peft_adapter(dst, str(tmp_path))
    assert not any(m.disabled for _, m in lp.lora_modules(dst) + lp.lora_embedding_modules(dst))
    with torch.no_grad():
        torch.testing.assert_close(dst(_ids()).logits, src(_ids()).logits, rtol=1e-5, atol=1e-5)
