"""Multi-head latent attention's compressed KV cache (LatentKVCache, new_cache(latent=True)) with kv_b_proj absorbed
into the query and the output: the same logits and tokens as the full per-head cache and as no cache.

Tiny float32 deepseek-v3-tiny-style models (R = kv_lora_rank 16, Dr = rope 8, 4 heads of nope 16 + rope 8, Dv 12)
with weights of order 0.1, so that greedy and sampled tokens are decided by clear margins: the variants cover
q_lora_rank set / None, interleaved / rotate-half RoPE, YaRN (its softmax scale) and attn_scale None with R + Dr
!= nope + rope (a softmax scale taken from the latent's width would show).
"""
import copy
import warnings

import pytest
import torch

from llmkern.generation import generate
from llmkern.models import Llama, get_config
from llmkern.models._attn import KVCache, LatentKVCache
from llmkern.models.configs import yarn_mscale
from llmkern.testing import collect_close, raise_failures

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 0.7}
VARIANTS = {  # name -> config changes
    "v3": dict(),  # q through a rank-24 bottleneck, interleaved RoPE
    # one q_proj, rotate-half RoPE, the implied scale 1/sqrt(nope + rope); R = 24, so that R + Dr = 32 != nope + rope
    "lite": dict(q_lora_rank=None, rope_interleave=False, attn_scale=None, kv_lora_rank=24),
    "yarn": dict(q_lora_rank=None, rope_scaling=YARN, attn_scale=24 ** -0.5 * yarn_mscale(4.0, 0.7) ** 2),
}
R, DR, H, D, DV, L = 16, 8, 4, 24, 12, 3  # deepseek-v3-tiny's MLA sizes
PAD = 5


def _model(variant="v3", backend="torch", seed=0, **changes):
    """A deepseek-v3-tiny Llama with weights of order 0.1 (decisive logits and routers)."""
    torch.manual_seed(seed)
    m = Llama(get_config("deepseek-v3-tiny", **{**VARIANTS[variant], **changes}), backend=backend).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, t in list(m.named_parameters()) + list(m.named_buffers()):
            if n.endswith("mlp.gate.weight") or n.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif "layers" in n and "norm" not in n:
                t.normal_(0.0, 0.1, generator=g)
    return m


