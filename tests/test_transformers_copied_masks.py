"""attn_implementation="llmkern" with masks that reach the layers as copies: llmkern's mask function tags the masks it
builds with their kind (causal, window, a static cache's key count) as Python attributes, which a copy loses
(accelerate's device_map moves the mask to each layer's device with .to(); activation offloading hands a checkpointed
layer's recompute copies of its arguments). The module's own flags then decided, and where they are not the mask's
(OLMoE, Qwen2-MoE, PhiMoE, Aimv2's text tower) the results silently differed from eager; a static cache's prefill
failed on a key count. A copy now gets the tags of the mask it copies, or a clear error."""
import contextlib
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern.integrations.transformers as lt  # noqa: E402
from llmkern.integrations.transformers import attention as la  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64


@pytest.fixture(scope="module", autouse=True)
def _registered():
    lt.register()


@contextlib.contextmanager
def _copied_inputs(model):
    """Every layer gets copies of its tensor arguments, as with accelerate's device_map across devices."""
    def clone(x):
        return x.clone() if isinstance(x, torch.Tensor) else x

    def pre(module, args, kwargs):
        return tuple(map(clone, args)), {k: clone(v) for k, v in kwargs.items()}

    from transformers.modeling_layers import GradientCheckpointingLayer

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()
             if isinstance(m, GradientCheckpointingLayer)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _model(kind):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=48, vocab_size=V, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if kind == "olmoe":  # passes config.sliding_window to the attention with a full causal mask
        cfg = transformers.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2, sliding_window=4)
        return transformers.OlmoeForCausalLM(cfg).eval()
    if kind == "aimv2":  # a causal mask for modules whose is_causal is False
        cfg = transformers.Aimv2TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=32, eos_token_id=2)
        return transformers.Aimv2TextModel(cfg).eval()
    if kind == "phimoe":  # a sliding-window mask, no sliding_window argument
        cfg = transformers.PhimoeConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
        return transformers.PhimoeForCausalLM(cfg).eval()
    # a sliding (layer 0) and a full (layer 1) mask with the same values, no sliding_window argument
    cfg = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=2)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, V, (2, 10))
    am = torch.ones(2, 10, dtype=torch.long)
    am[0, :3] = 0
    return ids, am


@pytest.mark.parametrize("kind", ["olmoe", "phimoe", "qwen2_moe", "aimv2"])
def test_copied_masks_give_eagers_outputs(kind):
    model = _model(kind)
    ids, am = _batch()
    if kind == "aimv2":
        ids[:, -1] = 2  # (its pooler reads the eos token)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am)[0]
        model.set_attn_implementation("llmkern")
        with _copied_inputs(model):
            got = model(input_ids=ids, attention_mask=am)[0]
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)


def test_encoder_and_decoder_masks_of_equal_values():
    """BART with the same padding on both sides: the encoder's (bidirectional) and the decoder's (causal) masks have
    the same values; the module's is_causal tells a copy's kind between them."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, encoder_attention_heads=4, decoder_attention_heads=4,
                                  max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    ids, am = _batch()
    args = dict(input_ids=ids, attention_mask=am, decoder_input_ids=ids.flip(1), decoder_attention_mask=am)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(**args).logits
        model.set_attn_implementation("llmkern")
        with _copied_inputs(model):
            got = model(**args).logits
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache, backend", [("dynamic", None), ("static", None), ("static", "triton")])
def test_generate_with_copied_masks(cache, backend, request):
    """Qwen2-MoE: a sliding and a full layer, and a static cache (a prefill's key count, a step's key counts: on the
    kernels, attention_with_kvcache with them)."""
    if backend:
        request.getfixturevalue("triton_backend")
    model = _model("qwen2_moe")
    ids, am = _batch()
    args = dict(attention_mask=am, max_new_tokens=2 if backend else 4, do_sample=False, cache_implementation=cache)
    model.set_attn_implementation("eager")
    want = model.generate(ids, **args)
    model.set_attn_implementation("llmkern")
    with _copied_inputs(model):
        got = model.generate(ids, **args)
    assert torch.equal(got, want)


@pytest.mark.skipif(not hasattr(transformers, "Aimv2TextModel"), reason="transformers without Aimv2")
def test_offloaded_checkpointing_keeps_the_masks_kind():
    """Aimv2's text tower passes its causal mask positionally to modules whose is_causal is False; with activation
    offloading the recompute got an untagged copy (the forward's mask gone by then) and ran bidirectionally:
    CheckpointError (non-reentrant) or other gradients (reentrant). The layer keeps the kind of its last mask."""
    if "offload" not in inspect.signature(transformers.PreTrainedModel.activation_checkpointing_enable).parameters:
        pytest.skip("transformers without activation offloading")
    torch.manual_seed(0)
    cfg = transformers.Aimv2TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=32, eos_token_id=2)
    model = transformers.Aimv2TextModel(cfg).train()
    ids = torch.randint(3, V, (2, 8))
    ids[0, -1] = ids[1, 5] = 2
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 6:] = 0

    def grads(impl, reentrant=None):
        model.set_attn_implementation(impl)
        model.zero_grad()
        if reentrant is not None:
            model.activation_checkpointing_enable({"use_reentrant": reentrant}, offload=True)
        try:
            out = model(input_ids=ids, attention_mask=am)
            loss = (out.last_hidden_state * am[..., None]).square().mean() + out.pooler_output.square().mean()
            loss.backward()
        finally:
            model.activation_checkpointing_disable()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = grads("sdpa")
    for reentrant in (False, True):
        for a, b in zip(grads("llmkern", reentrant), want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class _Layer(torch.nn.Module):
    """An attention module of a model set to the "llmkern" attention, as the attention function sees it."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.config._attn_implementation = "llmkern"
        self.is_causal = False


def test_a_copy_that_cannot_be_told_raises():
    """A copy whose kind is not found (its mask gone, a layer that got none of ours before), or that masks of
    several kinds have the values of (a layer with no layer type), raises instead of taking the module's flags."""
    from transformers import masking_utils as mu

    q = k = v = torch.randn(2, 4, 6, 8)
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    full = la.llmkern_mask(2, 6, 6, 0, 0, mu.causal_mask_function, am)
    sliding = la.llmkern_mask(2, 6, 6, 0, 0, mu.sliding_window_causal_mask_function(3), am)
    with pytest.raises(NotImplementedError, match="several kinds"):
        la.llmkern_attention_forward(_Layer(), q, k, v, full.clone())
    copy = full.clone()
    del full, sliding
    with pytest.raises(NotImplementedError, match="untagged copy"):
        la.llmkern_attention_forward(_Layer(), q, k, v, copy)
    layer = _Layer()
    full = la.llmkern_mask(2, 6, 6, 0, 0, mu.causal_mask_function, am)
    want, _ = la.llmkern_attention_forward(layer, q, k, v, full)
    del full  # (the layer's recompute: its mask is gone, the layer knows its kind)
    got, _ = la.llmkern_attention_forward(layer, q, k, v, copy)
    torch.testing.assert_close(got, want)
