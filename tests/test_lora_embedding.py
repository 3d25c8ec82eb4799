"""llmkern.peft.LoRAEmbedding: LoRA on nn.Embedding, against Hugging Face PEFT's lora.Embedding (forward,
gradients, merge, checkpoints both ways), and its place in inject_lora / merge_lora / save and load."""
import copy
import json

import pytest
import torch
from torch import nn

from llmkern import peft as lp
from llmkern.testing import peft_lora_model, randomize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V, D = 40, 12


class Tiny(nn.Module):
    """An embedding and a head: the smallest model PEFT's get_peft_model takes with an embedding target."""

    def __init__(self, **emb_kwargs):
        super().__init__()
        self.emb = nn.Embedding(V, D, **emb_kwargs)
        self.head = nn.Linear(D, 7)

    def forward(self, x):
        return self.head(self.emb(x))


def _ids(B=3, T=10, vocab=V, seed=0):
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[0, :3] = 0  # (repeated ids: scale_grad_by_freq, and padding_idx=0 when set)
    return ids


def _copy_peft_factors(pm, ours, name="emb"):
    """PEFT's embedding factors into our LoRAEmbedding `name`."""
    src = pm.base_model.model.get_submodule(name)
    dst = ours.get_submodule(name)
    with torch.no_grad():
        dst.lora_embedding_A.copy_(src.lora_embedding_A["default"])
        dst.lora_embedding_B.copy_(src.lora_embedding_B["default"])


def _pair(emb_kwargs=None, r=4, alpha=8, use_rslora=False, dropout=0.0, seed=0):
    """(PEFT model, our model, our LoRAEmbedding) over copies of one Tiny, with the same random factors."""
    torch.manual_seed(seed)
    base = Tiny(**(emb_kwargs or {}))
    ours = copy.deepcopy(base)
    pm = peft_lora_model(base, target_modules=["emb"], r=r, lora_alpha=alpha, use_rslora=use_rslora,
                         lora_dropout=dropout)
    randomize_lora(pm)
    assert lp.inject_lora(ours, ["emb"], r=r, alpha=alpha, use_rslora=use_rslora, dropout=dropout) == ["emb"]
    _copy_peft_factors(pm, ours)
    return pm, ours, ours.emb


# ---- forward / gradients against PEFT ----------------------------------------------------------------

@pytest.mark.parametrize("emb_kwargs, lora", [
    ({}, {}),
    (dict(padding_idx=0), {}),
    (dict(scale_grad_by_freq=True), dict(use_rslora=True, r=3, alpha=5)),
    (dict(padding_idx=3, scale_grad_by_freq=True), dict(dropout=0.5)),  # PEFT never applies embedding dropout
], ids=["plain", "padding_idx", "scale_grad_by_freq-rslora", "padding-freq-dropout"])
def test_forward_and_lora_grads_match_peft(emb_kwargs, lora):
    pm, ours, layer = _pair(emb_kwargs, **lora)
    assert isinstance(layer, lp.LoRAEmbedding)
    assert layer.scaling == pm.base_model.model.emb.scaling["default"]
    pm.train(), ours.train()  # (dropout, if any, would act now)
    x = _ids()
    want, got = pm(x), ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ours.head(layer.base_layer(x)))  # the update is not zero
    want.square().sum().backward()
    got.square().sum().backward()
    src = pm.base_model.model.emb
    torch.testing.assert_close(layer.lora_embedding_A.grad, src.lora_embedding_A["default"].grad, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(layer.lora_embedding_B.grad, src.lora_embedding_B["default"].grad, rtol=1e-5,
                               atol=1e-5)
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    pad = emb_kwargs.get("padding_idx")
    if pad is not None:  # the padding column of A gets no gradient (the same lookup as the base's)
        assert torch.count_nonzero(layer.lora_embedding_A.grad[:, pad]) == 0
        assert torch.count_nonzero(layer.lora_embedding_A.grad) > 0


def test_padding_rows_keep_the_base_output_with_default_init():
    """PEFT's init (A = 0, B normal): the update starts at zero, and the padding column of A never trains."""
    torch.manual_seed(0)
    model = Tiny(padding_idx=0)
    lp.inject_lora(model, ["emb"], r=4, alpha=8)
    layer = model.emb
    assert torch.count_nonzero(layer.lora_embedding_A) == 0 and torch.count_nonzero(layer.lora_embedding_B) > 0
    x = _ids()
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert torch.count_nonzero(layer.lora_embedding_A[:, 0]) == 0  # padding column: untouched
    assert torch.count_nonzero(layer.lora_embedding_A) > 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0, :3], layer.base_layer(x)[0, :3], rtol=0, atol=0)
        assert not torch.allclose(layer(x)[1], layer.base_layer(x)[1])


