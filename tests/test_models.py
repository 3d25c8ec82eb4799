"""llmkern.models: configs, both backends, KV cache, training, and from_hf against transformers."""
import copy
import os
import warnings

import pytest
import torch

from llmkern.models import GPT, KVCache, Llama, build, from_hf, get_config, available_configs
from llmkern.models.configs import ModelConfig

ARCHS = ["gpt-tiny", "llama-tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


def test_named_configs():
    names = available_configs()
    for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-125m", "gpt3-350m", "gpt3-760m",
              "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b", "llama-7b", "llama3-8b",
              "gpt-tiny", "llama-tiny"):
        assert n in names
    c = get_config("gpt3-175b")
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.block_size) == (96, 12288, 96, 128, 2048)
    assert get_config("gpt2-small").name == "gpt2"
    assert get_config("llama3-8b").n_kv_head == 8
    assert get_config("gpt-tiny", n_layer=3).n_layer == 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=100, n_head=3), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(arch="rnn"), "arch"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(dropout=1.5), "dropout"),
    (dict(dropout=None), "dropout"),
    (dict(dropout="0.1"), "dropout"),
    (dict(norm_eps=float("inf")), "norm_eps"),
    (dict(activation="swish"), "activation"),
    (dict(block_size=2.5), "block_size"),
    (dict(norm_eps=0), "norm_eps"),
    # read by truthiness, "no" tied the head and "false" gave biases; pad_token_id -1 wrapped to the last token's
    # row (never trained), on GPT it and rope_theta were accepted and ignored
    (dict(tie_embeddings="no"), "tie_embeddings"),
    (dict(arch="llama", bias="false"), "bias"),
    (dict(arch="llama", vocab_size=256, pad_token_id=-1), "pad_token_id"),
    (dict(arch="llama", vocab_size=256, pad_token_id=256), "pad_token_id"),
    (dict(arch="gpt", pad_token_id=0), "pad_token_id"),
    (dict(arch="gpt", rope_theta=5e5), "rope_theta"),
    # (an infinite softcap made every logit NaN; an infinite rope_theta was accepted)
    (dict(arch="llama", logit_softcap=float("inf")), "logit_softcap"),
    (dict(arch="llama", logit_softcap=1e40), "logit_softcap"),
    (dict(arch="llama", attn_softcap=float("inf")), "attn_softcap"),
    (dict(arch="llama", rope_theta=float("inf")), "rope_theta"),
    (dict(arch="llama", rope_theta="x"), "rope_theta"),
])
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_bad_names_and_backends():
    with pytest.raises(ValueError, match="unknown name"):
        get_config("gpt5")
    with pytest.raises(ValueError, match="n_layers"):
        get_config("gpt2", n_layers=3)
    with pytest.raises(ValueError, match="backend"):
        GPT("gpt-tiny", backend="jax")
    with pytest.raises(ValueError, match="arch"):
        Llama("gpt-tiny")
    m = build("gpt-tiny")
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="backend"):
        m.backend = "triton"


@pytest.mark.parametrize("name", ARCHS)
def test_backends_agree_and_kv_cache(name):
    m = build(name, backend="torch").eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = m(x)
        assert ref.shape == (2, 12, 256)
        m.backend = "llmkern"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = m(x)
            torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
            for backend in ("torch", "llmkern"):   # prefill 5 tokens, then 3 + 1 + ... through the cache
                m.backend = backend
                cache = m.new_cache(2, 16)
                parts = [m(x[:, :5], cache=cache), m(x[:, 5:8], cache=cache)]
                parts += [m(x[:, t:t + 1], cache=cache) for t in range(8, 12)]
                torch.testing.assert_close(torch.cat(parts, 1), ref, atol=2e-5, rtol=1e-4)
                assert cache.seqlen == 12


def test_kvcache_per_row_lengths():
    """KVCache: per-row crop, appends at each row's own offset, reorder with the lengths, crop(int)."""
    B, H, D = 3, 2, 4
    k0, v0, k1, v1 = (torch.randn(B, H, t, D) for t in (6, 6, 3, 3))
    c = KVCache(1, B, H, 10, D, device="cpu")
    c.append(0, k0, v0)
    c.advance(6)
    assert c.uniform and c.seqlen == 6 and c.lengths.tolist() == [6] * 3 and c.lengths.dtype == torch.int32
    keep = [2, 6, 4]
    c.crop(torch.tensor(keep))
    assert not c.uniform and c.lengths.tolist() == keep and c.seqlen == 6
    kc, vc = c.append(0, k1, v1)
    c.advance(3)
    assert c.lengths.tolist() == [5, 9, 7] and c.seqlen == 9
    for b, n in enumerate(keep):  # the same as each row appended alone
        one = KVCache(1, 1, H, 10, D, device="cpu")
        one.append(0, k0[b:b + 1, :, :n], v0[b:b + 1, :, :n])
        one.advance(n)
        ko, vo = one.append(0, k1[b:b + 1], v1[b:b + 1])
        assert torch.equal(kc[b, :, :n + 3], ko[0, :, :n + 3]) and torch.equal(vc[b, :, :n + 3], vo[0, :, :n + 3])
    before = c.k[0].clone()
    c.reorder(torch.tensor([2, 0, 0]))
    assert c.lengths.tolist() == [7, 5, 5] and torch.equal(c.k[0][0], before[2]) and torch.equal(c.k[0][2], before[0])
    c.crop(6)  # every row: none grows
    assert c.lengths.tolist() == [6, 5, 5] and c.seqlen == 6 and not c.uniform
    c.crop(torch.tensor([1, 2, 0]), max_n=4)
    assert c.seqlen == 4 and c.lengths.tolist() == [1, 2, 0]
    for bad in (torch.tensor([1, 2]), torch.tensor([2, 2, 0]), torch.tensor([1.0, 0.0, 0.0]), 5, -1, True):
        with pytest.raises(ValueError, match="crop"):
            c.crop(bad)
    with pytest.raises(ValueError, match="max_n"):
        c.crop(torch.tensor([1, 2, 0]), max_n=1)
    c.crop(0)
    assert c.uniform and c.lengths.tolist() == [0] * 3


