"""PEFT adapters on the zoo's NeoX under transformers' names, where the layouts differ: GPT-NeoX's query_key_value
interleaves q, k and v per head ([q_h, k_h, v_h] rows for each head h), so PEFT's LoRA on it goes to the zoo's
q / k / v with each one's rows of B picked per head (one shared A), and the zoo's q / k / v LoRAs go back onto it
(PEFT's rank r when they share one A, else block-diagonal of rank r_q + r_k + r_v): equal logits both ways. Phi's
biased lm_head: PEFT saves its whole base layer when lm_head is targeted (base_layer.weight and base_layer.bias)
and loads both; so does load_peft_adapter."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmkern.peft import inject_lora, load_peft_adapter, save_peft_adapter
from llmkern.testing import TinyHFFamilies, load_hf

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
peft = pytest.importorskip("peft")

HF = TinyHFFamilies({"phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=2, qk_layernorm=True)),
                     "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict())},
                    dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32))
X = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return HF.save_all(tmp_path_factory.mktemp("neox_peft26"))


def _randomize_lora(model, seed=1):
    """PEFT's zero-initialised B would make every adapter a no-op: random factors so logits differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model):
    with torch.no_grad():
        out = model.eval()(X)
    return getattr(out, "logits", out)


def test_gpt_neox_query_key_value_lora_both_ways(saved, tmp_path):
    """Was: a ValueError "GPT-NeoX's query_key_value interleaves ..." both ways (and all-linear left q/k/v out)."""
    path, hf = saved["neox"]
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=6,
                                                                    target_modules=["query_key_value", "dense"]))
    _randomize_lora(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = load_peft_adapter(load_hf(path), str(tmp_path / "theirs"))
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    attn = ours.layers[1].self_attn
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A  # (PEFT's one A)
    # back as PEFT had it: rank 2 on query_key_value, B's rows in PEFT's interleaved order
    save_peft_adapter(ours, str(tmp_path / "back"))
    key = "base_model.model.gpt_neox.layers.1.attention.query_key_value.lora_B.weight"
    want = theirs.base_model.model.gpt_neox.layers[1].attention.query_key_value.lora_B["default"].weight
    torch.testing.assert_close(load_file(str(tmp_path / "back" / "adapter_model.safetensors"))[key], want.detach())

    # the zoo's own q / k / v LoRAs (own A's, ranks 2 and 3, v without LoRA) onto PEFT's query_key_value
    zoo = load_hf(path)
    inject_lora(zoo, ["q_proj", "mlp.up_proj"], r=2, alpha=4)
    inject_lora(zoo, ["k_proj"], r=3, alpha=3)
    _randomize_lora(zoo, seed=2)
    want = _logits(zoo)
    save_peft_adapter(zoo, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(back), want, rtol=1e-5, atol=1e-5)
    again = load_peft_adapter(load_hf(path), str(tmp_path / "ours"))  # (save_peft_adapter's record: own A's again)
    assert again.layers[0].self_attn.k_proj.r == 3 and not hasattr(again.layers[0].self_attn.v_proj, "lora_A")
    torch.testing.assert_close(_logits(again), want, rtol=1e-5, atol=1e-5)


def test_gpt_neox_all_linear_matches_peft(saved):
    """all-linear on the zoo's GPT-NeoX takes q / k / v (query_key_value in transformers), with one A."""
    path, hf = saved["neox"]
    ours = load_hf(path)
    names = inject_lora(ours, "all-linear", r=2)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules="all-linear"))
    hf_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    table = ours.hf_module_names()
    assert "layers.0.self_attn.v_proj" in names and {table[n].name for n in names} == hf_names
    attn = ours.layers[0].self_attn
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A


def _phi_adapter(hf, dest):
    """PEFT's LoRA on Phi's lm_head and q_proj, saved after a change to lm_head's base weight and bias (a resized
    or trained head: PEFT saves the base layer and loads it back)."""
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    _randomize_lora(theirs)
    head = theirs.base_model.model.lm_head.base_layer
    with torch.no_grad():
        head.bias.add_(0.5)
        head.weight.mul_(1.5)
    theirs.save_pretrained(str(dest))
    return theirs


def test_phi_lm_head_base_bias_loads_as_peft(saved, tmp_path):
    """Was: ValueError "unsupported key 'base_model.model.lm_head.base_layer.bias'"."""
    path, hf = saved["phi"]
    theirs = _phi_adapter(hf, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.bias" in keys
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a"))  # (PEFT loads the bias)
    ours = load_peft_adapter(load_hf(path), str(tmp_path / "a"))
    torch.testing.assert_close(ours.lm_head.base_layer.bias, theirs.base_model.model.lm_head.base_layer.bias)
    torch.testing.assert_close(_logits(ours), _logits(back), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)

    # a base bias that fits nothing: refused by key, the model left as it was
    def with_key(extra):
        file = tmp_path / "a" / "adapter_model.safetensors"
        save_file({**keys, **extra}, str(file))
        return str(tmp_path / "a")

    fresh = load_hf(path)
    head_bias = "base_model.model.lm_head.base_layer.bias"
    with pytest.raises(ValueError, match=r"lm_head\.base_layer\.bias has shape \(7,\), the layer's bias is \(61,\)"):
        load_peft_adapter(fresh, with_key({head_bias: torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"unsupported key base_model\.model\.model\.layers\.0\.mlp\.fc1\.base_layer"
                                         r"\.bias"):
        load_peft_adapter(fresh, with_key({"base_model.model.model.layers.0.mlp.fc1.base_layer.bias": torch.zeros(48)}))
    assert not hasattr(fresh.lm_head, "lora_A")