def _ids(B=2, T=7, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _decode(m, x, prompt, latent, chunk=None):
    """Logits [B, T, V] of x through a cache: the first `prompt` tokens at once, then one token per forward
    (or, from `chunk` on, the rest in one forward)."""
    cache = m.new_cache(x.shape[0], 32, latent=latent)
    outs = [m(x[:, :prompt], cache=cache)]
    stop = x.shape[1] if chunk is None else chunk
    outs += [m(x[:, t:t + 1], cache=cache) for t in range(prompt, stop)]
    if chunk is not None:
        outs.append(m(x[:, chunk:], cache=cache))
    return torch.cat(outs, 1), cache


def _spy(monkeypatch):
    """Records (k_cache, v_cache) of every llmkern.attention_with_kvcache call."""
    ops = pytest.importorskip("llmkern.ops.attention")
    calls, orig = [], ops.attention_with_kvcache
    monkeypatch.setattr(ops, "attention_with_kvcache", lambda *a, **kw: (calls.append(a[1:3]), orig(*a, **kw))[1])
    return calls


def _spy_mla(monkeypatch):
    """Records (kv_cache, head_dim_v) of every llmkern.mla_decode call the zoo makes."""
    from llmkern.ops import mla_decode as mla_ops

    calls, orig = [], mla_ops.mla_decode
    monkeypatch.setattr(mla_ops, "mla_decode", lambda *a, **kw: (calls.append((a[1], kw["head_dim_v"])),
                                                                 orig(*a, **kw))[1])
    return calls


# ---- the cache --------------------------------------------------------------------------------------

def test_latent_cache_layout_and_bytes():
    """One [B, 1, max_len, R + Dr] buffer per layer: (R + Dr) * layers * 4 bytes per token in float32, H * (D + Dv)
    / (R + Dr) = 6 times less than the full cache; values are the keys' first R channels (a view)."""
    m = _model()
    x = _ids(T=9)
    with torch.no_grad():
        _, lat = _decode(m, x, 6, True)
        _, full = _decode(m, x, 6, False)
    assert type(lat) is LatentKVCache and type(full) is KVCache and not full.latent
    assert all(t.shape == (2, 1, 32, R + DR) for t in lat.k) and lat.v == [None] * L
    assert lat.nbytes / (2 * 32) == (R + DR) * L * 4
    assert full.nbytes / lat.nbytes == H * (D + DV) / (R + DR) == 6
    k, v = lat.append(0, torch.zeros(2, 1, 1, R + DR))
    assert v.data_ptr() == k.data_ptr() and v.shape == (2, 1, 32, R) and v.stride() == k.stride()
    assert torch.equal(lat.lengths, torch.full((2,), 9, dtype=torch.int32))


def test_latent_cache_under_autocast():
    """Under bf16 autocast the latent is cached in bf16 (not the latent norm's float32): half the bytes; logits
    as the full cache's to bf16 rounding."""
    m = _model()
    x = _ids(T=9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lat, cache = _decode(m, x, 6, True)
        full, _ = _decode(m, x, 6, False)
    assert cache.k[0].dtype == torch.bfloat16 and cache.nbytes == (R + DR) * L * 2 * 2 * 32
    torch.testing.assert_close(lat.float(), full.float(), atol=3e-2, rtol=0)


def test_latent_cache_errors():
    with pytest.raises(ValueError, match="latent=True needs multi-head latent attention"):
        Llama(get_config("llama-tiny")).new_cache(2, 8, latent=True)
    with pytest.raises(TypeError, match="latent must be a bool"):
        _model().new_cache(2, 8, latent="yes")
    with pytest.raises(ValueError, match=r"the latent must be \[batch, 1, T, 24\]"):
        LatentKVCache(1, 2, 8, R, DR).append(0, torch.zeros(2, 4, 1, R + DR))


# ---- logits -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_decode_logits_match_full_cache(variant, backend, monkeypatch):
    """Decode steps (and a 3-token chunk) through the latent cache give the full cache's and the uncached
    forward's logits to float32 rounding. backend="llmkern" runs llmkern.mla_decode on the latent itself:
    MQA, keys R + Dr wide, values its first R channels (no copy)."""
    calls = _spy_mla(monkeypatch)
    m = _model(variant, backend)
    x = _ids(T=12)
    with torch.no_grad():
        want = m(x)
        lat, _ = _decode(m, x, 6, True, chunk=9)
        n_lat = len(calls)
        full, _ = _decode(m, x, 6, False, chunk=9)
    torch.testing.assert_close(lat, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lat, want, atol=1e-5, rtol=1e-5)
    r = m.config.kv_lora_rank
    assert n_lat == (4 * L if backend == "llmkern" else 0)  # three single tokens and the chunk, every layer
    for kv_cache, head_dim_v in calls:
        assert kv_cache.shape == (2, 1, 32, r + DR) and head_dim_v == r


def test_wide_latent_runs_mla_decode(monkeypatch):
    """R + Dr > 256 (past the dense kernels' head dims; a real DeepSeek's is 512 + 64): backend="llmkern" still
    decodes the latent with llmkern.mla_decode, without a warning; same logits as the full cache."""
    calls = _spy_mla(monkeypatch)
    m = _model(backend="llmkern", kv_lora_rank=256)
    x = _ids(T=8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        lat, _ = _decode(m, x, 6, True)
        full, _ = _decode(m, x, 6, False)
    assert len(calls) == 2 * L and calls[0][0].shape[-1] == 264 and calls[0][1] == 256
    torch.testing.assert_close(lat, full, atol=1e-5, rtol=1e-5)


def test_latent_past_mla_decode_limits_falls_back_to_sdpa(monkeypatch):
    """A latent wider than mla_decode takes (kv_lora_rank > 512) decodes with SDPA, says so once, and gives the
    full cache's logits."""
    calls = _spy_mla(monkeypatch)
    m = _model(backend="llmkern", kv_lora_rank=520)
    x = _ids(T=8)
    monkeypatch.setattr(__import__("llmkern._backend", fromlist=["_warned"]), "_warned", set())
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="520 \\+ 8 channels exceed llmkern.mla_decode"):
            lat, _ = _decode(m, x, 6, True)
        full, _ = _decode(m, x, 6, False)
    assert calls == []
    torch.testing.assert_close(lat, full, atol=1e-5, rtol=1e-5)


def test_triton_interpreter_decode(triton_backend, monkeypatch):
    """The Triton MLA decode kernel (under the interpreter on a CPU) on the latent, with rows of different
    lengths (a left-padded batch): the torch backend's full-cache logits."""
    calls = _spy_mla(monkeypatch)
    m = _model("yarn", "llmkern")
    x = _ids(T=9)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        got = _decode_masked(m, x, mask, 6, True)
        m.backend = "torch"
        want = _decode_masked(m, x, mask, 6, False)
    assert len(calls) == 3 * L
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def _decode_masked(m, x, mask, prompt, latent):
    """_decode with an attention mask (left padding): logits [B, T, V]."""
    cache = m.new_cache(x.shape[0], 32, latent=latent)
    outs = [m(x[:, :prompt], cache=cache, attention_mask=mask[:, :prompt])]
    outs += [m(x[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]) for t in range(prompt, x.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_wrapped_kv_b_proj_is_absorbed_merged(use_dora):
    """A LoRA (or DoRA) kv_b_proj: the latent path absorbs the weight its forward applies (adapter merged in,
    recomputed each step), unmerged and merged: the full cache's logits."""
    from llmkern.peft import inject_lora, merge_lora

    m = _model()
    inject_lora(m, ["kv_b_proj"], r=4, alpha=8.0, use_dora=use_dora)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    x = _ids(T=9)
    with torch.no_grad():
        full, _ = _decode(m, x, 6, False)
        assert (full - _decode(_model(), x, 6, False)[0]).abs().max() > 1e-2  # (the adapter matters)
        torch.testing.assert_close(_decode(m, x, 6, True)[0], full, atol=1e-5, rtol=1e-5)
        merge_lora(m)
        torch.testing.assert_close(_decode(m, x, 6, True)[0], full, atol=1e-5, rtol=1e-5)


def test_peft_lora_with_bias_and_per_sample_adapters():
    """PEFT's LoRA on kv_b_proj with lora_bias=True: the absorbed path adds the values' bias (the keys' part
    cancels in the softmax), the full cache's logits; per-sample adapters (adapter_names) cannot be absorbed
    into one weight and are refused by name."""
    peft = pytest.importorskip("peft")

    m = _model()
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj"], lora_bias=True,
                                                 init_lora_weights=False), m)
    x = _ids(T=9)
    with torch.no_grad():
        full, _ = _decode(m, x, 6, False)
        torch.testing.assert_close(_decode(m, x, 6, True)[0], full, atol=1e-5, rtol=1e-5)
    layer = m.layers[0].self_attn.kv_b_proj
    layer.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, "adapter_names": ["default"] * 2}),
                                    with_kwargs=True)  # (what PEFT's mixed-batch forward installs)
    cache = m.new_cache(2, 32, latent=True)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="adapter_names"):
        m(x[:, :6], cache=cache)
        m(x[:, 6:7], cache=cache)


