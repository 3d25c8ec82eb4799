"""from_hf regressions found by auditing config keys against transformers 5.24 (tiny random checkpoints): a Gemma
config.json without pad_token_id means padding_idx 0, as the Gemma config classes default it (generate's pad
stays None, as transformers' generation config does)."""
import json

import pytest
import torch

from llmkern.testing import load_hf, save_tiny_hf

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

TINY = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=16)


@pytest.mark.parametrize("family", [("GemmaConfig", "GemmaForCausalLM"), ("Gemma2Config", "Gemma2ForCausalLM"),
                                    ("Gemma3TextConfig", "Gemma3ForCausalLM")])
def test_gemma_config_without_pad_token_id_keeps_padding_idx_zero(tmp_path, family):
    """The Gemma configs default pad_token_id to 0, so transformers' embedding has padding_idx 0 (its lookup gives
    row 0 no gradient) when config.json leaves the key out; from_hf took no padding row: other embedding gradients."""
    save_tiny_hf(tmp_path, *family, TINY)
    f = tmp_path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.pop("pad_token_id", None)
    f.write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)  # (generate's defaults then come from config.json)
    hf = getattr(transformers, family[1]).from_pretrained(str(tmp_path))
    m = load_hf(str(tmp_path))
    assert hf.model.embed_tokens.padding_idx == 0
    assert m.config.pad_token_id == m.embed_tokens.padding_idx == 0
    assert m.generation_config.pad_token_id == hf.generation_config.pad_token_id  # (None: transformers' generate
    # builds its config from the keys config.json has, not from the class default)
    x = torch.tensor([[0, 3, 0, 5]])
    m(x, labels=x)[1].backward()
    hf(x, labels=x).loss.backward()  # (the tied LM head still trains row 0, in both)
    torch.testing.assert_close(m.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", [("LlamaConfig", "LlamaForCausalLM"), ("GPT2Config", "GPT2LMHeadModel")])
def test_quantization_config_is_refused_by_name(tmp_path, family):
    """A checkpoint with a quantization_config loaded its float weights silently or failed on its unexpected keys
    without naming the config key (only the DeepSeek loaders refused it)."""
    save_tiny_hf(tmp_path, *family, dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    f = tmp_path / "config.json"
    cfg = json.loads(f.read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    f.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method='fp8'\)"):
        load_hf(str(tmp_path))