def test_max_norm_matches_peft_and_refuses_merge():
    pm, ours, layer = _pair(dict(max_norm=0.5))
    x = _ids()
    a0 = layer.lora_embedding_A.detach().clone()
    assert a0.norm(dim=0)[x.unique()].max() > 0.5
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
    # both renormalise the looked-up columns of A in place
    torch.testing.assert_close(layer.lora_embedding_A, pm.base_model.model.emb.lora_embedding_A["default"])
    assert layer.lora_embedding_A.detach().norm(dim=0)[x.unique()].max() <= 0.5 + 1e-5
    assert not torch.equal(layer.lora_embedding_A.detach(), a0)
    with pytest.raises(ValueError, match="max_norm"):
        layer.merge()
    with pytest.raises(ValueError, match="max_norm"):
        lp.merge_lora(ours)
    assert not layer.merged


def test_sparse_base_same_output_as_peft_and_dense_lora_grads():
    """A sparse base: PEFT's forward is matched; PEFT's backward raises (sparse grad of A's transposed view),
    ours gives A and B the gradients of the dense model."""
    pm, ours, layer = _pair(dict(sparse=True))
    dense = copy.deepcopy(ours)
    dense.emb.base_layer.sparse = False
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        pm(x).sum().backward()
    ours(x).square().sum().backward()
    dense(x).square().sum().backward()
    assert not layer.lora_embedding_A.grad.is_sparse
    torch.testing.assert_close(layer.lora_embedding_A.grad, dense.emb.lora_embedding_A.grad)
    torch.testing.assert_close(layer.lora_embedding_B.grad, dense.emb.lora_embedding_B.grad)


def test_embed_scale_of_the_base_layer_scales_the_update_as_peft():
    """transformers' scaled word embeddings (Gemma 3) multiply their output by embed_scale: PEFT scales the
    update by it too."""
    cls = transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding
    torch.manual_seed(0)
    base = Tiny()
    base.emb = cls(V, D, padding_idx=0, embed_scale=3.0)
    ours = copy.deepcopy(base)
    pm = peft_lora_model(base, target_modules=["emb"], r=4, lora_alpha=8)
    randomize_lora(pm)
    lp.inject_lora(ours, ["emb"], r=4, alpha=8)
    _copy_peft_factors(pm, ours)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
        lp.merge_lora(ours)  # the merged table goes through the base's scaling too
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)


# ---- merge / unmerge / state_dict -------------------------------------------------------------------

