"""load_peft_adapter checks every adapter_config.json value it uses before it changes the model.

Regression: lora_dropout / lora_alpha / alpha_pattern values were only checked by the LoRALinear / LoRAEmbedding /
LoRAConv constructors while loading, after the base had been frozen and earlier modules had been wrapped and given
new weights; modules that already had LoRA took alpha unchecked (a NaN alpha loaded silently) and kept their own
dropout; a string use_rslora ("false") switched rsLoRA on. Also: PEFT-valid values (zero or negative alpha, default
and absent keys) keep loading with PEFT's outputs, and the GPT-2 c_attn split copes with zero alphas and with
malformed llmkern records.
"""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

from llmkern import peft as lp
from llmkern.testing import peft_lora_model, randomize_lora, tiny_hf_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WRAPPERS = (lp.LoRALinear, lp.LoRAEmbedding, lp.LoRAConv)
TARGETS = ["embed", "conv", "first", "last"]


class Net(nn.Module):
    """One layer of every kind load_peft_adapter wraps: an embedding, a conv and linears."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.first = nn.Linear(8, 8)
        self.last = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.last(torch.relu(self.first(h)))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _ids(vocab=11, seed=0):
    return torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(seed))


def _peft_adapter(path, base, **lora):
    """A PEFT LoRA adapter on `base` (random factors) saved to `path`; returns the PEFT model (eval)."""
    pm = peft_lora_model(copy.deepcopy(base), **lora)
    randomize_lora(pm, seed=3, std=0.2)
    pm.save_pretrained(str(path))
    return pm.eval()


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "adapter_config.json").write_text(json.dumps(cfg))


_DROP = object()


def _lora_settings(model):
    return {n: (type(m), m.r, m.alpha, m.dropout, m.use_rslora, m.use_dora, m.merged)
            for n, m in model.named_modules() if isinstance(m, WRAPPERS)}


def _assert_unchanged(model, before):
    """`model` is exactly `before` (a deep copy taken before the call): state_dict, module types, requires_grad flags
    and the LoRA wrappers' settings."""
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in before.named_modules()]
    assert ({n: p.requires_grad for n, p in model.named_parameters()}
            == {n: p.requires_grad for n, p in before.named_parameters()})
    got, want = model.state_dict(), before.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert _lora_settings(model) == _lora_settings(before)


