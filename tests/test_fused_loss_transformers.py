"""llmkern.integrations.transformers.use_fused_loss: a transformers causal LM's training loss through
llmkern.linear_cross_entropy (no [B, T, V] logits) equals its own loss and gradients."""
import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern.integrations.transformers as lt  # noqa: E402


def _model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=32,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "gemma2":  # final_logit_softcapping
        cfg = transformers.Gemma2Config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        hidden_size=32, intermediate_size=48, vocab_size=97, head_dim=16,
                                        final_logit_softcapping=5.0)
        return transformers.Gemma2ForCausalLM(cfg)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=32, intermediate_size=48, vocab_size=97, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("n_items", [None, 13])
def test_fused_loss_equals_the_models_own(kind, n_items):
    ref = _model(kind).train()
    fused = lt.use_fused_loss(copy.deepcopy(ref))
    ids, labels = _batch()
    kw = {} if n_items is None else {"num_items_in_batch": torch.tensor(n_items)}
    want = ref(input_ids=ids, labels=labels, **kw)
    want.loss.backward()
    got = fused(input_ids=ids, labels=labels, **kw)
    got.loss.backward()
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)
    fused.zero_grad()
    positional = fused(ids, None, labels=labels, **kw)  # input_ids, attention_mask positionally
    assert positional.logits is None
    torch.testing.assert_close(positional.loss, want.loss, atol=1e-6, rtol=1e-6)
    fused.eval()  # eval (and calls without labels) run the model unchanged
    with torch.no_grad():
        out = fused(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (2, 11, 97)


def test_fused_loss_under_peft_lora():
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ref.train()
    fused = copy.deepcopy(ref)
    lt.use_fused_loss(fused)
    ids, labels = _batch()
    want, got = ref(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    want.loss.backward()
    got.loss.backward()
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    grads = [(n, p.grad) for n, p in fused.named_parameters() if p.requires_grad]
    for (n, g), p in zip(grads, [p for p in ref.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_unsupported_heads_raise():
    model = _model("llama")
    model.config.logits_scaling = 2.0
    with pytest.raises(ValueError, match="logits_scaling"):
        lt.use_fused_loss(model)


def test_fused_loss_return_dict_false_deepcopy_and_unsupported_heads():
    """Regressions: return_dict=False crashed (a tuple has no .items()); copy.deepcopy of a patched model
    computed the loss with the original's weights; a transform around the LM head (RoBERTa's dense +
    LayerNorm before its decoder, Falcon-H1's multiplier after) or a LoRA injected on lm_head after the
    patch gave a silently wrong loss."""
    ref = _model("llama").train()
    fused = lt.use_fused_loss(copy.deepcopy(ref))
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    out = fused(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=1e-6)
    # the model's own tuple, None in the logits' slot: (loss, logits, cache) gave (loss, cache), and
    # `loss, logits = out[:2]` took the cache for the logits
    plain = ref(input_ids=ids, labels=labels, return_dict=False)
    assert len(out) == len(plain) == 3 and out[1] is None and [type(v) for v in out[2:]] == [type(v) for v in plain[2:]]
    twin, ref2 = copy.deepcopy(fused), copy.deepcopy(ref)
    with torch.no_grad():
        for a, b in zip(twin.parameters(), ref2.parameters()):
            a.mul_(1.5)
            b.mul_(1.5)
    torch.testing.assert_close(twin(input_ids=ids, labels=labels).loss, ref2(input_ids=ids, labels=labels).loss,
                               atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    roberta = transformers.RobertaForCausalLM(transformers.RobertaConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=48, vocab_size=97,
        is_decoder=True)).train()
    lt.use_fused_loss(roberta)
    with pytest.raises(ValueError, match="lm_head"):
        roberta(input_ids=ids, labels=labels)
    fused.lm_head = torch.nn.Sequential(fused.lm_head)  # e.g. a wrapper (LoRA) put on the head after the patch
    fused.get_output_embeddings = lambda: fused.lm_head
    with pytest.raises(ValueError, match="plain nn.Linear"):
        fused(input_ids=ids, labels=labels)


def test_generate_sees_the_models_forward_signature():
    """Regression: the patched forward's signature was (*args, labels=None, **kwargs), and generate() reads
    the forward's signature to decide what to pass: without `position_ids` in it, generate stopped building
    them from the attention mask, so a left-padded batch decoded with positions counted from the padding
    (GPT-2's absolute positions: other scores, silently), and without `logits_to_keep` it ran the LM head on
    every prompt position."""
    import inspect

    ref = _model("gpt2").eval()
    fused = lt.use_fused_loss(copy.deepcopy(ref))
    assert inspect.signature(fused.forward) == inspect.signature(ref.forward)
    assert fused._supports_logits_to_keep()
    ids, _ = _batch()
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    want, got = ref.generate(**kw), fused.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(fused).train()  # the copy's signature too, and its training loss still fused
    assert inspect.signature(twin.forward) == inspect.signature(ref.forward)
    ids, labels = _batch()
    assert twin(input_ids=ids, labels=labels).logits is None


def _moe(kind):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=48, vocab_size=97, num_experts_per_tok=2, output_router_logits=True)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4,
                                                                          router_aux_loss_coef=0.5, **common))
    return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(  # its coefficient: aux_loss_coef
        num_local_experts=4, kv_channels=8, aux_loss_coef=0.5, **common))