def test_merge_unmerge_round_trip_and_safe_merge():
    pm, ours, layer = _pair(dict(padding_idx=2))
    x = _ids()
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        want = ours(x)
        delta = pm.base_model.model.emb.get_delta_weight("default")
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-6, atol=1e-6)  # PEFT's (B A)^T * s
        lp.merge_lora(ours)
        assert layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0 + delta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        layer.disabled = True  # disabled while merged: unmerged first, then the base alone (PEFT)
        torch.testing.assert_close(ours(x), ours.head(nn.functional.embedding(x, w0)), rtol=1e-6, atol=1e-6)
        assert not layer.merged
        layer.disabled = False
        lp.merge_lora(ours)
        lp.unmerge_lora(ours)
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
        layer.lora_embedding_B[0, 0] = float("nan")
    w1 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    with pytest.raises(ValueError, match="non-finite"):
        lp.merge_lora(ours)
    assert torch.equal(layer.base_layer.weight, w1) and not layer.merged
    # merge_lora(remove=True): the plain nn.Embedding back in place, computing the adapted lookup
    pm2, ours2, _ = _pair()
    with torch.no_grad():
        want2 = ours2(x)
        lp.merge_lora(ours2, remove=True)
        assert type(ours2.emb) is nn.Embedding
        torch.testing.assert_close(ours2(x), want2, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_loads_without_adding_twice():
    def lora_model():
        torch.manual_seed(0)
        m = Tiny(padding_idx=0)
        lp.inject_lora(m, ["emb", "head"], r=4, alpha=8)
        randomize_lora(m, seed=5)
        return m

    a = lora_model()
    x = _ids()
    with torch.no_grad():
        ref = a(x)
    train_sd = copy.deepcopy(a.state_dict())
    assert not any(k.endswith("lora_merged") for k in train_sd)  # unmerged state_dicts unchanged
    assert "emb.lora_embedding_A" in train_sd and "emb.lora_embedding_B" in train_sd
    lp.merge_lora(a)
    merged_sd = copy.deepcopy(a.state_dict())
    assert "emb.lora_merged" in merged_sd and "head.lora_merged" in merged_sd
    b = lora_model()
    b.load_state_dict(merged_sd)  # merged checkpoint -> fresh model: it becomes merged (no double add)
    assert b.emb.merged
    a.load_state_dict(train_sd)  # unmerged checkpoint -> merged model: it becomes unmerged
    assert not a.emb.merged
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x), ref, rtol=1e-5, atol=1e-5)
        lp.unmerge_lora(b)
        torch.testing.assert_close(b(x), ref, rtol=1e-5, atol=1e-5)
    lp.merge_lora(b)
    lora_only = {k: v for k, v in train_sd.items() if k.startswith("emb.lora_")}
    with pytest.raises(RuntimeError, match="merged"):  # new LoRA weights under a merged table
        b.load_state_dict(lora_only, strict=False)


def test_tied_embedding_merge_is_refused():
    from llmkern.models import GPT, get_config

    torch.manual_seed(0)
    model = GPT(get_config("gpt-tiny").replace(tie_embeddings=True), backend="torch").eval()
    assert model.lm_head.weight is model.wte.weight
    lp.inject_lora(model, ["wte"], r=4, alpha=8)
    randomize_lora(model)
    emb = model.wte.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):  # merging would change lm_head too
        lp.merge_lora(model)
    assert torch.equal(model.wte.base_layer.weight, emb) and not model.wte.merged
    assert model.lm_head.weight is model.wte.base_layer.weight


# ---- inject_lora integration --------------------------------------------------------------------------

def test_inject_lora_on_zoo_model_keeps_lora_modules_and_trainability():
    from llmkern.models import Llama, get_config

    torch.manual_seed(0)
    model = Llama(get_config("llama-tiny"), backend="torch").eval()
    names = lp.inject_lora(model, ["embed_tokens", "q_proj"], r=4, alpha=8)
    assert "embed_tokens" in names and len(names) == 1 + model.config.n_layer
    assert isinstance(model.embed_tokens, lp.LoRAEmbedding)
    # lora_modules keeps returning the LoRALinear modules only (its callers read lora_A / lora_B)
    assert all(isinstance(m, lp.LoRALinear) for _, m in lp.lora_modules(model))
    assert len(lp.lora_modules(model)) == model.config.n_layer
    assert [n for n, _ in lp.lora_embedding_modules(model)] == ["embed_tokens"]
    lp.inject_lora(model, ["v_proj"], r=2, alpha=2)  # a later call keeps the embedding LoRA trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B"} <= trainable
    assert all("lora_" in n for n in trainable)
    assert model.embed_tokens.lora_embedding_A.shape == (4, model.config.vocab_size)
    randomize_lora(model)
    x = _ids(vocab=model.config.vocab_size)
    out = model(x)
    out.float().square().mean().backward()
    assert model.embed_tokens.lora_embedding_A.grad.abs().sum() > 0
    assert model.embed_tokens.lora_embedding_B.grad.abs().sum() > 0
    with torch.no_grad():
        want = model(x)
        lp.merge_lora(model)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise_naming_the_argument():
    emb = nn.Embedding(V, D)
    for kwargs, match in [(dict(r=0), "r must"), (dict(r=2.0), "r must"), (dict(r=True), "r must"),
                          (dict(alpha=float("nan")), "alpha must"), (dict(alpha="8"), "alpha must"),
                          (dict(dropout=1.0), "dropout must"), (dict(dropout=-0.1), "dropout must"),
                          (dict(use_dora=True), "use_dora")]:
        with pytest.raises(ValueError, match=match):
            lp.LoRAEmbedding(emb, **kwargs)
    with pytest.raises(TypeError, match="nn.Embedding"):
        lp.LoRAEmbedding(nn.Linear(3, 3))
    model = Tiny()
    with pytest.raises(ValueError, match="use_dora"):
        lp.inject_lora(model, ["emb", "head"], r=2, use_dora=True)
    assert type(model.emb) is nn.Embedding and type(model.head) is nn.Linear  # refused: model unchanged
    assert all(p.requires_grad for p in model.parameters())