# (config key, bad value, what the error must say). Each value is one PEFT either refuses too, or would take for
# something else than it says (a string "false" is true to PEFT; a negative or NaN dropout is no dropout there).
BAD = [
    ("lora_dropout", 1.0, r"lora_dropout=1\.0 must be a number in \[0, 1\)"),
    ("lora_dropout", -0.1, r"lora_dropout=-0\.1 "),
    ("lora_dropout", float("nan"), r"lora_dropout=nan "),
    ("lora_dropout", "0.1", r"lora_dropout='0\.1' "),
    ("lora_dropout", None, r"lora_dropout=None "),
    ("lora_dropout", True, r"lora_dropout=True "),
    ("lora_alpha", float("nan"), r"lora_alpha=nan \(module \w+\) must be a finite number"),
    ("lora_alpha", float("inf"), r"lora_alpha=inf \(module "),
    ("lora_alpha", "16", r"lora_alpha='16' \(module "),
    ("lora_alpha", None, r"lora_alpha=None \(module "),
    ("lora_alpha", True, r"lora_alpha=True \(module "),
    ("lora_alpha", 10 ** 400, r"lora_alpha=1000+ \(module "),
    # the module processed last (convs after linears and embeddings): earlier ones were already loaded
    ("alpha_pattern", {"conv": float("nan")}, r"alpha_pattern\['conv'\]=nan \(module conv\)"),
    ("alpha_pattern", {"conv": "2"}, r"alpha_pattern\['conv'\]='2' \(module conv\)"),
    ("alpha_pattern", {"embed": float("-inf")}, r"alpha_pattern\['embed'\]=-inf \(module embed\)"),
    ("alpha_pattern", ["conv"], r"alpha_pattern must be an object"),
    ("alpha_pattern", {"(": 2}, r"alpha_pattern key '\(' is not a valid regular expression"),
    ("rank_pattern", {"conv": 4.0}, r"rank_pattern\['conv'\]=4\.0 \(module conv\) must be a positive int"),
    ("rank_pattern", {"conv": True}, r"rank_pattern\['conv'\]=True \(module conv\)"),
    ("rank_pattern", {"conv": 2}, r"conv\.lora_A has rank 4, adapter_config\.json says 2 \(rank_pattern\['conv'\]\)"),
    ("rank_pattern", "conv", r"rank_pattern must be an object"),
    ("r", "4", r"adapter_config\.json: r='4' \(module "),
    ("r", 0, r"has rank 4, adapter_config\.json says 0 \(r\)"),
    ("use_rslora", "false", r"use_rslora='false' must be true or false"),
    ("use_rslora", 2, r"use_rslora=2 must be true or false"),
    ("use_dora", "false", r"use_dora='false' must be true or false"),
    # refused variants (checked up front before too)
    ("fan_in_fan_out", True, r"fan_in_fan_out"),
    ("bias", "all", r"bias='all'"),
    ("lora_bias", True, r"lora_bias"),
    ("init_lora_weights", "pissa", r"init_lora_weights='pissa'"),
    ("peft_type", "IA3", r"peft_type must be LORA"),
]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    _peft_adapter(path, _net(), target_modules=TARGETS, r=4, lora_alpha=8)
    return path


@pytest.mark.parametrize("with_lora", [False, True], ids=["plain-model", "lora-model"])
@pytest.mark.parametrize("key, value, match", BAD, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD])
def test_bad_config_value_is_refused_before_anything_changes(tmp_path, good_adapter, key, value, match, with_lora):
    path = tmp_path / "ad"
    path.mkdir()
    for f in good_adapter.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    _edit_config(path, **{key: value})
    model = _net(seed=1)
    if with_lora:  # a model that already has (trained) LoRA on the checkpoint's modules: never checked them
        lp.inject_lora(model, TARGETS, r=4, alpha=8, dropout=0.1)
        randomize_lora(model, seed=5)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match) as err:
        lp.load_peft_adapter(model, str(path))
    assert str(path) in str(err.value)
    _assert_unchanged(model, before)
    # the same directory with the good config loads (the refusal was the value's)
    _edit_config(path, **{key: json.loads((good_adapter / "adapter_config.json").read_text()).get(key, _DROP)})
    lp.load_peft_adapter(model, str(path))


@pytest.mark.parametrize("config", [[], "x", None])
def test_config_that_is_not_an_object_is_refused(tmp_path, good_adapter, config):
    for f in good_adapter.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = _net()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="adapter_config.json must hold a JSON object"):
        lp.load_peft_adapter(model, str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        lp.load_peft_adapter(model, str(tmp_path))
    _assert_unchanged(model, before)


def test_unused_pattern_and_default_values_are_not_looked_at(tmp_path):
    """PEFT only reads the rank_pattern / alpha_pattern values (and r / lora_alpha) of modules it wraps: a value no
    checkpoint module uses does not make the adapter unloadable."""
    base = _net()
    pm = _peft_adapter(tmp_path, base, target_modules=["first", "last"], r=4, lora_alpha=8,
                       alpha_pattern={"first": 2, "last": 3})
    _edit_config(tmp_path, lora_alpha="unused", rank_pattern={"nowhere": "x"},
                 alpha_pattern={"first": 2, "last": 3, "nowhere": float("nan")})
    with torch.no_grad():
        torch.testing.assert_close(lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path))(_ids()), pm(_ids()))


