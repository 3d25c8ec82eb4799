"""GPT-NeoX / Phi (llmkern.models.NeoX) across the rest of the library: llmkern.memory's estimate equals what
autograd saves in the zoo's NeoX blocks (torch backend, float32) and its parameter split matches the model's own
parameters; the tensor-parallel cost model reads a NeoXConfig; context_parallelize refuses NeoX by name; PEFT
adapters on PhiForCausalLM load onto the zoo's Phi (equal logits) and the zoo's load in PEFT; GPT-NeoX's
per-head interleaved query_key_value is refused with a ValueError naming the module (the zoo's names still work)."""
import copy

import pytest
import torch

from llmkern.memory import saved_activation_bytes, stage_params, training_memory
from llmkern.models import build, get_config
from llmkern.peft import inject_lora, load_peft_adapter, save_peft_adapter
from llmkern.testing import TinyHFFamilies, load_hf

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

# (NeoXConfig options): Pythia's parallel block with partial RoPE; the sequential block with every dropout and
# eager attention (SDPA's math path keeps the scores); Phi: shared norm, q/k LayerNorms, GQA, the head's bias,
# tied, full RoPE
VARIANTS = [
    (dict(), True),
    (dict(parallel_residual=False, resid_dropout=0.1, embd_dropout=0.1, attn_dropout=0.1, rotary_dim=0), False),
    (dict(family="phi", shared_norm=True, qk_layernorm=True, n_kv_head=2, lm_head_bias=True, tie_embeddings=True,
          rotary_dim=16), True),
]


@pytest.mark.parametrize("options,flash", VARIANTS)
def test_activation_estimate_equals_what_autograd_saves(options, flash):
    """Byte for byte, as tests/test_memory.py checks GPT and Llama: training_memory counted NeoX blocks with
    GPT's / Llama's fields (a NeoXConfig has none of them: AttributeError before)."""
    cfg = get_config("neox-tiny", **options)
    torch.manual_seed(0)
    model = build(cfg, backend="torch").train()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    got = saved_activation_bytes(model, ids, ids)
    est = training_memory(cfg, 2, 32, dtype="fp32", impl="torch", mask_bytes=4, flash_attention=flash, loss="torch")
    assert got == est.activations, (got, est.activations, est.terms())


def _per_gpu(model, tp):
    """Parameters one tensor-parallel rank holds, from the model's own parameters: LayerNorms and row-parallel
    biases replicated, every other tensor (embedding and head vocabulary-parallel) split tp ways."""
    n = 0
    for name, p in model.named_parameters():
        replicated = "norm" in name or name.endswith(("o_proj.bias", "down_proj.bias"))
        n += p.numel() if replicated else p.numel() / tp
    return n


@pytest.mark.parametrize("options", [dict(), dict(family="phi", shared_norm=True, qk_layernorm=True,
                                                  lm_head_bias=True, tie_embeddings=True)])
def test_stage_params_and_model_states(options):
    cfg = get_config("neox-tiny", **options)
    model = build(cfg, backend="torch")
    total = sum(p.numel() for p in model.parameters())
    assert stage_params(cfg) == total
    assert stage_params(cfg, tp=2) == _per_gpu(model, 2)
    V, d = cfg.vocab_size, cfg.n_embd
    head = V * d + (V if cfg.lm_head_bias else 0)
    # two stages: the halves, plus the tied head's copy on the last one (its bias is there whether tied or not)
    both = stage_params(cfg, pp=2, stage=0) + stage_params(cfg, pp=2, stage=1)
    assert both == total + (V * d if cfg.tie_embeddings else 0)
    assert stage_params(cfg, pp=2, stage=1) >= head
    mem = training_memory(cfg, 1, 16, dtype="fp32", optimizer="adamw")
    assert (mem.parameters, mem.gradients, mem.optimizer_states) == (4 * total, 4 * total, 8 * total)


def test_named_configs_estimates_and_cost_model():
    from llmkern.flops import param_counts
    from llmkern.memory import max_batch_size
    from llmkern.parallel import cost_model

    mem = training_memory("phi-2", 1, 2048, tp=2, loss="fused")
    assert mem.params_per_gpu < param_counts("phi-2")["total"] and mem.terms()["loss_bias_grad"] == 4 * 51200 / 2
    assert 0 < max_batch_size("pythia-70m", 80e9, 2048) < max_batch_size("pythia-70m", 160e9, 2048)
    d = cost_model.dims(get_config("phi-2"))
    assert (d.n_layer, d.hidden, d.n_head, d.head_dim, d.ffn, d.gated) == (32, 2560, 32, 80, 10240, False)
    assert cost_model.predict("pythia-160m", p=4)["step_ms"] > 0


def test_context_parallelize_refuses_neox(world1):
    from llmkern.parallel import context_parallelize

    with pytest.raises(ValueError, match="context_parallelize: NeoX .*'neox-tiny'.* not supported"):
        context_parallelize(build("neox-tiny", backend="torch"), world1)


# ---- PEFT adapters under transformers' names ------------------------------------------------------------------
HF = TinyHFFamilies({"phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=2, qk_layernorm=True)),
                     "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict())},
                    dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32))
# (lm_head, whose saved base weight and bias load as in PEFT: tests/test_neox_peft_audit26.py)
PHI_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return HF.save_all(tmp_path_factory.mktemp("neox_peft"))


def _randomize_lora(model):
    """PEFT's zero-initialised B would make every adapter a no-op: random factors so logits differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_phi_peft_adapter_both_ways(saved, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = saved["phi"]
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=PHI_TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    _randomize_lora(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = load_peft_adapter(load_hf(path), str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        want = theirs(x).logits
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    # ours, with other LoRA factors, saved under transformers' names and loaded by PEFT
    _randomize_lora(ours)
    with torch.no_grad():
        ours.layers[1].mlp.up_proj.lora_B.mul_(-1.5)
        want = ours(x)
    save_peft_adapter(ours, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)


def test_gpt_neox_zoo_names_and_dense_adapters(saved, tmp_path):
    """GPT-NeoX adapters under the zoo's own names round-trip; those on its dense / MLP layers map onto
    transformers' names exactly (q / k / v onto query_key_value: tests/test_neox_peft_audit26.py)."""
    peft = pytest.importorskip("peft")
    path, hf = saved["neox"]
    ours = load_hf(path)
    inject_lora(ours, ["q_proj", "o_proj", "up_proj"], r=2)
    # the zoo's own names round-trip; the other modules map onto transformers' names exactly
    _randomize_lora(ours)
    x = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)
    save_peft_adapter(ours, str(tmp_path / "zoo"), hf_names=False)
    with torch.no_grad():
        torch.testing.assert_close(load_peft_adapter(load_hf(path), str(tmp_path / "zoo"))(x), want)
    dense = load_hf(path)
    inject_lora(dense, ["o_proj", "up_proj", "down_proj"], r=2)
    _randomize_lora(dense)
    with torch.no_grad():
        want = dense.eval()(x)
    save_peft_adapter(dense, str(tmp_path / "hf"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)