# ---- generate ---------------------------------------------------------------------------------------

def _gen(m, x, latent, **kw):
    """generate with m.latent_cache = latent (checked: the caches generate made are latent or not)."""
    made = []
    m.latent_cache = latent
    m.new_cache = lambda *a, **k: made.append(Llama.new_cache(m, *a, **k)) or made[-1]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = generate(m, x, 6, pad_token_id=PAD, **kw)
    finally:
        del m.latent_cache, m.new_cache
    assert all(c.latent == latent for c in made) and (made or not kw.get("use_cache", True))
    return out


@pytest.mark.parametrize("variant, backend", [("v3", "llmkern"), ("lite", "torch"), ("yarn", "llmkern")])
def test_generate_same_tokens(variant, backend):
    """Greedy, sampled and beam-search tokens (beam search reorders the cache), unpadded and left padded: the
    latent cache's are the full cache's and the uncached ones."""
    m = _model(variant, backend)
    x = _ids(T=7)
    am = torch.ones_like(x)
    am[1, :3] = 0
    for kw in (dict(), dict(strategy="sample", seed=3, temperature=1.5), dict(strategy="beam", num_beams=3),
               dict(attention_mask=am), dict(attention_mask=am, strategy="sample", seed=4)):
        want = _gen(m, x, False, **kw)
        assert torch.equal(_gen(m, x, True, **kw), want), kw
        assert torch.equal(_gen(m, x, False, use_cache=False, **kw), want), kw