def _check_like_peft(ours, pm, x):
    """Every LoRA layer of `ours` has PEFT's r, scaling, dropout and rsLoRA; the outputs are PEFT's."""
    got = {n: m for n, m in ours.named_modules() if isinstance(m, WRAPPERS)}
    want = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_dropout") and hasattr(m, "r")}
    assert sorted(got) == sorted(want)
    for n, m in got.items():
        ref = want[n]
        drop = ref.lora_dropout["default"]
        assert m.r == ref.r["default"] and m.scaling == ref.scaling["default"], n
        assert m.dropout == (drop.p if isinstance(drop, nn.Dropout) else 0.0), n
        assert m.use_rslora == ref.use_rslora["default"], n
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), pm.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [
    dict(),  # LoraConfig's defaults: r 8, lora_alpha 8, lora_dropout 0.0, use_rslora False
    dict(r=4, lora_alpha=12, lora_dropout=0.25, use_rslora=True, rank_pattern={"conv": 2},
         alpha_pattern={"conv": -3, "first": 0}),  # negative and zero alphas load in PEFT
], ids=["defaults", "rslora-dropout-patterns"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain-model", "lora-model"])
def test_valid_config_loads_with_peft_settings_also_into_existing_lora(tmp_path, lora, with_lora):
    """Modules that already have LoRA take the config's alpha, dropout and rsLoRA, as new ones do (they kept their
    own dropout): the model is the checkpoint's either way, as PEFT builds every loaded adapter from its config."""
    base = _net()
    pm = _peft_adapter(tmp_path, base, target_modules=TARGETS, **lora)
    model = copy.deepcopy(base)
    if with_lora:  # other alphas, dropout and rsLoRA than the checkpoint's (the ranks must agree)
        for t in TARGETS:
            lp.inject_lora(model, [t], r=lora.get("rank_pattern", {}).get(t, lora.get("r", 8)), alpha=1.0,
                           dropout=0.5, use_rslora=not lora.get("use_rslora", False))
    _check_like_peft(lp.load_peft_adapter(model, str(tmp_path)), pm, _ids())


def test_older_peft_configs_without_the_newer_keys_load(tmp_path):
    """Configs written before use_rslora / use_dora / rank_pattern / alpha_pattern existed (or with them null)."""
    base = _net()
    pm = _peft_adapter(tmp_path, base, target_modules=TARGETS, r=4, lora_alpha=16)
    _edit_config(tmp_path, use_rslora=_DROP, use_dora=None, rank_pattern=None, alpha_pattern=_DROP,
                 lora_dropout=_DROP)
    _check_like_peft(lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path)), pm, _ids())


def test_peft_llama_adapter_with_nondefault_alpha_dropout_rslora_gives_peft_outputs(tmp_path):
    base = tiny_hf_llama(seed=0)
    lora = dict(target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"], r=4, lora_alpha=12,
                lora_dropout=0.1, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": -6})
    pm = _peft_adapter(tmp_path, base, **lora)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(ids).logits
    for with_lora in (False, True):
        model = tiny_hf_llama(seed=0)
        if with_lora:
            lp.inject_lora(model, ["q_proj", "o_proj", "embed_tokens"], r=4, alpha=8, dropout=0.3)
            lp.inject_lora(model, ["v_proj"], r=2, alpha=8, dropout=0.3)
        ours = lp.load_peft_adapter(model, str(tmp_path)).eval()
        layers = ours.model.layers
        assert isinstance(ours.model.embed_tokens, lp.LoRAEmbedding)
        assert layers[0].self_attn.v_proj.r == 2 and layers[1].self_attn.o_proj.alpha == -6
        assert all(m.dropout == 0.1 and m.use_rslora for m in ours.modules() if isinstance(m, WRAPPERS))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)


# ---- GPT-2's fused c_attn: zero alphas, malformed llmkern records -------------------------------------------

def _gpt2_dir(path):
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def _zoo(path):
    from llmkern.models import from_hf

    return from_hf(path, backend="torch")


def _hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _gpt_ids():
    return torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))


