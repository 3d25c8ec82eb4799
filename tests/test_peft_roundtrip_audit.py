"""PEFT <-> llmkern round trips found wanting in an audit: the task type written for encoder-decoder models, and a
PEFT LoRA on one fused HF module (GPT-2's c_attn) split over the zoo's q/k/v layers (its rank on the way back, its
gradients in training)."""
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


def _ids(B=2, T=6, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved to a temp dir (dropout off: training steps are compared)."""
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _zoo(path):
    from llmkern.models import from_hf

    return from_hf(path, backend="torch")


@pytest.fixture(scope="module")
def peft_c_attn(gpt2_dir, tmp_path_factory):
    """(adapter dir, the PEFT model) of a PEFT LoRA (r=4) on GPT-2's fused c_attn and on c_fc, random factors."""
    pm = peft.get_peft_model(_hf(gpt2_dir), peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8,
                                                            lora_dropout=0.0))
    randomize_lora(pm, seed=5, std=0.2)
    path = str(tmp_path_factory.mktemp("peft_c_attn"))
    pm.save_pretrained(path)
    return path, pm


def test_peft_c_attn_adapter_keeps_its_rank_through_the_zoo(gpt2_dir, peft_c_attn, tmp_path):
    """A PEFT c_attn LoRA of rank 4 loaded into the zoo GPT and saved back came out as a rank-12 block-diagonal LoRA
    (rank_pattern {c_attn: 12}): the same logits, but not the adapter PEFT wrote. It now comes back as PEFT's."""
    path, pm = peft_c_attn
    zoo = lp.load_peft_adapter(_zoo(gpt2_dir), path)
    lp.save_peft_adapter(zoo, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = load_file(f"{path}/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_hf(gpt2_dir), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, pm.eval()(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_zoo_training_step_on_a_peft_c_attn_adapter_gives_peft_gradients(gpt2_dir, peft_c_attn):
    """PEFT trains one A for all of c_attn's rows; the zoo's q/k/v each had a copy of it, each getting only its
    rows' gradient (and drifting apart). They now share it: dA is PEFT's, and so is the parameter count."""
    path, pm = peft_c_attn
    pm = copy.deepcopy(pm).train()
    zoo = lp.load_peft_adapter(_zoo(gpt2_dir), path).train()
    attn = zoo.h[0].attn
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A
    assert lp.count_trainable_parameters(zoo) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    x = _ids()
    pm(x, labels=x).loss.backward()
    zoo(x, labels=x)[1].backward()
    c_attn = pm.base_model.model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(attn.q_proj.lora_A.grad, c_attn.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    dB = torch.cat([attn.q_proj.lora_B.grad, attn.k_proj.lora_B.grad, attn.v_proj.lora_B.grad])
    torch.testing.assert_close(dB, c_attn.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_loading_separate_qkv_loras_into_tied_layers_unties_them(gpt2_dir, peft_c_attn, tmp_path):
    """Layers that share A after a PEFT c_attn load take a later adapter with their own A each (the shared
    Parameter would otherwise hold only the last one copied into it)."""
    zoo = lp.load_peft_adapter(_zoo(gpt2_dir), peft_c_attn[0])
    other = _zoo(gpt2_dir)
    lp.inject_lora(other, ["q_proj", "k_proj", "v_proj", "up_proj"], r=4, alpha=8)
    randomize_lora(other, seed=9, std=0.2)
    lp.save_peft_adapter(other, str(tmp_path))
    lp.load_peft_adapter(zoo, str(tmp_path))
    assert zoo.h[0].attn.q_proj.lora_A is not zoo.h[0].attn.k_proj.lora_A
    with torch.no_grad():
        torch.testing.assert_close(zoo(_ids()), other(_ids()), rtol=1e-5, atol=1e-5)


def _whisper():
    cfg = transformers.WhisperConfig(vocab_size=V, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, max_source_positions=12, max_target_positions=16,
                                     pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(cfg).eval()


def _t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("kind", ["whisper", "t5"])
def test_auto_task_type_of_encoder_decoder_models_loads_and_runs_in_peft(kind, tmp_path):
    """task_type="auto" wrote CAUSAL_LM for any model with prepare_inputs_for_generation, encoder-decoder ones
    included: PEFT then wrapped Whisper in PeftModelForCausalLM, whose forward passes input_ids=None along with
    the decoder's and failed ("got multiple values for keyword argument 'input_ids'"). Whisper (main input
    input_features) now gets None, a T5 SEQ_2_SEQ_LM, PEFT's own task for it."""
    base = _whisper() if kind == "whisper" else _t5()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, ["q_proj", "v_proj"] if kind == "whisper" else ["q", "v"], r=2, alpha=4)
    randomize_lora(ours, seed=2, std=0.2)
    first = torch.randn(2, 8, 24) if kind == "whisper" else _ids(T=5)
    inputs = {("input_features" if kind == "whisper" else "input_ids"): first, "decoder_input_ids": _ids(T=3) % 50 + 4}
    lp.save_peft_adapter(ours, str(tmp_path))
    want_task = None if kind == "whisper" else "SEQ_2_SEQ_LM"
    assert json.load(open(tmp_path / "adapter_config.json"))["task_type"] == want_task
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, ours(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_adapter_saved_from_a_transformers_model_names_its_base_model(gpt2_dir, tmp_path):
    """base_model_name_or_path was written as null unless passed: a PEFT adapter loaded into llmkern and saved
    again lost it, and peft.AutoPeftModelForCausalLM.from_pretrained(adapter) could not find its base model."""
    hf = _hf(gpt2_dir)
    lp.inject_lora(hf, ["c_attn"], r=2, alpha=4)
    randomize_lora(hf, seed=4, std=0.2)
    lp.save_peft_adapter(hf, str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["base_model_name_or_path"] == gpt2_dir
    back = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, hf(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_loading_into_a_peft_model_names_what_to_do(gpt2_dir, peft_c_attn):
    """load_peft_adapter(peft_model, path) said "module 'transformer.h.0.attn.c_attn' from the checkpoint is not in
    the model" (the PeftModel's names start with base_model.model.). It now says it is a PeftModel and how to load."""
    pm = peft.get_peft_model(_hf(gpt2_dir), peft.LoraConfig(target_modules=["c_fc"], r=2))
    with pytest.raises(ValueError, match=r"peft\.PeftModel.*load_adapter"):
        lp.load_peft_adapter(pm, peft_c_attn[0])
    with pytest.raises(ValueError, match=r"peft\.PeftModel.*save_pretrained"):  # (and saving one says so too)
        lp.save_peft_adapter(pm, "unused")
