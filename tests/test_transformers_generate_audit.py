"""attn_implementation="llmkern" in transformers' training and serving flows, where it differed from SDPA / eager or
failed obscurely: reentrant gradient checkpointing (the recomputed layer lost the mask's kind), attention_with_kvcache
on the kernels with inputs that require grad (an error at backward naming no input), a static step with trainable
sinks, and a static cache too short for the tokens."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
import llmkern.integrations.transformers as lt  # noqa: E402
from llmkern.reference import attention as ref  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _registered():
    lt.register()


def _grads(model, impl, ids, am, reentrant):
    model.set_attn_implementation(impl)
    model.zero_grad()
    # (transformers 5.x renames gradient_checkpointing_* to activation_checkpointing_*)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if reentrant is not None:
        enable({"use_reentrant": reentrant})  # (the kwargs dict: the first argument of both)
    try:
        out = model(input_ids=ids, attention_mask=am)
        loss = (out.last_hidden_state * am[..., None]).square().mean() + out.pooler_output.square().mean()
        loss.backward()
    finally:
        disable()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.skipif(not hasattr(transformers, "Aimv2TextModel"), reason="transformers without Aimv2")
def test_reentrant_checkpointing_recomputes_with_the_masks_kind():
    """Reentrant gradient checkpointing recomputes a layer in the backward with .detach()ed tensor arguments, which
    carry no Python attributes: Aimv2's text tower passes its (causal) mask positionally to modules whose is_causal is
    False, so the recomputed attention was bidirectional and the gradients were not SDPA's (same loss). The
    recompute now finds the mask it is a copy of."""
    torch.manual_seed(0)
    cfg = transformers.Aimv2TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=32, eos_token_id=2)
    model = transformers.Aimv2TextModel(cfg).train()
    ids = torch.randint(3, 64, (2, 8))
    ids[0, -1] = ids[1, 5] = 2
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 6:] = 0  # right padding: the causal mask is a tensor, not None
    want = _grads(model, "sdpa", ids, am, None)
    for reentrant in (False, True):
        got = _grads(model, "llmkern", ids, am, reentrant)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_detached_masks_keep_their_own_window():
    """A full and a sliding-window mask built from one bool padding mask shared its memory: each gets its own, so a
    detached copy of either is found as itself."""
    from transformers import masking_utils as mu

    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    full = lt.attention.llmkern_mask(2, 6, 6, 0, 0, mu.causal_mask_function, am)
    sliding = lt.attention.llmkern_mask(2, 6, 6, 0, 0, mu.sliding_window_causal_mask_function(3), am)
    assert lt.attention._retagged(full.detach()) is full and lt.attention._retagged(sliding.detach()) is sliding
    assert sliding._llmkern_window == 3 and full._llmkern_window is None


def test_activation_offloading_with_an_unpadded_batch():
    """Activation offloading (activation_checkpointing_enable(offload=True): save_on_cpu around each checkpointed
    layer) hands the recompute copies of the layer's tensor arguments, untagged. BERT passes its mask positionally:
    with no padding the forward gave the kernel no mask and the recompute the all-True copy, and
    torch.utils.checkpoint raised CheckpointError (recomputed tensors of other shapes). Loss and gradients as SDPA's."""
    import inspect

    if "offload" not in inspect.signature(getattr(transformers.PreTrainedModel, "activation_checkpointing_enable",
                                                  lambda: None)).parameters:
        pytest.skip("transformers without activation offloading")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(cfg).train()
    ids = torch.randint(3, 64, (2, 8))
    res = []
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model.activation_checkpointing_enable(offload=True)
        try:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
        finally:
            model.activation_checkpointing_disable()
        res.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _decode_inputs():
    q = torch.randn(1, 4, 1, 16)
    kc, vc = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    return q, kc, vc, torch.tensor([5], dtype=torch.int32)


def test_kvcache_refuses_gradients_on_the_kernels(triton_backend):
    """The decode op has no backward: inputs that require grad gave an output whose backward raised PyTorch's "no
    autograd formula registered for llmkern.attention_decode". Now a ValueError at the call names them (the cache
    is left unwritten); without grad mode the kernels run; the CPU reference path stays differentiable."""
    q, kc, vc, lens = _decode_inputs()
    k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    before = kc.clone()
    with pytest.raises(ValueError, match=r"inference-only.*\bq requires grad"):
        llmkern.attention_with_kvcache(q.requires_grad_(), kc, vc, lens)
    with pytest.raises(ValueError, match=r"inference-only.*\bk, v require grad"):
        llmkern.attention_with_kvcache(q.detach(), kc, vc, lens, k=k.requires_grad_(), v=v.requires_grad_())
    assert torch.equal(kc, before)
    with torch.no_grad():
        out = llmkern.attention_with_kvcache(q, kc, vc, lens)
    torch.testing.assert_close(out, ref.attention_with_kvcache(q.detach(), kc, vc, lens), atol=1e-5, rtol=1e-5)


def test_kvcache_stays_differentiable_on_the_reference(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    q, kc, vc, lens = _decode_inputs()
    llmkern.attention_with_kvcache(q.requires_grad_(), kc, vc, lens).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_static_step_with_trainable_sinks(triton_backend):
    """A static cache's one-token step ran attention_with_kvcache unless q, k or v required grad, trainable sinks
    (gpt-oss's) left out: the kernels' output then failed at backward. The step takes llmkern.attention's
    differentiable path."""
    from transformers import masking_utils as mu

    q, kc, vc, lens = _decode_inputs()
    sinks = torch.randn(4, requires_grad=True)
    mask = lt.attention.llmkern_mask(1, 1, 8, torch.tensor(4), 0, mu.causal_mask_function, None)
    out, _ = lt.attention.llmkern_attention_forward(torch.nn.Module(), q, kc, vc, mask, s_aux=sinks)
    out.square().sum().backward()
    s2 = sinks.detach().clone().requires_grad_()
    want = ref.attention_with_kvcache(q, kc, vc, lens, sinks=s2)
    want.square().sum().backward()
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sinks.grad, s2.grad, atol=1e-5, rtol=1e-4)


def test_static_cache_too_short_says_so():
    """Continuing generation past a static cache's slots failed in every implementation; llmkern's error advised
    DynamicCache or 'sdpa' (which fails too). It now names the cause."""
    from transformers import masking_utils as mu

    with pytest.raises(NotImplementedError, match="not bottom-right aligned.*too short.*max_cache_len 8"):
        lt.attention.llmkern_mask(1, 3, 8, torch.tensor(7), 0, mu.causal_mask_function, None)