# ---- PEFT checkpoints, both ways ---------------------------------------------------------------------

def _tiny_llama_hf(path=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=1, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    if path is not None:
        hf.save_pretrained(path)
    return hf


def test_our_adapter_loads_into_peft_with_the_same_outputs(tmp_path):
    base = _tiny_llama_hf()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, ["embed_tokens", "q_proj"], r=4, alpha=8, use_rslora=True)
    lp.inject_lora(ours, ["lm_head"], r=2, alpha=3, use_rslora=True)
    randomize_lora(ours, seed=7)
    x = _ids(vocab=64)
    with torch.no_grad():
        want = ours(x).logits
    lp.save_peft_adapter(ours, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert sorted(cfg["target_modules"]) == ["embed_tokens", "lm_head", "q_proj"] and cfg["use_rslora"]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 64)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    emb = back.base_model.model.model.embed_tokens
    assert torch.equal(emb.lora_embedding_A["default"], ours.model.embed_tokens.lora_embedding_A)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(x).logits, want, rtol=1e-3, atol=1e-3)
    again = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path))  # and back into llmkern
    assert isinstance(again.model.embed_tokens, lp.LoRAEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_into_llmkern_with_the_same_outputs(tmp_path):
    base = _tiny_llama_hf()
    with torch.no_grad():  # a saved base table that differs from ours: PEFT loads it into the base layer
        altered = copy.deepcopy(base)
        altered.model.embed_tokens.weight.mul_(1.5)
    pm = peft_lora_model(copy.deepcopy(altered), target_modules=["embed_tokens", "v_proj"], r=4, lora_alpha=16,
                         rank_pattern={"embed_tokens": 3}, alpha_pattern={"embed_tokens": 5})
    randomize_lora(pm, seed=3)
    pm.save_pretrained(tmp_path)
    x = _ids(vocab=64)
    with torch.no_grad():
        want = pm.eval()(x).logits
    ours = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    layer = ours.model.embed_tokens
    assert isinstance(layer, lp.LoRAEmbedding) and layer.r == 3 and layer.alpha == 5
    assert torch.equal(layer.base_layer.weight, altered.model.embed_tokens.weight)  # the saved base table
    assert {n for n, p in ours.named_parameters() if p.requires_grad} >= {"model.embed_tokens.lora_embedding_A"}
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, want, rtol=1e-5, atol=1e-5)
    # loading again into the same (now LoRA) model replaces the factors; a stale active embedding LoRA is refused
    lp.load_peft_adapter(ours, str(tmp_path))
    pm_q = peft_lora_model(copy.deepcopy(base), target_modules=["q_proj"], r=4, lora_alpha=8)
    pm_q.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="embed_tokens"):
        lp.load_peft_adapter(ours, str(tmp_path / "q"))


