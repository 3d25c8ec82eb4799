"""Activation recomputation in the zoo (ZooModel.gradient_checkpointing_enable): the same loss and
gradients as without it, for GPT, Llama, a sparse MoE model (its load-balancing loss) and Gemma's options,
on both backends, with dropout (the RNG replayed), LoRA and prefix-tuning; far fewer bytes kept for the
backward; off in eval, under no_grad and with a KV cache."""
import copy

import pytest
import torch

from llmkern.models import build, get_config
from llmkern.peft import inject_lora
from llmkern.testing import triton_device

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "gpt": get_config("gpt-tiny", dropout=0.1),
    "llama": get_config("llama-tiny", dropout=0.1),
    "mixtral": get_config("mixtral-tiny", router_aux_loss_coef=0.02),
    "gemma2-style": get_config("llama-tiny", activation="gelu_tanh", norm_offset=1.0, post_norms=True,
                               scale_embeddings=True, attn_softcap=5.0, logit_softcap=10.0, sliding_window=4),
}


def _batch(cfg, B=2, T=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return ids, ids.clone()


def _loss_and_grads(model, ids, labels, seed=3, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks' seeds come from torch's generator
    _, loss = model(ids, labels, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids, labels):
    """Bytes the autograd graph holds for the backward after one forward."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(ids, labels)
    del loss
    return sum(total)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_same_loss_and_gradients(name, backend):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = build(cfg, backend=backend).train()
    ids, labels = _batch(cfg)
    want_loss, want = _loss_and_grads(model, ids, labels)
    assert model.gradient_checkpointing_enable() is model
    loss, grads = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want.keys() and len(grads) > 10
    for n in want:  # the same ops in the same order: equal up to the rounding of the summation order
        torch.testing.assert_close(grads[n], want[n], atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    if cfg.dropout:  # the masks are replayed, not redrawn: another seed gives another loss
        other, _ = _loss_and_grads(model, ids, labels, seed=4)
        assert not torch.equal(other, loss)


def test_fused_loss_lora_and_prefix():
    """return_logits=False (linear_cross_entropy), a LoRA-injected model and prefix-tuning, recomputed."""
    from llmkern.peft import PrefixTuning

    cfg = get_config("llama-tiny")
    torch.manual_seed(0)
    model = build(cfg, backend="llmkern")
    inject_lora(model, ("q_proj", "v_proj"), r=4, alpha=8)
    model.attach_prefix(PrefixTuning(cfg.n_layer, 3, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head))
    for p in model.parameters():
        p.requires_grad_(True)  # the base weights too, so that every gradient is compared
    ids, labels = _batch(cfg)
    want_loss, want = _loss_and_grads(model, ids, labels, return_logits=False)
    model.gradient_checkpointing_enable()
    loss, grads = _loss_and_grads(model, ids, labels, return_logits=False)
    torch.testing.assert_close(loss, want_loss, atol=0, rtol=0)
    assert grads.keys() == want.keys() and any("lora_A" in n for n in grads) and any("prefix" in n for n in grads)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], atol=1e-6, rtol=1e-5)


def test_keeps_far_fewer_bytes_for_the_backward():
    cfg = get_config("llama-tiny", n_layer=4)
    torch.manual_seed(0)
    model = build(cfg, backend="torch").train()
    ids, labels = _batch(cfg, B=4, T=32)
    full = _saved_bytes(model, ids, labels)
    recomputed = _saved_bytes(model.gradient_checkpointing_enable(), ids, labels)
    # per layer only its [B, T, d] input (plus cos/sin): the saved activations shrink by several times
    assert recomputed * 3 < full, (recomputed, full)


def test_off_in_eval_no_grad_and_with_a_cache():
    cfg = get_config("gpt-tiny")
    torch.manual_seed(0)
    model = build(cfg, backend="torch").gradient_checkpointing_enable()
    ids, labels = _batch(cfg)
    calls = []
    import torch.utils.checkpoint as tuc

    real = tuc.checkpoint

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    tuc.checkpoint = spy
    try:
        model.eval()
        model(ids, labels)
        model.train()
        with torch.no_grad():
            model(ids, labels)
            cache = model.new_cache(2, 20)
            model(ids, cache=cache)
        assert calls == []
        model(ids, labels)
        assert len(calls) == cfg.n_layer
        from llmkern.generation import generate

        ref = copy.deepcopy(model).gradient_checkpointing_disable()
        assert torch.equal(generate(model, ids[:, :4], 5), generate(ref, ids[:, :4], 5))
    finally:
        tuc.checkpoint = real
    assert model.gradient_checkpointing is True
    with pytest.raises(TypeError, match="enable"):
        model.gradient_checkpointing_enable("yes")


@pytest.mark.skipif(triton_device() is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_kernels_recomputed(triton_backend):
    """The Triton kernels (attention with dropout: its seed replayed) under recomputation."""
    cfg = get_config("llama-tiny", n_layer=1, dropout=0.2, block_size=16)
    torch.manual_seed(0)
    model = build(cfg, backend="llmkern").train()
    ids, labels = _batch(cfg, B=1, T=8)
    want_loss, want = _loss_and_grads(model, ids, labels)
    model.gradient_checkpointing_enable()
    loss, grads = _loss_and_grads(model, ids, labels)
    torch.testing.assert_close(loss, want_loss)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], atol=1e-5, rtol=1e-4)