def test_zoo_gpt_qkv_lora_with_a_zero_alpha_saves_and_loads_back(tmp_path):
    """A q_proj LoRA with alpha 0 (PEFT loads such adapters: scaling 0) beside a v_proj one: save_peft_adapter took the
    first part's scaling for c_attn and divided by it (ZeroDivisionError)."""
    base = _gpt2_dir(tmp_path / "base")
    zoo = _zoo(base)
    lp.inject_lora(zoo, ["attn.q_proj"], r=4, alpha=0)
    lp.inject_lora(zoo, ["attn.v_proj"], r=2, alpha=6)
    randomize_lora(zoo, seed=4, std=0.1)
    with torch.no_grad():
        want = zoo(_gpt_ids())
    lp.save_peft_adapter(zoo, str(tmp_path / "ad"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_hf(base), str(tmp_path / "ad")).eval()
    again = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    attn = again.h[0].attn
    assert (attn.q_proj.r, attn.q_proj.alpha, attn.v_proj.r, attn.v_proj.alpha) == (4, 0, 2, 6)
    torch.testing.assert_close(attn.v_proj.lora_B, zoo.h[0].attn.v_proj.lora_B, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(back(_gpt_ids()).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(_gpt_ids()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("corrupt", ["nan-alpha", "string-alpha", "string-rank", "bool-rank", "short-entry",
                                     "not-a-list", "not-an-object", "not-json", "zero-alpha-with-weights"])
def test_malformed_fused_record_falls_back_to_the_exact_split(tmp_path, corrupt):
    """The llmkern.fused_lora metadata record (how q/k/v were packed into c_attn) is ignored by PEFT; when it is not
    well-formed the c_attn LoRA is split as PEFT's own are (each part: A, its rows of B), exactly. A NaN alpha in it
    gave NaN factors; a string one raised TypeError."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = _gpt2_dir(tmp_path / "base")
    zoo = _zoo(base)
    lp.inject_lora(zoo, ["attn.q_proj"], r=2, alpha=4)
    lp.inject_lora(zoo, ["attn.v_proj"], r=2, alpha=6)
    randomize_lora(zoo, seed=4, std=0.1)
    lp.save_peft_adapter(zoo, str(tmp_path / "ad"))
    f = str(tmp_path / "ad" / "adapter_model.safetensors")
    with safe_open(f, "pt") as fh:
        meta = fh.metadata()
    records = json.loads(meta["llmkern.fused_lora"])
    name = "transformer.h.0.attn.c_attn"
    q, v = records[name]
    records[name] = {
        "nan-alpha": [[q[0], q[1], float("nan")], v], "string-alpha": [[q[0], q[1], "4"], v],
        "string-rank": [[q[0], "2", q[2]], v], "bool-rank": [q, [v[0], True, v[2]]], "short-entry": [q, v[:2]],
        "not-a-list": {"q": q}, "not-an-object": None, "not-json": None,
        "zero-alpha-with-weights": [[q[0], q[1], 0], v],  # q's block is not zero: alpha 0 would drop it
    }[corrupt]
    meta["llmkern.fused_lora"] = json.dumps(records)
    if corrupt == "not-an-object":
        meta["llmkern.fused_lora"] = "[1, 2]"
    elif corrupt == "not-json":
        meta["llmkern.fused_lora"] = "{nope"
    save_file(load_file(f), f, metadata=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft.PeftModel.from_pretrained(_hf(base), str(tmp_path / "ad")).eval()(_gpt_ids()).logits
    got = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    h0 = got.h[0].attn
    if corrupt in ("not-an-object", "not-json"):  # every c_attn record ignored
        assert h0.q_proj.r == 4 and got.h[1].attn.q_proj.r == 4
    else:  # only this one: layer 1 still splits by its record
        assert h0.q_proj.r == 4 and h0.k_proj.r == 4 and got.h[1].attn.q_proj.r == 2
    with torch.no_grad():
        out = got(_gpt_ids())
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