def test_peft_dora_embedding_adapter_is_refused(tmp_path):
    pm = peft_lora_model(_tiny_llama_hf(), target_modules=["embed_tokens", "q_proj"], r=4, use_dora=True)
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora=True on embedding"):
        lp.load_peft_adapter(_tiny_llama_hf(), str(tmp_path))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zoo_model_embedding_adapter_both_ways_with_hf_names(tmp_path, kind):
    """PEFT on the transformers model (embed_tokens / GPT-2's wte and wpe) -> the zoo model from from_hf
    (HF names mapped), and the zoo's adapter saved with HF names -> PEFT: the same logits."""
    from llmkern.testing import load_hf

    torch.manual_seed(3)
    if kind == "llama":
        _tiny_llama_hf(tmp_path / "base")
        targets, zoo_emb = ["embed_tokens", "q_proj", "v_proj"], ["embed_tokens"]
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
        targets, zoo_emb = ["wte", "wpe", "c_attn"], ["wte", "wpe"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    pm = peft_lora_model(hf, target_modules=targets, r=4, lora_alpha=8)
    randomize_lora(pm, seed=9, std=0.2)
    pm.save_pretrained(tmp_path / "ad")
    x = _ids(vocab=64)
    with torch.no_grad():
        want = pm.eval()(x).logits
    zoo = lp.load_peft_adapter(load_hf(str(tmp_path / "base")), str(tmp_path / "ad"))
    assert [n for n, _ in lp.lora_embedding_modules(zoo)] == zoo_emb
    with torch.no_grad():
        torch.testing.assert_close(zoo(x), want, rtol=1e-4, atol=1e-4)
    lp.save_peft_adapter(zoo, str(tmp_path / "back"))
    cfg = json.load(open(tmp_path / "back" / "adapter_config.json"))
    assert set(zoo_emb) <= set(cfg["target_modules"])
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    back = peft.PeftModel.from_pretrained(hf2, str(tmp_path / "back")).eval()
    n_emb = sum(n.endswith("lora_embedding_A.default") for n, _ in back.named_parameters())
    assert n_emb == len(zoo_emb)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-4, atol=1e-4)


# ---- tensor parallelism: the LoRA embedding stays replicated -------------------------------------------

def tp_worker(rank, world_size, tmp):
    import os

    from llmkern.models import Llama, get_config
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import inject_lora, save_peft_adapter

    torch.manual_seed(0)
    model = Llama(get_config("llama-tiny"), backend="torch").eval()
    inject_lora(model, ["embed_tokens", "q_proj", "v_proj"], r=4, alpha=8)
    randomize_lora(model, seed=4, std=0.1)
    x = _ids(vocab=model.config.vocab_size)

    def run(m):
        m.zero_grad()
        out = m(x)
        out.float().square().mean().backward()
        return out.detach(), m.embed_tokens.lora_embedding_A.grad.clone(), m.embed_tokens.lora_embedding_B.grad.clone()

    ref = run(model)
    if rank == 0:
        save_peft_adapter(model, os.path.join(tmp, "ref"))
    try:  # vocabulary sharding of a LoRA embedding: refused (model unchanged)
        tensor_parallelize(copy.deepcopy(model), vocab_parallel=True)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    assert "LoRA" in refused, refused
    tensor_parallelize(model)
    assert isinstance(model.embed_tokens, lp.LoRAEmbedding)  # replicated, as the plain embedding would be
    got = run(model)
    save_peft_adapter(model, os.path.join(tmp, "tp"))  # (a collective: every rank calls it)
    return [float((a - b).abs().max()) for a, b in zip(got, ref)]


def test_tensor_parallel_model_keeps_a_replicated_embedding_lora(pool2, tmp_path):
    from safetensors.torch import load_file

    results = pool2.run(tp_worker, (str(tmp_path),), timeout=90)
    for errs in results:  # logits, and the embedding LoRA's gradients (whole on every rank), as unsharded
        assert max(errs) < 1e-5, errs
    ref, tp = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ref", "tp"))
    assert ref.keys() == tp.keys() and "base_model.model.model.embed_tokens.lora_embedding_A" in tp
    assert all(torch.equal(ref[k], tp[k]) for k in ref)
    assert json.load(open(tmp_path / "ref" / "adapter_config.json")) == \
        json.load(open(tmp_path / "tp" / "adapter_config.json"))