@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_speculative_decoding_with_latent_caches(backend):
    """Speculative decoding cuts both caches back per row (crop with a [B] tensor): latent caches on the target and
    on the draft give the tokens of full caches, greedy (= plain greedy) and sampled, left padded."""
    m, draft = _model("v3", backend), _model("v3", backend)
    with torch.no_grad():  # a draft close to the target: rows accept different numbers of its proposals
        g = torch.Generator().manual_seed(9)
        for prm in draft.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.01)
    x = _ids(B=3, T=7)
    am = torch.ones_like(x)
    am[1, :2] = 0
    for kw in (dict(), dict(strategy="sample", seed=5)):
        kw.update(draft_model=draft, num_draft_tokens=3, attention_mask=am)
        draft.latent_cache = True
        got = _gen(m, x, True, **kw)
        del draft.latent_cache
        assert torch.equal(got, _gen(m, x, False, **kw)), kw
    plain = _gen(m, x, False, attention_mask=am)
    assert torch.equal(_gen(m, x, True, attention_mask=am, draft_model=draft, num_draft_tokens=3), plain)


# ---- tensor parallelism -----------------------------------------------------------------------------

def tp_latent_worker(rank, p):
    """tensor_parallelize with the latent cache (replicated per rank; W_uk / W_uv the local heads' rows of the
    sharded kv_b_proj, with a LoRA adapter too): decode logits equal the unsharded uncached forward's."""
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import inject_lora

    failures = []
    for lora in (False, True):
        ref = _model("v3")
        if lora:
            inject_lora(ref, ["kv_b_proj"], r=4)
            with torch.no_grad():
                for n, prm in ref.named_parameters():
                    if "lora_B" in n:
                        prm.copy_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        tp = tensor_parallelize(copy.deepcopy(ref))
        x = _ids(T=10)
        with torch.no_grad():
            want = ref(x)
            got, cache = _decode(tp, x, 6, True)
        if tp.layers[0].self_attn.n_head != H // p or cache.k[0].shape != (2, 1, 32, R + DR):
            failures.append(f"lora={lora}: heads {tp.layers[0].self_attn.n_head}, cache {cache.k[0].shape}")
        collect_close(f"lora={lora}: latent decode", got, want, failures, atol=1e-5, rtol=1e-5)
    raise_failures(rank, failures)
    return True


def test_tensor_parallel_latent_cache_2_ranks(ranks):
    assert ranks(2).run(tp_latent_worker, (), timeout=90) == [True, True]