@pytest.mark.parametrize("kind", ["mixtral", "jetmoe"])
def test_router_aux_loss_is_added(kind):
    """Regression: with output_router_logits (MoE training), the model adds coef * aux_loss (the router's
    load-balancing loss) to its loss when it gets labels; the fused loss called the model without labels
    and returned the cross-entropy alone (a loss ~1 lower, no router gradients from it), silently."""
    ref = _moe(kind).train()
    fused = lt.use_fused_loss(copy.deepcopy(ref))
    ids, labels = _batch()
    want, got = ref(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    assert want.aux_loss is not None and got.logits is None
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_losses_it_cannot_compute_raise():
    """A custom loss_function (the model's own loss is then not transformers' causal-LM cross-entropy) and a
    router aux loss whose coefficient the fused loss cannot find raise instead of being dropped."""
    model = _model("llama").train()
    lt.use_fused_loss(model)
    ids, labels = _batch()
    model.loss_function = lambda logits, labels, **kw: logits.float().mean()
    with pytest.raises(ValueError, match="loss_function"):
        model(input_ids=ids, labels=labels)
    moe = lt.use_fused_loss(_moe("mixtral").train())
    del moe.router_aux_loss_coef
    with pytest.raises(ValueError, match="aux_loss"):
        moe(input_ids=ids, labels=labels)


def test_models_with_their_own_loss_code_are_refused():
    """Regression: XLM (its prediction layer's cross-entropy, labels not shifted) and CPM-Ant (an inline
    CrossEntropyLoss) compute their loss without transformers' loss_function, and the fused loss gave the
    shifted causal-LM loss instead, silently (~20% off). A model whose forward does not compute its loss with
    self.loss_function is refused."""
    torch.manual_seed(0)
    xlm = transformers.XLMWithLMHeadModel(transformers.XLMConfig(
        vocab_size=97, emb_dim=32, n_layers=1, n_heads=2, causal=True, dropout=0.0, attention_dropout=0.0))
    with pytest.raises(ValueError, match="loss_function"):
        lt.use_fused_loss(xlm)
    llama = _model("llama")
    assert lt.use_fused_loss(llama) is llama  # (its forward calls self.loss_function)


def test_pickled_model_keeps_the_fused_loss(monkeypatch):
    """Regression: the patched forward was a bound method of a per-model function; torch.save(model) /
    torch.load gave back the model's own forward (logits computed, no fused loss) while _llmkern_fused_loss
    still said True, so use_fused_loss on it did nothing. The loaded model keeps the fused loss and signature."""
    import inspect
    import io
    import pickle

    from llmkern.ops import cross_entropy

    calls = []
    real = cross_entropy.linear_cross_entropy
    monkeypatch.setattr(cross_entropy, "linear_cross_entropy", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ref = _model("llama").train()
    fused = lt.use_fused_loss(copy.deepcopy(ref), chunk_size=4)
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for loaded in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(fused))):
        loaded.train()
        assert loaded._llmkern_fused_loss is True and loaded._llmkern_fused_loss_chunk_size == 4
        assert loaded.forward.__self__ is loaded and loaded._llmkern_original_forward.__self__ is loaded
        assert inspect.signature(loaded.forward) == inspect.signature(ref.forward)
        calls.clear()
        got = loaded(input_ids=ids, labels=labels)
        assert got.logits is None and calls == [1]
        torch.testing.assert_close(got.loss, want, atol=1e-6, rtol=1e-6)
        forward = loaded.forward
        lt.use_fused_loss(loaded)  # idempotent
        assert loaded.forward is forward
        twin = copy.deepcopy(loaded)
        assert twin.forward.__self__ is twin and twin(input_ids=ids, labels=labels).logits is None
        with torch.no_grad():  # eval: the model's own forward, as before the save
            out = loaded.eval()(input_ids=ids, labels=labels)
        assert out.logits is not None and out.logits.shape == (2, 11, 97)


