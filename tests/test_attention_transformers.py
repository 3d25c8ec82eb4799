"""attn_implementation="llmkern" in Hugging Face transformers: random small GPT-2, Llama (GQA) and
Mistral (GQA + sliding window) models give the logits and gradients of "eager", padded batches
included; generation with a cache and left padding gives the same tokens; masks the kernel
cannot express raise."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
import llmkern.integrations.transformers as lt  # noqa: E402
from llmkern.testing import triton_device  # noqa: E402

DEV = triton_device() or "cpu"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    lt.register()


def _model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=96, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      bos_token_id=1, eos_token_id=2)
        m = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       hidden_size=64, intermediate_size=96, vocab_size=96,
                                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "deepseek_v3":  # multi-head latent attention: v's head dim (12) != q/k's (16 + 8)
        cfg = transformers.DeepseekV3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                            vocab_size=96, max_position_embeddings=64, n_routed_experts=4,
                                            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                            bos_token_id=1, eos_token_id=2)
        m = transformers.DeepseekV3ForCausalLM(cfg)
    elif kind == "gemma2":  # attention soft-cap, query_pre_attn_scalar, sliding windows on alternate layers
        cfg = transformers.Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, hidden_size=64, intermediate_size=96, vocab_size=96,
                                        max_position_embeddings=64, sliding_window=5, attn_logit_softcapping=2.0,
                                        query_pre_attn_scalar=24, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        m = transformers.Gemma2ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         hidden_size=64, intermediate_size=96, vocab_size=96,
                                         max_position_embeddings=64, sliding_window=5,
                                         bos_token_id=1, eos_token_id=2)
        m = transformers.MistralForCausalLM(cfg)
    return m.to(DEV).float()


def _batch():
    ids = torch.randint(3, 96, (2, 12), device=DEV)
    am = torch.ones(2, 12, dtype=torch.long, device=DEV)
    am[0, :3] = 0      # left padding
    am[1, 9:] = 0      # right padding
    return ids, am


def _logits_and_grads(model, impl, ids, am):
    model.set_attn_implementation(impl)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am).logits
    (logits * am[..., None]).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "deepseek_v3", "gemma2"])
def test_same_logits_and_grads_as_eager(triton_backend, kind):
    model = _model(kind).train()
    ids, am = _batch()
    le, ge = _logits_and_grads(model, "eager", ids, am)
    lk, gk = _logits_and_grads(model, "llmkern", ids, am)
    real = am.bool()
    torch.testing.assert_close(lk[real], le[real], atol=1e-4, rtol=1e-4)
    assert set(gk) == set(ge)
    for n in ge:
        torch.testing.assert_close(gk[n], ge[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "deepseek_v3", "gemma2"])
def test_generate_with_cache_and_left_padding(kind):
    """Decode steps (bottom-right causal against the cache) and left padding, default backend."""
    model = _model(kind).eval()
    ids = torch.randint(3, 96, (2, 10), device=DEV)
    am = torch.ones(2, 10, dtype=torch.long, device=DEV)
    am[0, :4] = 0
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["eager"], out["llmkern"])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "gemma2", "llama-triton"])
def test_generate_with_a_static_cache(kind, request, monkeypatch):
    """cache_implementation="static" (transformers' cache for compiled decoding): the prefill's queries see the first
    slots of a cache longer than the prompt (sliding-window layers included), then one-token steps; left padding.
    The same tokens and scores as eager's."""
    if kind.endswith("-triton"):  # the kernels (under the interpreter on a CPU) on the sliced and masked caches
        request.getfixturevalue("triton_backend")
        kind = kind[:-len("-triton")]
    model = _model(kind).eval()
    ids = torch.randint(3, 96, (2, 9), device=DEV)
    am = torch.ones(2, 9, dtype=torch.long, device=DEV)
    am[0, :3] = 0
    steps, orig = [], llmkern.attention_with_kvcache
    monkeypatch.setattr(llmkern, "attention_with_kvcache", lambda q, k, v, lens, **kw: (
        steps.append((k.shape[2], lens.tolist())) or orig(q, k, v, lens, **kw)))
    _static_generate_as_eager(model, ids, am, max_new_tokens=6)
    # the one-token steps over the full-attention layers' 14 slots ran attention_with_kvcache with the keys written
    # so far (the sliding-window layers' caches are full after the 9-token prompt: the plain decode step)
    if kind != "mistral":
        assert {tuple(lens) for n, lens in steps if n == 14} == {(t, t) for t in range(10, 15)}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_static_cache_padding_inside_the_window(backend, request):
    """Mistral with a static cache: generate builds the masks before the forward, which builds its sliding-window
    mask again from the one it is given. Ours, already cut to the window, was cut again by the window's offset and
    hid the newest keys once padding lay inside the window (wrong tokens in every row). The same tokens and scores
    as eager's, with the window sliding past the padding."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = _model("mistral").eval()
    model.config.sliding_window = 8  # (longer than the prompt: its padding stays inside for a few steps)
    ids = torch.randint(3, 96, (2, 6), device=DEV)
    am = torch.ones(2, 6, dtype=torch.long, device=DEV)
    am[1, :3] = 0
    _static_generate_as_eager(model, ids, am, max_new_tokens=8)


def _static_generate_as_eager(model, ids, am, max_new_tokens):
    """Greedy generate with a static cache: the same tokens and scores with llmkern attention as with eager's."""
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=0, cache_implementation="static", return_dict_in_generate=True,
                                   output_scores=True)
    assert torch.equal(out["eager"].sequences, out["llmkern"].sequences)
    for a, b in zip(out["eager"].scores, out["llmkern"].scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _static_prompt_and_eager_tokens(model, max_new_tokens):
    """(ids, generate's keywords, eager attention's tokens) for a left-padded 2-row prompt of 7 tokens with a static
    cache; the model is left on llmkern attention."""
    ids = torch.randint(3, 96, (2, 7), device=DEV)
    am = torch.ones(2, 7, dtype=torch.long, device=DEV)
    am[1, :2] = 0
    kw = dict(attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    model.set_attn_implementation("eager")
    want = model.generate(input_ids=ids, **kw)
    model.set_attn_implementation("llmkern")
    return ids, kw, want


def test_generate_with_a_static_cache_compiled(monkeypatch):
    """transformers' compiled decoding: a static cache, the one-token steps through torch.compile(fullgraph=True)
    (the prefill runs eagerly, as transformers runs it); the same tokens as eager attention's."""
    model = _model("llama").eval()
    ids, kw, want = _static_prompt_and_eager_tokens(model, max_new_tokens=5)
    compiled = []
    orig = model.get_compiled_call
    monkeypatch.setattr(model, "get_compiled_call", lambda *a, **k: compiled.append(1) or orig(*a, **k))
    monkeypatch.setattr(model, "_valid_auto_compile_criteria", lambda *a, **k: True)  # (transformers: CUDA only)
    got = model.generate(input_ids=ids, compile_config=transformers.CompileConfig(fullgraph=True, backend="eager"),
                         **kw)
    assert compiled and torch.equal(got, want)


def test_generate_triton_llama(triton_backend):
    model = _model("llama").eval()
    ids = torch.randint(3, 96, (2, 8), device=DEV)
    am = torch.ones(2, 8, dtype=torch.long, device=DEV)
    am[1, :3] = 0
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["eager"], out["llmkern"])


def test_attention_dropout_runs_in_training_only(monkeypatch):
    """transformers passes the module's attention dropout in train() and 0 in eval(): GPT-2's attn_pdrop
    trains with llmkern's dropout (reproducible under torch.manual_seed) and evaluates like eager."""
    import llmkern

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, attn_pdrop=0.5,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(DEV)
    ids = torch.randint(0, 64, (2, 6), device=DEV)
    model.eval()
    model.set_attn_implementation("eager")
    want = model(input_ids=ids).logits
    model.set_attn_implementation("llmkern")
    seen, real = [], llmkern.attention
    monkeypatch.setattr(llmkern, "attention", lambda *a, **kw: seen.append(kw.get("dropout_p")) or real(*a, **kw))
    torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert seen == [0.0]
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(0)
    b = model(input_ids=ids).logits
    c = model(input_ids=ids).logits
    assert seen[1:] == [0.5, 0.5, 0.5]
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3 and (a - want).abs().max() > 1e-3
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_packed_sequences_run_as_varlen(kind):
    """position_ids restarting inside a row (padding-free packed batches): each document attends only
    to itself, as eager attention with transformers' packed-sequence mask does; logits and gradients."""
    model = _model(kind)
    if kind == "mistral":
        model.config.sliding_window = 3  # shorter than the documents: the window acts inside each one
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2]], device=DEV)
    ids = torch.randint(3, 96, (2, 9), device=DEV)
    got, want = [], []
    for impl, out in (("eager", want), ("llmkern", got)):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.square().mean().backward()
        out += [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # and each document alone gives its slice of the packed logits
    model.set_attn_implementation("llmkern")
    alone = model(input_ids=ids[:1, 3:8], position_ids=pos[:1, 3:8], use_cache=False).logits
    torch.testing.assert_close(alone, got[0][:1, 3:8], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,backend", [("llama", "triton"), ("mistral", "triton"), ("llama", "reference")])
def test_packed_sequences_compile_fullgraph(kind, backend, request):
    """Traced, transformers gives packed-sequence indices to every forward with no padding mask and no cache (it
    cannot check whether position_ids restart): the varlen bounds were read in a graph break per layer and
    torch.compile(fullgraph=True) failed. attention_segments reads them inside its custom ops (the Triton kernels) or
    masks by them (the reference): compiled whole; logits and gradients as eager attention's, packed or not."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = _model(kind)
    if kind == "mistral":
        model.config.sliding_window = 3
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]], device=DEV)
    ids = torch.randint(3, 96, (2, 9), device=DEV)
    got, want = [], []
    for impl, out in (("eager", want), ("llmkern", got)):
        model.set_attn_implementation(impl)
        model.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        logits = compiled(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.square().mean().backward()
        out += [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    torch._dynamo.reset()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_compiled_training_step_with_cuda_graphs_on_gpu():
    """On a GPU: a training step with no padding mask (transformers' packed-sequence indices: attention_segments,
    whose custom ops read the sequence bounds on the host) compiled with inductor's CUDA graphs
    (mode="reduce-overhead", fullgraph=True). The ops are tagged cudagraph_unsafe, so the graphs leave them out
    instead of failing at capture; loss and gradients as eager attention's."""
    model = _model("llama").train()
    ids = torch.randint(3, 96, (2, 12), device=DEV)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], list(range(12))], device=DEV)
    got, want = [], []
    for impl, out in (("eager", want), ("llmkern", got)):
        model.set_attn_implementation(impl)
        torch._dynamo.reset()
        step = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # (warm-up runs, then the recorded graphs replay)
            model.zero_grad()
            loss = step(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
            loss.backward()
        out += [loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]
    torch._dynamo.reset()
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_custom_4d_mask_raises():
    model = _model("llama")
    model.set_attn_implementation("llmkern")
    mask = torch.zeros(1, 1, 5, 5, device=DEV)
    with pytest.raises(NotImplementedError, match="4-D"):
        model(input_ids=torch.randint(3, 96, (1, 5), device=DEV), attention_mask=mask)


@pytest.mark.skipif(not hasattr(transformers, "Gemma4TextConfig"), reason="transformers without Gemma 4")
def test_gemma4_kv_shared_layers_refused_clearly():
    """Gemma 4's KV-shared layers slice the masks as 4-D: an IndexError in its code before; now a clear refusal."""
    cfg = transformers.Gemma4TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=96,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    model.set_attn_implementation("llmkern")
    with pytest.raises(NotImplementedError, match="KV-shared"):
        model(input_ids=torch.randint(3, 96, (1, 10)))


def _no_padding(m):
    """The mask function's result when nothing is masked: all True, no window, marked so that the attention passes
    no padding mask to the kernel (it still carries the mask's kind: causal or not)."""
    return (m.dtype == torch.bool and bool(m.all()) and m._llmkern_window is None and m._llmkern_all_visible
            and isinstance(m._llmkern_causal, bool))


def test_mask_function_returns_padding_mask():
    from transformers import masking_utils as mu

    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = lt.attention.llmkern_mask(2, 5, 5, 0, 0, mu.causal_mask_function, am)
    assert torch.equal(m, am)
    assert lt.attention.llmkern_mask(2, 5, 5, 0, 0, mu.causal_mask_function, torch.ones(2, 5, dtype=torch.bool)) is None
    full = lt.attention.llmkern_mask(2, 5, 5, 0, 0, mu.bidirectional_mask_function, torch.ones(2, 5, dtype=torch.bool))
    assert _no_padding(full) and not full._llmkern_causal  # (a tagged mask the kernel does not read: its kind)
    # decode against a static cache of 8: keys past the query are masked
    m = lt.attention.llmkern_mask(1, 1, 8, torch.tensor(4), 0, mu.causal_mask_function, None)
    assert m.tolist() == [[True] * 5 + [False] * 3]
    # a static cache's prefill (3 queries from position 0, 8 slots): the first 3 slots are its keys, all visible
    m = lt.attention.llmkern_mask(2, 3, 8, torch.tensor(0), 0, mu.causal_mask_function, None)
    assert _no_padding(m) and m.shape == (2, 3) and m._llmkern_keys == 3 and m._llmkern_causal
    # a multi-token step at position 4 with left padding: the padding mask cut to the 6 slots written by then
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    m = lt.attention.llmkern_mask(2, 2, 8, torch.tensor(4), 0, mu.causal_mask_function, am)
    assert m.tolist() == am.tolist() and m._llmkern_keys == 6 and not m._llmkern_all_visible
    with pytest.raises(NotImplementedError, match="not bottom-right aligned"):  # queries past the cache's slots
        lt.attention.llmkern_mask(1, 3, 8, torch.tensor(7), 0, mu.causal_mask_function, None)


def test_static_cache_multi_token_step_when_traced(monkeypatch):
    """Traced (torch.compile), a static cache's query offset is a tensor: a multi-token step's mask carries each row's
    key count, as a one-token step's does, for attention_with_kvcache to align the queries with the last written keys
    (the mask alone would let the chunk see its own future keys); with gradients the attention refuses it, and so
    does the mask for a cache whose slots start past position 0."""
    from transformers import masking_utils as mu

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    m = lt.attention.llmkern_mask(2, 3, 8, torch.tensor(5), 0, mu.causal_mask_function, None)
    assert m.tolist() == [[True] * 8] * 2 and m._llmkern_lengths.tolist() == [8, 8]
    m = lt.attention.llmkern_mask(1, 3, 8, torch.tensor(2), 0, mu.causal_mask_function, None)
    assert m.tolist() == [[True] * 5 + [False] * 3] and m._llmkern_lengths.tolist() == [5]
    m1 = lt.attention.llmkern_mask(1, 1, 8, torch.tensor(4), 0, mu.causal_mask_function, None)
    assert m1.tolist() == [[True] * 5 + [False] * 3] and m1._llmkern_lengths.tolist() == [5]
    with pytest.raises(NotImplementedError, match="under torch.compile"):
        lt.attention.llmkern_mask(1, 3, 8, torch.tensor(5), 2, mu.causal_mask_function, None)
    q = torch.randn(1, 4, 3, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="inference only"):
        lt.attention.llmkern_attention_forward(torch.nn.Module(), q, k, v, m)
    # without gradients: query t at slot 2 + t sees slots 0..2 + t, as eager's 4-D mask shows it
    out, _ = lt.attention.llmkern_attention_forward(torch.nn.Module(), q.detach(), k, v, m)
    vis = torch.arange(8)[None, :] <= (torch.arange(3) + 2)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.repeat_interleave(2, 1),
                                                            v.repeat_interleave(2, 1), attn_mask=vis)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_with_a_static_cache_and_a_compiled_forward(kind, monkeypatch):
    """transformers' static-cache recipe: model.forward = torch.compile(model.forward, fullgraph=True) compiles the
    prefill (a multi-token step over the cache's slots) as well as the one-token steps, with left padding; the same
    tokens as eager attention's. Llama's prefill ran attention_with_kvcache with its 7 queries (refused before);
    Mistral's sliding-window mask is analysed inside the compiled forward (a graph break before: fullgraph
    failed)."""
    model = _model(kind).eval()
    ids, kw, want = _static_prompt_and_eager_tokens(model, max_new_tokens=4)
    queries, orig = [], llmkern.attention_with_kvcache
    monkeypatch.setattr(llmkern, "attention_with_kvcache", lambda q, *a, **k: queries.append(q.shape[2]) or orig(
        q, *a, **k))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    try:
        got = model.generate(input_ids=ids, **kw)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert torch.equal(got, want)
    if kind == "llama":
        assert 7 in queries and 1 in queries


