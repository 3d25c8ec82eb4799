"""llmkern.integrations.transformers.use_fused_loss: a transformers causal LM's training loss through
llmkern.linear_cross_entropy (no [B, T, V] logits) equals its own loss and gradients."""
import copy

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