@pytest.mark.parametrize("keep", [4, "tensor"])
def test_logits_to_keep_scores_the_kept_positions(keep):
    """transformers computes the loss on lm_head(hidden[:, -k:]) with [B, k] labels; the patch overwrote the
    caller's logits_to_keep with 1 and scored every position (a valid [B, k] call raised a shape error, a
    [B, T] one silently returned the whole sequence's loss)."""
    ref = _model("llama").train()
    fused = lt.use_fused_loss(copy.deepcopy(ref))
    ids, _ = _batch()
    k = keep if keep == 4 else torch.tensor([3, 7, 9, 10])
    labels = ids[:, -4:].clone() if keep == 4 else ids[:, k].clone()
    want = ref(input_ids=ids, labels=labels, logits_to_keep=k)
    got = fused(input_ids=ids, labels=labels, logits_to_keep=k)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="labels must have shape"):
        fused(input_ids=ids, labels=ids, logits_to_keep=k)  # (transformers refuses these labels too)


def test_hooks_on_the_lm_head_are_refused():
    """A forward hook on lm_head changes (or reads) the logits, which the fused loss never forms: it was
    skipped silently (the loss from the raw head weight)."""
    fused = lt.use_fused_loss(_model("llama").train())
    ids, labels = _batch()
    handle = fused.lm_head.register_forward_hook(lambda m, a, out: out * 3)
    with pytest.raises(ValueError, match="LM head has forward hooks"):
        fused(input_ids=ids, labels=labels)
    handle.remove()
    fused(input_ids=ids, labels=labels)
    fused(input_ids=ids, labels=labels)  # only the patch's own capture hooks, installed once (none per call)
    from llmkern.integrations.transformers import loss

    assert list(fused.lm_head._forward_hooks.values()) == [loss._record_head_output]
    assert list(fused.lm_head._forward_pre_hooks.values()) == [loss._record_head_input]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fused_loss_compiles_fullgraph(kind):
    """torch.compile(fullgraph=True) of a training step with the fused loss: the per-call hook registration it made
    was a graph break (fullgraph failed). The capture hooks are installed once; loss and gradients as eager's."""
    ref = _model(kind).train()
    if kind == "gpt2":
        ref.loss_type = "ForCausalLM"  # (transformers' own warning_once about a missing loss_type breaks fullgraph)
    fused = lt.use_fused_loss(copy.deepcopy(ref))
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    want.backward()
    torch._dynamo.reset()
    try:
        got = torch.compile(fused, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=labels)
        got.loss.backward()
    finally:
        torch._dynamo.reset()
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, atol=1e-6, rtol=1e-6)
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_wrapped_forwards_are_not_cached_for_good():
    """A forward that is no bound method (accelerate's hooks, torch.compile, a partial) holds its model: as a key of
    the signature caches it kept every patched model alive."""
    import gc
    import weakref

    from llmkern.integrations.transformers import loss

    refs = []
    for _ in range(3):
        m = _model("llama").train()
        m.forward = functools.partial(type(m).forward, m)  # an instance-level wrapper
        lt.use_fused_loss(m)
        ids, labels = _batch()
        m(ids, labels=labels).loss.backward()  # (positional: the signature lookup)
        refs.append(weakref.ref(m))
        del m
    gc.collect()
    assert not any(r() is not None for r in refs)
    assert not any(isinstance(k, functools.partial) for k in list(loss._SIGNATURES) + list(loss._CODE_CHECKS))


def test_calling_again_applies_the_latest_chunk_size(monkeypatch):
    """A second use_fused_loss(model, chunk_size=...) on a patched model returned it unchanged: the loss kept the
    first call's chunk_size. The latest call's chunk_size applies (None: automatic again), the forward is not
    wrapped twice, and a bad chunk_size on a re-call is refused, leaving the patch as it was."""
    from llmkern.ops import cross_entropy

    sizes = []
    real = cross_entropy.linear_cross_entropy

    def recording(*args, chunk_size=None, **kwargs):
        sizes.append(chunk_size)
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(cross_entropy, "linear_cross_entropy", recording)
    ref = _model("llama").train()
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    fused = lt.use_fused_loss(copy.deepcopy(ref), chunk_size=4)
    forward = fused.forward
    for chunk_size in (4, 8, None):
        assert lt.use_fused_loss(fused, chunk_size=chunk_size) is fused and fused.forward is forward
        sizes.clear()
        torch.testing.assert_close(fused(input_ids=ids, labels=labels).loss, want, atol=1e-6, rtol=1e-6)
        assert sizes == [chunk_size]
    lt.use_fused_loss(fused, chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        lt.use_fused_loss(fused, chunk_size=0)
    sizes.clear()
    fused(input_ids=ids, labels=labels)
    assert sizes == [8] and fused.forward is forward