@pytest.mark.parametrize("backend", ["torch", "llmkern", "triton"])
def test_cache_in_another_dtype(backend, monkeypatch):
    """new_cache(dtype=float32) for a float16 model: the cache holds the keys exactly and is read as the model's
    dtype, so prefill, decode steps and a per-row crop give the logits of the model's own float16 cache (both
    backends raised a dtype error at the prefill)."""
    if backend == "triton":  # the Triton kernels, under the interpreter on a CPU
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    m = build("llama-tiny", backend="torch" if backend == "torch" else "llmkern", n_layer=1).eval().half()
    x = torch.randint(0, 256, (2, 9))
    out = {}
    for dtype in (None, torch.float32):
        cache = m.new_cache(2, 12, dtype=dtype)
        with torch.no_grad():
            steps = [m(x[:, :6], cache=cache), m(x[:, 6:7], cache=cache)]
            cache.crop(torch.tensor([5, 7]))
            steps.append(m(x[:, 7:9], cache=cache))
        assert cache.k[0].dtype == (dtype or torch.float16)
        out[dtype] = steps
    for a, b in zip(out[None], out[torch.float32]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("backend", ["torch", "llmkern", "triton"])
def test_per_row_cache_matches_full_forward(name, backend, monkeypatch):
    """A cache cut back to different lengths per row, then T new tokens per row: the logits of each row's
    new tokens are those of a forward over that row's tokens without a cache (left padding and a sliding
    window too). backend="llmkern" passes the per-row lengths to attention_with_kvcache."""
    ops = pytest.importorskip("llmkern.ops.attention")
    if backend == "triton":  # the Triton kernels, under the interpreter on a CPU
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    seqlens = []  # the keys each row attends to (the op appends k= / v= first: cache_seqlens + their length)
    orig = ops.attention_with_kvcache
    monkeypatch.setattr(ops, "attention_with_kvcache", lambda *a, **kw: (
        seqlens.append((a[3] + (kw["k"].shape[2] if kw.get("k") is not None else 0)).tolist()), orig(*a, **kw))[1])
    over = dict(n_layer=1, sliding_window=4) if name == "llama-tiny" else dict(n_layer=1)
    m = build(name, backend="torch" if backend == "torch" else "llmkern", **over).eval()
    B, T = 3, 3
    x = torch.randint(0, 256, (B, 13))
    keep, pads = torch.tensor([4, 9, 6]), [0, 2, 1]
    new = torch.stack([x[b, n:n + T] for b, n in enumerate(keep.tolist())])
    for padded in (False, True):
        am = torch.ones(B, 12, dtype=torch.long)
        for b, pad in enumerate(pads if padded else [0] * B):
            am[b, :pad] = 0
        mask = (lambda n: {"attention_mask": am[:, :n]}) if padded else (lambda n: {})
        with torch.no_grad():
            cache = m.new_cache(B, 12)
            m(x[:, :10], cache=cache, **mask(10))
            cache.crop(keep)
            y = m(new, cache=cache, **mask(cache.seqlen + T))
            for b, n in enumerate(keep.tolist()):
                start = pads[b] if padded else 0  # padding is not a token: the row alone starts after it
                ref = m(x[b:b + 1, start:n + T])[0, -T:]
                torch.testing.assert_close(y[b], ref, atol=2e-5, rtol=1e-4)
        assert cache.lengths.tolist() == (keep + T).tolist()
    if backend != "torch":  # both forwards: the decode kernel with each row's keys (and the padding mask)
        assert seqlens == [(keep + T).tolist()] * 2


@pytest.mark.parametrize("backend", ["llmkern", "triton"])
@pytest.mark.parametrize("dtype", [None, torch.float8_e4m3fn])
def test_decode_steps_append_through_the_attention_op(backend, dtype, monkeypatch):
    """A decode step hands its new keys to attention_with_kvcache (k=, v=: one append kernel on the Triton
    backend) instead of copying them into the cache first: the same cache bytes and logits as the copy path,
    after uniform steps and after a per-row rollback."""
    ops = pytest.importorskip("llmkern.ops.attention")
    from llmkern.models import _attn
    if backend == "triton":  # the Triton kernels (append_kv too), under the interpreter on a CPU
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    appended = []
    orig = ops.attention_with_kvcache
    monkeypatch.setattr(ops, "attention_with_kvcache",
                        lambda *a, **kw: (appended.append(kw.get("k") is not None), orig(*a, **kw))[1])
    m = build("llama-tiny", backend="llmkern", n_layer=1).eval()
    x = torch.randint(0, 256, (3, 9))

    def run():
        cache, out = m.new_cache(3, 12, dtype=dtype), []
        with torch.no_grad():
            m(x[:, :5], cache=cache)
            out += [m(x[:, 5:6], cache=cache), m(x[:, 6:7], cache=cache)]
            cache.crop(torch.tensor([3, 7, 5]), max_n=7)
            out.append(m(x[:, 7:9], cache=cache))
        return out, [t.view(torch.uint8) for t in cache.k + cache.v]

    out, caches = run()
    assert appended == [True] * 3  # 2 uniform steps + 1 per-row step
    monkeypatch.setattr(_attn, "_kernel_appends", lambda *a: False)  # the copy path
    appended.clear()
    old_out, old_caches = run()
    assert appended == [False] * 3
    for a, b in zip(caches + out, old_caches + old_out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_per_row_cache_with_prefix_tuning(backend):
    peft = pytest.importorskip("llmkern.peft")
    m = build("llama-tiny", backend=backend, n_layer=1).eval()
    cfg = m.config
    m.attach_prefix(peft.PrefixTuning(cfg.n_layer, 3, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head))
    x = torch.randint(0, 256, (2, 12))
    keep = [7, 3]
    new = torch.stack([x[b, n:n + 2] for b, n in enumerate(keep)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = m.new_cache(2, 12)
        m(x[:, :9], cache=cache)
        cache.crop(torch.tensor(keep))
        y = m(new, cache=cache)
        for b, n in enumerate(keep):
            torch.testing.assert_close(y[b], m(x[b:b + 1, :n + 2])[0, -2:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_tiny_model_trains(name, backend):
    torch.manual_seed(0)
    m = build(name, backend=backend, n_layer=1)
    opt = m.configure_optimizer(lr=3e-3, weight_decay=0.0)
    data = torch.randint(0, 256, (4, 33))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = []
        for _ in range(25):
            _, loss = m(data, labels=data)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_is_shifted_cross_entropy():
    m = build("gpt-tiny", backend="torch")
    x = torch.randint(0, 256, (2, 10))
    labels = x.clone()
    labels[:, :3] = -100
    logits, loss = m(x, labels=labels)
    ref = torch.nn.functional.cross_entropy(logits[:, 2:-1].reshape(-1, 256), x[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("kernel", [False, True], ids=["cpu-dispatch", "triton-interpreter"])
def test_llmkern_backend_loss_is_fused_cross_entropy(name, kernel, monkeypatch):
    """backend="llmkern" computes the loss with llmkern.cross_entropy: same loss and gradients."""
    ce = pytest.importorskip("llmkern.ops.cross_entropy")
    if kernel:
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    calls = []
    orig = ce.cross_entropy
    monkeypatch.setattr(ce, "cross_entropy", lambda *a, **kw: (calls.append(1), orig(*a, **kw))[1])
    m = build(name, backend="torch", n_layer=1)
    x = torch.randint(0, 256, (2, 17))
    labels = x.clone()
    labels[0, :4] = -100
    results = {}
    for backend in ("torch", "llmkern"):
        m.backend = backend
        m.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, loss = m(x, labels=labels)
            loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
    assert len(calls) == 1
    torch.testing.assert_close(results["llmkern"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results["llmkern"][1], results["torch"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- from_hf vs transformers
transformers = pytest.importorskip("transformers")


def _save_gpt2(path, tie=True):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(path)
    return hf


# Llama 3.1-style context extension, scaled down so that a 12-dim head has frequencies in all three
# bands (wavelengths 2*pi*theta^(i/6): kept below 8, blended 8..32, divided by `factor` above 32).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.5, "high_freq_factor": 2.0,
               "original_max_position_embeddings": 16}


def _save_llama(path, kv_heads=2, tie=False, head_dim=None, rope=None):
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rms_norm_eps=1e-6, head_dim=head_dim)
    if rope is not None:
        cfg.rope_parameters = dict(rope, rope_theta=50.0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm gains so that a mix-up would show
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama-gqa", "llama-mha-tied", "llama-head-dim",
                                  "llama3-rope", "llama-linear-rope"])
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_from_hf_logits_match_transformers(tmp_path, kind, backend):
    if kind.startswith("gpt2"):
        hf = _save_gpt2(tmp_path, tie=kind == "gpt2")
    else:
        rope = {"llama3-rope": LLAMA3_ROPE, "llama-linear-rope": {"rope_type": "linear", "factor": 4.0}}.get(kind)
        hf = _save_llama(tmp_path, kv_heads=2 if kind == "llama-gqa" else 4, tie=kind == "llama-mha-tied",
                         head_dim=16 if kind == "llama-head-dim" else None, rope=rope)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = from_hf(str(tmp_path), backend=backend)
        x = torch.randint(0, 101, (2, 17))
        with torch.no_grad():
            torch.testing.assert_close(m(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    assert m.num_params() == hf.num_parameters()


def test_llama3_rope_frequencies_cover_every_band_and_match_transformers(tmp_path):
    import json
    import math

    hf = _save_llama(tmp_path, rope=LLAMA3_ROPE)
    m = from_hf(str(tmp_path), backend="torch")
    plain = 1.0 / (50.0 ** (torch.arange(0, 12, 2, dtype=torch.float32) / 12))
    wavelen = 2 * math.pi / plain
    assert (wavelen < 8).any() and ((wavelen > 8) & (wavelen < 32)).any() and (wavelen > 32).any()
    assert torch.equal(m.inv_freq, hf.model.rotary_emb.inv_freq)
    kept, divided = wavelen < 8, wavelen > 32
    assert torch.equal(m.inv_freq[kept], plain[kept])
    torch.testing.assert_close(m.inv_freq[divided], plain[divided] / 8.0)
    # the pre-5.0 config layout (rope_theta + rope_scaling with "type") reads the same
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(from_hf(str(tmp_path), backend="torch").inv_freq, m.inv_freq)


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "longrope", "factor": 2.0}, "rope_type 'longrope' is not supported"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": -1.0}, "attention_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": "fast"}, "beta_fast"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ({"rope_type": "linear", "factor": -1.0}, "factor"),
])
def test_from_hf_rope_scaling_it_cannot_express_raises(tmp_path, rope, match):
    import json

    _save_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = dict(rope, rope_theta=10000.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        from_hf(str(tmp_path))


def _edit_config(path, fn):
    import json

    f = path / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def _hf_from_disk(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def _assert_same_logits(path, hf, T=17, tol=1e-5, **kw):
    x = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        want = hf(x).logits
        for backend in ("torch", "llmkern"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = from_hf(str(path), backend=backend, **kw)(x)
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _old_rope_layout(scaling, theta=50.0, **top):
    """config.json edit: the pre-5.0 layout (top-level rope_theta, rope_scaling with "type")."""
    def edit(cfg):
        cfg.pop("rope_parameters", None)
        cfg.update(rope_theta=theta, rope_scaling=scaling, **top)
    return edit


@pytest.mark.parametrize("case", ["rope_scaling-wins", "llama3-no-original", "llama3-top-level-original"])
def test_from_hf_reads_rope_keys_as_transformers_does(tmp_path, case):
    """Regressions: transformers takes a non-empty rope_scaling over rope_parameters (from_hf read
    rope_parameters: other frequencies), fills a missing original_max_position_embeddings of llama3/yarn
    from max_position_embeddings (from_hf refused), and lets a top-level original_max_position_embeddings
    override the dict's (from_hf used the dict's: other frequencies)."""
    _save_llama(tmp_path)
    llama3 = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    edit = {"rope_scaling-wins": lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 50.0},
                                                    rope_scaling={"rope_type": "linear", "factor": 4.0}),
            "llama3-no-original": _old_rope_layout(llama3),
            "llama3-top-level-original": _old_rope_layout(dict(llama3, original_max_position_embeddings=32),
                                                          original_max_position_embeddings=16)}[case]
    _edit_config(tmp_path, edit)
    hf = _hf_from_disk(tmp_path)
    assert torch.equal(from_hf(str(tmp_path), backend="torch").inv_freq, hf.model.rotary_emb.inv_freq)
    _assert_same_logits(tmp_path, hf)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("case", ["different-lm-head", "only-lm-head"])
def test_from_hf_tied_config_with_lm_head_in_checkpoint(tmp_path, arch, case):
    """Regressions, tie_word_embeddings=True: transformers loads a checkpoint whose lm_head.weight differs
    from the embedding untied (from_hf tied them: other logits), and ties the embedding to lm_head.weight
    when the checkpoint holds only that (from_hf refused)."""
    from safetensors.torch import load_file, save_file

    _save_gpt2(tmp_path) if arch == "gpt2" else _save_llama(tmp_path, tie=True)
    emb = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    f = str(tmp_path / "model.safetensors")
    state = load_file(f)
    if case == "different-lm-head":
        state["lm_head.weight"] = torch.randn_like(state[emb])
    else:
        state["lm_head.weight"] = state.pop(emb)
    save_file(state, f, metadata={"format": "pt"})
    hf = _hf_from_disk(tmp_path)
    _assert_same_logits(tmp_path, hf, tol=1e-4)
    with pytest.warns(UserWarning, match="untied") if case == "different-lm-head" else warnings.catch_warnings():
        m = from_hf(str(tmp_path), backend="torch")
    assert m.config.tie_embeddings == (case == "only-lm-head")


@pytest.mark.parametrize("change", [dict(activation_function="gelu_fast"), dict(activation_function="gelu_accurate"),
                                    dict(activation_function="gelu_python"),
                                    dict(activation_function="gelu_python_tanh"), dict(reorder_and_upcast_attn=True)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_from_hf_gpt2_equivalent_options_load(tmp_path, change):
    """Regressions: transformers' other names of the tanh / erf GELU, and reorder_and_upcast_attn (which
    only changes the precision of the attention scores), were refused."""
    _save_gpt2(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(change))
    _assert_same_logits(tmp_path, _hf_from_disk(tmp_path, attn_implementation="eager"), tol=1e-5)


def test_from_hf_gpt2_reads_its_dropout(tmp_path):
    """attn_pdrop / resid_pdrop / embd_pdrop (equal: the zoo's GPT has one rate) become ModelConfig.dropout: a
    loaded GPT-2 trains with dropout as transformers' does (it trained without); unequal rates are refused."""
    _save_gpt2(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(attn_pdrop=0.3, resid_pdrop=0.3, embd_pdrop=0.3))
    m = from_hf(str(tmp_path), backend="torch")
    assert m.config.dropout == 0.3
    x = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        assert not torch.allclose(m.train()(x), m.eval()(x))
    _edit_config(tmp_path, lambda c: c.update(resid_pdrop=0.1))
    with pytest.raises(ValueError, match="dropout rates must be equal"):
        from_hf(str(tmp_path), backend="torch")


def test_from_hf_gpt2_missing_weight_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_gpt2(tmp_path)
    f = str(tmp_path / "model.safetensors")
    state = load_file(f)
    del state["transformer.h.1.attn.c_attn.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 'h.1.attn.c_attn.weight'"):
        from_hf(str(tmp_path))


def test_from_hf_gpt2_refuses_weights_it_would_not_load(tmp_path):
    """A checkpoint holding more layers than its config says: refused, naming the unused weights (the GPT-2
    conversion read what the config asked for and dropped the rest silently)."""
    _save_gpt2(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(n_layer=c["n_layer"] - 1))
    with pytest.raises(ValueError, match=r"unexpected=\['h\.1\."):
        from_hf(str(tmp_path))


def test_from_hf_bf16_keeps_rope_frequencies_float32(tmp_path):
    """Regression: from_hf(dtype=torch.bfloat16) (and any .to(bfloat16) / .half() of a Llama) rounded
    inv_freq to bf16, shifting every RoPE angle; transformers keeps them float32."""
    _save_llama(tmp_path, rope=LLAMA3_ROPE)
    hf = _hf_from_disk(tmp_path, dtype=torch.bfloat16)
    m = from_hf(str(tmp_path), backend="torch", dtype=torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, hf.model.rotary_emb.inv_freq)
    assert Llama(get_config("llama-tiny")).half().inv_freq.dtype == torch.float32
    x = torch.randint(0, 101, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=2e-4, rtol=0)


# YaRN (transformers' rope_type "yarn"), both config layouts; each row exercises other optional keys.
YARN_CASES = {
    "plain": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, "new"),
    "mscale-old-layout": ({"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                           "mscale_all_dim": 0.707}, "old"),
    "no-truncate-betas": ({"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16,
                           "beta_fast": 8, "beta_slow": 0.5, "truncate": False, "attention_factor": 0.8}, "new"),
    "factor-from-lengths": ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}, "old"),
}


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_from_hf_yarn_matches_transformers(tmp_path, case):
    rope, layout = YARN_CASES[case]
    _save_llama(tmp_path)
    _edit_config(tmp_path, _old_rope_layout(rope) if layout == "old"
                 else lambda c: c.update(rope_parameters=dict(rope, rope_theta=50.0)))
    hf = _hf_from_disk(tmp_path)
    m = from_hf(str(tmp_path), backend="torch")
    assert torch.equal(m.inv_freq, hf.model.rotary_emb.inv_freq)
    assert m.config.rope_scaling["attention_factor"] == hf.model.rotary_emb.attention_scaling
    if case == "plain":  # the ramp: some frequencies kept, some divided by factor, some in between
        plain = 1.0 / (50.0 ** (torch.arange(0, 12, 2, dtype=torch.float32) / 12))
        ratio = plain / m.inv_freq
        assert (ratio == 1).any() and ((ratio - 4).abs() < 1e-5).any() and ((ratio > 1.01) & (ratio < 3.99)).any()
        assert m.config.rope_scaling["attention_factor"] != 1.0
    _assert_same_logits(tmp_path, hf, T=64)


@pytest.mark.parametrize("rope", [YARN_CASES["mscale-old-layout"][0], {"type": "dynamic", "factor": 2.0}],
                         ids=["yarn", "dynamic"])
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_from_hf_scaled_rope_generation_matches_transformers(tmp_path, rope, backend):
    """Greedy decoding through the KV cache up to max_position_embeddings, with and without left
    padding, gives transformers' generate() tokens. ("dynamic" changes its frequencies only past
    max_position_embeddings, which the zoo refuses to reach: within it they are the plain ones.)"""
    from llmkern.generation import generate

    _save_llama(tmp_path)
    _edit_config(tmp_path, _old_rope_layout(rope))
    hf = _hf_from_disk(tmp_path)
    m = from_hf(str(tmp_path), backend=backend)
    x = torch.randint(0, 101, (2, 5))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    for kw in ({}, {"attention_mask": mask}):
        with torch.no_grad():
            want = hf.generate(x, max_new_tokens=59, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(generate(m, x, 59, **kw), want)
    if rope.get("type") == "dynamic":
        with pytest.raises(ValueError, match="dynamic"):
            m(x[:, :2], position_ids=torch.tensor([[63, 64], [63, 64]]))


def test_rope_scaling_config_checks():
    with pytest.raises(ValueError, match="arch='llama' only"):
        get_config("gpt-tiny").replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    cfg = get_config("llama-tiny").replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    base = Llama(get_config("llama-tiny"), backend="torch").inv_freq
    torch.testing.assert_close(Llama(cfg, backend="torch").inv_freq, base / 2)


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(str(tmp_path))
    hf = transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=8)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        from_hf(str(tmp_path))


# ----------------------------------------------------------------------------- our ops and PEFT
@pytest.mark.parametrize("name", ARCHS)
def test_llmkern_backend_uses_llmkern_attention(name, monkeypatch):
    ops = pytest.importorskip("llmkern.ops.attention")
    calls = {"attention": 0, "attention_with_kvcache": 0}
    for fn in calls:
        orig = getattr(ops, fn)

        def counted(*a, _fn=fn, _orig=orig, **kw):
            calls[_fn] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(ops, fn, counted)
    m = build(name, backend="llmkern").eval()
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        m(x)
        assert calls["attention"] == m.config.n_layer
        cache = m.new_cache(2, 8)
        m(x[:, :5], cache=cache)
        m(x[:, 5:], cache=cache)
    assert calls["attention_with_kvcache"] == m.config.n_layer
    m.backend = "torch"
    before = dict(calls)
    with torch.no_grad():
        m(x)
    assert calls == before


@pytest.mark.parametrize("name", ARCHS)
def test_peft_attaches(name):
    peft = pytest.importorskip("llmkern.peft")
    torch.manual_seed(0)
    data = torch.randint(0, 256, (2, 17))
    cfg = build(name).config
    for kind in ("lora", "adapter", "prefix"):
        m = build(name, backend="llmkern")
        with torch.no_grad():
            base = m(data)
        if kind == "lora":
            peft.inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8)
        elif kind == "adapter":
            peft.add_adapters(m, ["mlp"], d=cfg.n_embd, r=8)
        else:
            for p in m.parameters():
                p.requires_grad_(False)
            m.attach_prefix(peft.PrefixTuning(cfg.n_layer, 3, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head))
        trainable = [p for p in m.parameters() if p.requires_grad]
        assert trainable and sum(p.numel() for p in trainable) < 0.2 * m.num_params()
        opt = torch.optim.AdamW(trainable, lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = []
            for _ in range(8):
                _, loss = m(data, labels=data)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        assert losses[-1] < losses[0], (kind, losses)
        if kind == "prefix":  # decoding through the cache sees the prefix too
            m.eval()
            with torch.no_grad():
                full = m(data)
                assert not torch.allclose(full, base)
                cache = m.new_cache(2, 17)
                steps = [m(data[:, :9], cache=cache)] + [m(data[:, t:t + 1], cache=cache) for t in range(9, 17)]
                torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def _tp_rank(rank, world_size, names):
    return [_tp_one(name) for name in names]


def _tp_one(name):
    import llmkern.parallel as par

    torch.manual_seed(0)
    m = build(name, backend="llmkern").eval()
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = m(x)
        par.tensor_parallelize(m)
        out = m(x)
        cache = m.new_cache(2, 10)  # the cache follows the sharded head counts
        dec = torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, 10)], 1)
    return (out - ref).abs().max().item(), (dec - ref).abs().max().item()


def test_tensor_parallelize_shards_zoo_models():
    """2 gloo ranks: the sharded GPT and Llama give the unsharded logits, also through the cache."""
    launch = pytest.importorskip("llmkern.parallel.launch")
    for per_rank in launch.spawn(_tp_rank, world_size=2, args=(ARCHS,), timeout=150):
        for err, dec_err in per_rank:
            assert err < 1e-4 and dec_err < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_agree_train_and_decode(name, dtype):
    """On CUDA the llmkern backend runs the Triton attention (and the split-K decode kernel)."""
    torch.manual_seed(0)
    m = build(name, backend="torch", n_layer=2, block_size=256).cuda().to(dtype)
    x = torch.randint(0, 256, (2, 200), device="cuda")
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    with torch.no_grad():
        ref = m(x).float()
        m.backend = "llmkern"
        torch.testing.assert_close(m(x).float(), ref, **tol)
        cache = m.new_cache(2, 256)
        parts = [m(x[:, :190], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(190, 200)]
        torch.testing.assert_close(torch.cat(parts, 1).float(), ref, **tol)
    opt = m.configure_optimizer(lr=1e-3)
    for backend in ("llmkern", "torch"):
        m.backend = backend
        _, loss = m(x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)


def test_from_hf_sharded_checkpoint_and_dtype(tmp_path):
    hf = _save_llama(tmp_path / "full")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    m = from_hf(str(tmp_path / "sharded"), backend="torch", dtype=torch.float64)
    assert next(m.parameters()).dtype == torch.float64
    x = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(x).float(), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_padded_linear_matches_linear_with_an_aligned_row_stride():
    """The LM head's padded product (GPT-2's V = 50257 is odd; cuBLAS needs aligned strides on GPU):
    same values and gradients as F.linear, logits a view whose row stride is a multiple of 64."""
    from llmkern.models._attn import padded_linear

    torch.manual_seed(0)
    h = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(99, 16, dtype=torch.float64, requires_grad=True)
    y = padded_linear(h, W)
    assert y.shape == (2, 5, 99) and y.stride(-2) == 128 and y.stride(-1) == 1
    ref_y = torch.nn.functional.linear(h, W)
    torch.testing.assert_close(y, ref_y)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (h, W), g)
    want = torch.autograd.grad(ref_y, (h, W), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ARCHS)
def test_compiled_step_runs_the_triton_ops(name, monkeypatch):
    """torch.compile(fullgraph=True) of a zoo model with backend="llmkern" and the Triton kernels (the
    interpreter here; what the mfu suite's compiled rows run on a GPU): the attention and cross-entropy
    custom ops trace without graph breaks, and loss and gradients equal the eager ones."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    torch._dynamo.reset()
    m = build(name, backend="llmkern", n_layer=1)
    x = torch.randint(0, 256, (2, 24))
    _, loss = m(x, labels=x)
    loss.backward()
    eager = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    launched = []
    import llmkern.kernels.attention as KA
    launch = KA._launch
    monkeypatch.setattr(KA, "_launch", lambda name_, *a, **kw: (launched.append(name_), launch(name_, *a, **kw))[1])
    _, loss_c = torch.compile(m, fullgraph=True)(x, labels=x)
    loss_c.backward()
    assert launched[:1] == ["fwd"] and "dkdv" in launched and "dq" in launched, launched
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    for a, b in zip([p.grad for p in m.parameters()], eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,qk_norm", [("gpt-tiny", False), ("llama-tiny", False), ("llama-tiny", True)])
def test_llmkern_backend_runs_the_fused_elementwise_ops(name, qk_norm, monkeypatch):
    """backend="llmkern" runs RMSNorm / LayerNorm (fused with the residual add before the second norm),
    RoPE and SwiGLU on llmkern's ops, here through their Triton kernels under the interpreter: every op
    is called, and logits and every gradient equal backend="torch"'s (the same weights)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    import llmkern

    kw = {"qk_norm": True} if qk_norm else {}
    ref = build(name, backend="torch", n_layer=2, **kw)
    m = copy.deepcopy(ref)
    m.backend = "llmkern"
    calls = {}
    for op in ("rms_norm", "layer_norm", "rope", "swiglu"):
        fn = getattr(llmkern, op)

        def counted(*a, _op=op, _fn=fn, **k):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(llmkern, op, counted)
    x = torch.randint(0, 256, (2, 13))
    out = {}
    for model in (ref, m):
        logits, loss = model(x, labels=x)
        loss.backward()
        out[model.backend] = (logits, [p.grad for p in model.parameters()])
    L = 2
    if name.startswith("gpt"):
        assert calls == {"layer_norm": 2 * L + 1}, calls  # ln_1, ln_2 per block, ln_f
    else:
        norms = 2 * L + 1 + (2 * L if qk_norm else 0)
        assert calls == {"rms_norm": norms, "rope": L, "swiglu": L}, calls
    torch.testing.assert_close(out["llmkern"][0], out["torch"][0], atol=2e-5, rtol=2e-5)
    for a, b in zip(out["llmkern"][1], out["torch"][1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_torch_backend_padding_rows_equal_llmkern(name):
    """With left and right padding, backend="torch" gives llmkern's logits at every position, padding ones
    included: a query with no visible key attends to nothing (zeros), and a right-padding query sees the
    real keys only. Before, SDPA's path let padding queries also see their own key, so the loss on
    labels predicted from the last left-padding position differed (found by the from_hf fuzz)."""
    torch.manual_seed(0)
    m = build(name, backend="torch").eval()
    x = torch.randint(0, 256, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, :3] = 0
    am[1, 7:] = 0
    with torch.no_grad():
        want = m(x, attention_mask=am)
        m.backend = "llmkern"
        got = m(x, attention_mask=am)
    torch.testing.assert_close(want, got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, changes", [
    ("gpt2", dict(n_embd=1536)), ("llama-tiny", dict(n_embd=128)), ("gpt2", dict(arch="llama")),
    ("gpt2", dict(n_head=16)), ("mixtral-tiny", dict(intermediate_size=128)), ("gpt-tiny", dict(dropout=0.1)),
])
def test_config_object_overrides_rederive_unset_fields(name, changes):
    """Regression: get_config(cfg, **changes) / build(cfg, **changes) kept the fields __post_init__ had derived
    (head_dim, n_kv_head, intermediate_size, activation, ...) as if given: another model than building by name
    (gpt2 with n_head=16 raised). The fields given explicitly keep their values."""
    by_name = get_config(name, **changes)
    assert get_config(get_config(name), **changes) == by_name
    assert get_config(name).replace(**changes) == by_name
    if name.endswith("tiny"):
        a, b = build(name, **changes), build(get_config(name), **changes)
        assert b.config == a.config and sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    explicit = ModelConfig(arch="llama", n_embd=64, n_head=4, head_dim=32, intermediate_size=100, vocab_size=256)
    changed = explicit.replace(n_embd=128)
    assert (changed.head_dim, changed.intermediate_size, changed.n_kv_head) == (32, 100, 4)
    assert explicit.replace(n_head=8).n_kv_head == 8  # derived: follows n_head
    assigned = get_config("llama-tiny")
    assigned.head_dim = 32  # assigned after construction: kept
    assert assigned.replace(n_embd=128).head_dim == 32
    with pytest.raises(ValueError, match="n_layers"):
        get_config(get_config("gpt-tiny"), n_layers=3)


def test_from_hf_config_keeps_explicit_fields_on_replace(tmp_path):
    """A from_hf config's fields are explicit: replace() keeps them (regression guard for the re-derivation)."""
    _save_llama(tmp_path, head_dim=16)
    m = from_hf(str(tmp_path), backend="torch")
    c = m.config.replace(n_embd=96)
    assert (c.head_dim, c.intermediate_size, c.n_kv_head, c.tie_embeddings) == (16, 80, 2, False)


def test_kv_cache_that_does_not_fit_raises_naming_cache():
    """Regression: a KVCache of the wrong batch, layers, kv heads or head_dim was accepted and failed deep inside
    torch (a batch-1 input broadcast over a larger cache); bad sizes were accepted by the constructor; reorder
    with an index past the batch raised IndexError."""
    m = build("llama-tiny").eval()
    c = m.config
    ids = torch.randint(0, c.vocab_size, (2, 5))
    bad = {"batch": m.new_cache(1, 16), "batch ": m.new_cache(3, 16),
           "layers": KVCache(1, 2, c.n_kv_head, 16, c.head_dim), "heads": KVCache(c.n_layer, 2, 3, 16, c.head_dim),
           "channels": KVCache(c.n_layer, 2, c.n_kv_head, 16, 32)}
    for what, cache in bad.items():
        with pytest.raises(ValueError, match="cache"):
            m(ids, cache=cache)
    with pytest.raises(ValueError, match="cache"):
        m(ids, cache="not a cache")
    for args in ((2, 16.0), (0, 16), (True, 16), (2, 0), (2, -1)):
        with pytest.raises(ValueError, match="new_cache"):
            m.new_cache(*args)
    for i, v in enumerate((0, 1.5, True)):
        sizes = [c.n_layer, 2, c.n_kv_head, 16, c.head_dim]
        for j in range(5):
            with pytest.raises(ValueError, match="KVCache"):
                KVCache(*(sizes[:j] + [v] + sizes[j + 1:]))
    g = build("gpt-tiny").eval()
    with pytest.raises(ValueError, match="cache"):  # another model's cache
        g(torch.randint(0, 256, (2, 5)), cache=m.new_cache(2, 16))
    cache = m.new_cache(2, 16)
    m(ids, cache=cache)
    for idx in (torch.tensor([0, 5]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), [0, 1], torch.tensor([[0, 1]])):
        with pytest.raises(ValueError, match="reorder"):
            cache.reorder(idx)
    cache.reorder(torch.tensor([1, 1, 0]))  # beam search spreads rows: the batch grows
    assert cache.shape[0] == 3 and cache.lengths.tolist() == [5, 5, 5]
    out = m(torch.randint(0, c.vocab_size, (3, 1)), cache=cache)
    assert out.shape == (3, 1, c.vocab_size)
    with pytest.raises(ValueError, match="cache"):
        m(torch.randint(0, c.vocab_size, (2, 1)), cache=cache)


def test_latent_cache_checked_against_the_model():
    m = build("deepseek-v3-tiny").eval()
    ids = torch.randint(0, 256, (2, 4))
    ref = m(ids)
    torch.testing.assert_close(m(ids, cache=m.new_cache(2, 8, latent=True)), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m(ids, cache=m.new_cache(2, 8)), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cache: a LatentKVCache"):
        build("llama-tiny", n_layer=3)(ids, cache=m.new_cache(2, 8, latent=True))


@pytest.mark.parametrize("name", ARCHS)
def test_input_ids_outside_the_vocabulary_raise(name):
    """Regression: ids >= vocab_size or < 0 raised IndexError in the embedding (a device assert on CUDA)."""
    m = build(name)
    V = m.config.vocab_size
    for bad in (V, -1):
        x = torch.randint(0, V, (2, 4))
        x[1, 2] = bad
        with pytest.raises(ValueError, match="input_ids.*vocab_size"):
            m(x)
    m(torch.full((1, 3), V - 1))


@pytest.mark.parametrize("dtype, want", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                         ("float32", torch.float32), (torch.bfloat16, torch.bfloat16),
                                         ("auto", torch.bfloat16)])
def test_from_hf_dtype_names(tmp_path, dtype, want):
    """Regression: from_hf(dtype="bfloat16") raised a TypeError from nn.Module.to; names and transformers'
    "auto" (config.json's dtype, else the weights') are taken, other values refused naming dtype."""
    hf = _save_llama(tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m = from_hf(str(tmp_path / "bf16"), backend="torch", dtype=dtype)
    assert next(m.parameters()).dtype == want and m.inv_freq.dtype == torch.float32
    if dtype == "auto":
        assert next(from_hf(str(tmp_path / "f32"), dtype="auto").parameters()).dtype == torch.float32
        _edit_config(tmp_path / "bf16", lambda c: [c.pop(k, None) for k in ("dtype", "torch_dtype")])
        assert next(from_hf(str(tmp_path / "bf16"), dtype="auto").parameters()).dtype == torch.bfloat16  # weights'
        for bad in ("int8", "float8_e4m3fn", "fp32x", 16, torch.int64, "__class__"):
            with pytest.raises(ValueError, match="dtype"):
                from_hf(str(tmp_path / "f32"), dtype=bad)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_zoo_models_pickle(name, tmp_path):
    """GPT kept its default activation as a lambda: torch.save(model) / pickle failed."""
    model = build(name).eval()
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))


def test_head_dims_past_the_kernels_limit_fall_back_to_sdpa():
    """A config with head_dim > 256 (valid: the torch backend runs it) crashed on the llmkern backend in
    llmkern.attention's head-dim check; it now runs SDPA there, with a warning, and equals the torch backend."""
    cfg = get_config("llama-tiny").replace(head_dim=264)
    torch.manual_seed(0)
    ours = build(cfg, backend="llmkern").eval()
    plain = build(cfg, backend="torch").eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), plain(ids))


def test_float64_model_loss_stays_float64():
    """The torch backend's loss upcast every non-float32 logits to float32, float64 included (2e-7 off)."""
    import torch.nn.functional as F

    model = build("llama-tiny", backend="torch").double()
    ids = torch.randint(0, 256, (2, 6))
    logits, loss = model(ids, ids)
    assert loss.dtype == torch.float64
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt-tiny", "llama-tiny"])
def test_int32_labels_on_the_torch_backend(arch):
    """int32 labels worked on backend="llmkern" and raised in F.cross_entropy on backend="torch"."""
    torch.manual_seed(0)
    model = build(arch, backend="torch")
    ids = torch.randint(0, 256, (2, 8))
    want = model(ids, labels=ids)[1]
    torch.testing.assert_close(model(ids, labels=ids.int())[1], want)


@pytest.mark.parametrize("backend", ["torch", "llmkern"])
@pytest.mark.parametrize("bad", [torch.float32, torch.bool, torch.uint8])
def test_non_integer_labels_refused_on_every_backend(backend, bad):
    """Float labels were truncated to other tokens and bool ones scored the ignored last position as label 1 on
    the torch backend (the llmkern one refused them), the fused-loss path included."""
    model = build("gpt-tiny", backend=backend)
    ids = torch.randint(0, 256, (2, 8))
    for kw in (dict(), dict(return_logits=False)):
        with pytest.raises(ValueError, match="labels must be an int64 or int32"):
            model(ids, labels=ids.to(bad), **kw)


def test_llama_padding_row_starts_at_zero():
    """The init loop drew the padding row of the embedding again, which padding_idx then kept from training:
    a random vector for good (nn.Embedding and transformers zero it)."""
    from llmkern.models.llama import Llama

    torch.manual_seed(0)
    model = Llama(get_config("llama-tiny", pad_token_id=3, tie_embeddings=False))
    assert model.embed_tokens.weight[3].abs().max() == 0 and model.embed_tokens.weight[4].abs().max() > 0