def _moe_model(kind):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=96, vocab_size=96, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, attention_dropout=0.0)
    if kind == "qwen2_moe":  # layer 0 slides (use_sliding_window, max_window_layers), layer 1 is full
        cfg = transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=48, use_sliding_window=True,
                                          sliding_window=3, max_window_layers=2, **common)
        m = transformers.Qwen2MoeForCausalLM(cfg)
    elif kind == "phimoe":
        cfg = transformers.PhimoeConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=3, **common)
        m = transformers.PhimoeForCausalLM(cfg)
    else:  # OLMoE: no sliding window in its masks, but its attention passes config.sliding_window along
        cfg = transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common)
        cfg.sliding_window = 3
        m = transformers.OlmoeForCausalLM(cfg)
    return m.to(DEV).float().eval()


@pytest.mark.parametrize("kind", ["qwen2_moe", "phimoe", "olmoe"])
def test_window_is_the_one_of_the_mask(kind):
    """Regression: the window came from the attention call's `sliding_window` argument, which Qwen2-MoE (with
    use_sliding_window) and PhiMoE do not pass although they build sliding-window masks (llmkern attended to
    every key: other logits, silently), and which OLMoE passes from its config over a full causal mask."""
    model = _moe_model(kind)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEV)
    am = torch.ones(2, 9, dtype=torch.long, device=DEV)
    am[0, :2] = 0
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = (model(input_ids=ids).logits, model(input_ids=ids, attention_mask=am).logits,
                         model.generate(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False,
                                        pad_token_id=0))
    real = am.bool()
    torch.testing.assert_close(out["llmkern"][0], out["eager"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["llmkern"][1][real], out["eager"][1][real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["llmkern"][2], out["eager"][2])


def test_mask_function_carries_the_window():
    """A sliding-window mask is a tagged tensor whenever the window masks a key, and None (no window) only
    when it masks none."""
    from transformers import masking_utils as mu

    sw = mu.sliding_window_causal_mask_function(3)
    m = lt.attention.llmkern_mask(2, 5, 5, 0, 0, sw, None)
    assert m.dtype == torch.bool and bool(m.all()) and m._llmkern_window == 3
    assert lt.attention.llmkern_mask(2, 3, 3, 0, 0, sw, None) is None  # 3 keys: the window masks none
    assert lt.attention.llmkern_mask(1, 1, 3, 7, 5, sw, None) is None  # decode against a window cache
    assert lt.attention.llmkern_mask(2, 5, 5, 0, 0, mu.causal_mask_function, None) is None
    am = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = lt.attention.llmkern_mask(2, 5, 5, 0, 0, mu.causal_mask_function, am)
    assert torch.equal(m, am) and m._llmkern_window is None


def test_cross_attention_sees_every_encoder_key():
    """Regression: the mask function masked the keys past the last query (meant for the unwritten tail of a
    static cache) for bidirectional masks too, so the cross-attention of an encoder-decoder (BART) with fewer
    decoder than encoder tokens ignored the encoder's last tokens: other logits, silently."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=96,
                                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = transformers.BartForConditionalGeneration(cfg).to(DEV).float()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (2, 10), generator=g).to(DEV)
    am = torch.ones(2, 10, dtype=torch.long, device=DEV)
    am[0, 7:] = 0
    dec = torch.randint(3, 96, (2, 4), generator=g).to(DEV)  # fewer decoder tokens than encoder tokens
    got, want = [], []
    for impl, out in (("eager", want), ("llmkern", got)):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        logits.square().mean().backward()
        out += [logits.detach()] + [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            out.append(model.generate(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False,
                                      num_beams=1, output_scores=True, return_dict_in_generate=True).scores)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:-1], want[1:-1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(got[-1], want[-1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["default", "triton"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_left_padded_training_equals_sdpa(monkeypatch, backend, kind):
    """Left padding in training: a pad query sees no key; llmkern gives it zeros, as transformers' SDPA path
    does, so the logits at every position (pads included), the loss (whose first real token is predicted from
    the last pad position) and every gradient equal SDPA's."""
    if backend == "triton":
        if triton_device() is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    model = _model(kind).train()
    ids = torch.randint(3, 96, (2, 12), device=DEV)
    am = torch.ones(2, 12, dtype=torch.long, device=DEV)
    am[0, :3] = 0
    am[1, :7] = 0
    labels = ids.masked_fill(am == 0, -100)
    res = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=am, labels=labels)
        out.loss.backward()
        res[impl] = out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (ls, loss_s, gs), (lk, loss_k, gk) = res["sdpa"], res["llmkern"]
    torch.testing.assert_close(lk, ls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_k, loss_s, atol=1e-5, rtol=1e-5)
    for n in gs:
        torch.testing.assert_close(gk[n], gs[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("kind,fullgraph,masked", [("llama", True, True), ("gemma2", True, True),
                                                   ("llama", True, False), ("mistral", True, False)])
def test_compiles(kind, fullgraph, masked):
    """The mask interface reads transformers' mask closures (names, cells). Taken as constants they crashed
    torch.compile (the packed-sequence indices transformers adds while tracing a forward with no attention mask and
    no cache are a tensor in a closure); read in a graph break, fullgraph failed on any combined mask (sliding
    windows). Names read from code objects trace: fullgraph compiles every case."""
    m = _model(kind)
    ids, am = _batch()
    kw = dict(attention_mask=am) if masked else dict(use_cache=False)
    m.set_attn_implementation("llmkern")
    with torch.no_grad():
        want = m(input_ids=ids, **kw).logits
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=fullgraph, backend="aot_eager")(input_ids=ids, **kw).logits
    keep = am[..., None] if masked else 1
    torch.testing.assert_close((got * keep).detach(), want * keep, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["aimv2_text", "gemma_bidirectional"])
def test_causality_is_the_masks_not_the_modules(family):
    """Aimv2's text tower and Gemma with use_bidirectional_attention build a causal mask for modules whose
    is_causal is False; eager and SDPA attend by a padded mask, so causally. On padded batches llmkern took the
    module's flag (bidirectional where eager and SDPA were causal)."""
    import copy

    import transformers

    torch.manual_seed(0)
    if family == "aimv2_text":
        if not hasattr(transformers, "Aimv2TextModel"):
            pytest.skip("transformers without Aimv2")
        cfg = transformers.Aimv2TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=32, eos_token_id=2)
        model = transformers.Aimv2TextModel(cfg).eval()
    else:
        cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       use_bidirectional_attention=True)
        model = transformers.GemmaModel(cfg).eval()
    ids = torch.randint(3, 64, (2, 8))
    ids[:, -1] = 2
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 6:] = 0  # right padding in row 1
    real = am.bool()
    # unpadded, a causal mask hides nothing and is None, as SDPA gets it: then the module's flag decides, as in
    # SDPA (transformers' eager and SDPA disagree there for both models)
    for mask in (am, torch.ones_like(am), None):
        outs = {}
        for impl in ("eager", "sdpa", "llmkern"):
            m = copy.deepcopy(model)
            m.set_attn_implementation(impl)
            with torch.no_grad():
                outs[impl] = m(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = real if mask is am else torch.ones_like(real)
        want = outs["eager" if mask is am else "sdpa"]
        torch.testing.assert_close(outs["llmkern"][keep], want[keep], rtol=1e-4, atol=1e-5)


def _cache_kwarg():
    """generate's keyword for a cache passed in: `cache` from transformers 5.x (`past_key_values` deprecated), before
    that `past_key_values` (told apart by the output's field)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


@pytest.mark.parametrize("kind,pads,full_cache", [("llama", 5, False), ("mistral", 15, False), ("mistral", 13, True),
                                                  ("gpt2", 6, False)])
def test_greedy_generate_on_triton_decodes_with_the_split_k_kernel(monkeypatch, triton_backend, kind, pads,
                                                                   full_cache):
    """model.generate (greedy, DynamicCache, a left-padded batch) with attn_implementation="llmkern" on the Triton
    kernels gives exactly the tokens of eager and SDPA attention, and each step's logits; the prefill (18 queries per
    row, past LLMKERN_ATTN_DECODE_MAX_TQ = 16) runs the forward kernel once per layer, and every decode step (1 query
    per row against the cache) runs the split-K decode kernel, with the padding mask while pads are among the keys.
    Llama: GQA 4/2; GPT-2: plain MHA; Mistral: MQA 4/1 and a sliding window of 5. Its default DynamicCache keeps the
    last 4 keys per layer (so the pads of the row with 3 real tokens leave the keys after the first steps, and the
    window never binds); a DynamicCache() built without the config keeps every key, so the decode kernel gets the
    window (left 4) and the padding mask."""
    from llmkern.kernels import attention as KA, attention_decode as KD

    monkeypatch.delenv("LLMKERN_ATTN_DECODE_MAX_TQ", raising=False)
    model = _model(kind).eval()
    P, new = 18, 6
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 96, (2, P), generator=g).to(DEV)
    am = torch.ones(2, P, dtype=torch.long, device=DEV)
    am[1, :pads] = 0
    calls = []
    real_dec, real_fwd = KD.attention_decode, KA.attention_forward

    def spy_dec(q, k, v, lens, **kw):
        calls.append(("decode", q.shape[2], k.shape[2], kw.get("key_padding_mask") is not None, kw.get("window_left")))
        return real_dec(q, k, v, lens, **kw)

    def spy_fwd(q, k, v, **kw):
        calls.append(("forward", q.shape[2], k.shape[2], kw.get("key_padding_mask") is not None,
                      kw.get("window_left")))
        return real_fwd(q, k, v, **kw)

    monkeypatch.setattr(KD, "attention_decode", spy_dec)
    monkeypatch.setattr(KA, "attention_forward", spy_fwd)
    out = {}
    for impl in ("eager", "sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        calls.clear()
        extra = {_cache_kwarg(): transformers.DynamicCache()} if full_cache else {}
        res = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True, **extra)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        assert isinstance(cache, transformers.DynamicCache), type(cache)
        out[impl] = res.sequences, res.scores
    # (transformers 5's DynamicCache built from a config with a sliding window: sliding layers, keeping the window)
    sliding = any("Sliding" in type(layer).__name__ for layer in getattr(cache, "layers", ()))
    assert not (sliding and (kind != "mistral" or full_cache))
    assert out["llmkern"][0].shape[1] > P + 1  # (at least one decode step)
    for impl in ("eager", "sdpa"):
        assert torch.equal(out["llmkern"][0], out[impl][0]), impl
        for step, (a, b) in enumerate(zip(out["llmkern"][1], out[impl][1])):  # each step's next-token logits
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, s=step, i=impl: f"{i} step {s}: {m}")
    layers = model.config.num_hidden_layers
    steps = out["llmkern"][0].shape[1] - P - 1  # generated tokens after the prefill's
    prefill, decode = calls[:layers], calls[layers:]
    window = 4 if kind == "mistral" else -1  # (transformers' sliding window 5: the query and 4 keys before it)
    assert prefill == [("forward", P, P, True, window)] * layers, calls
    assert len(decode) == layers * steps and all(c[0] == "decode" and c[1] == 1 for c in decode), calls
    if sliding:  # the sliding-window cache: 4 kept keys + the new one, no window left to apply
        assert {c[2:] for c in decode[-layers:]} == {(5, False, -1)}
        assert decode[0][3]  # (the first steps: pads among the 5 keys)
    else:
        assert [c[2] for c in decode[::layers]] == list(range(P + 1, P + 1 + steps))
        assert all(c[3] and c[4] == window for c in decode), decode
