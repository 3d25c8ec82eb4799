"""Helpers shared by the tests: devices, dtypes, tolerances and comparison against references."""
import os

import torch

# Tolerances for comparing a kernel in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


def triton_device():
    """Where Triton kernels run in this process: "cuda", or "cpu" under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "cpu"
    return None


def select_backend(monkeypatch, backend):
    """Route the ops to `backend` for one test ("default": no LLMKERN_BACKEND, "reference", or "triton": the
    kernels, skipping the test where they cannot run) and return the device to put its tensors on."""
    import pytest

    if backend == "triton":
        device = triton_device()
        if device is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
        return device
    if backend == "reference":
        monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    else:
        monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    return "cpu"


def interpreter_dtypes():
    """Dtypes the Triton kernels can be tested in here (the interpreter has no bfloat16)."""
    if torch.cuda.is_available():
        return [torch.float16, torch.bfloat16, torch.float32]
    return [torch.float32, torch.float16]


def assert_close(actual, expected, dtype=None, msg="", **overrides):
    """Compare `actual` with a (usually float64) reference, with tolerances for `dtype`."""
    dtype = dtype or actual.dtype
    tol = dict(TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
    tol.update(overrides)
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               msg=lambda m: f"{msg}\n{m}" if msg else m, **tol)


def max_abs_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def tiny_hf_llama(seed=0, vocab=64, hidden=32, layers=2, heads=4):
    """A tiny random transformers LlamaForCausalLM (float32, eager attention, eval mode): the PEFT and
    integration tests' model. Imports transformers when called."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=64, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_lora_model(model, **lora_config):
    """peft.get_peft_model(model, peft.LoraConfig(**lora_config)) without its warnings. Imports peft when called."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**lora_config))


def randomize_lora(model, seed=1, std=0.3):
    """Every LoRA parameter ("lora_" in its name) N(0, std²), seeded (an initialised LoRA's update is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_tiny_hf(path, config_cls, model_cls, config, seed=0, router_std=None):
    """A tiny random transformers model (`config_cls` / `model_cls` names in transformers, `config` its
    keyword arguments) saved to `path` and returned (eval mode, no eos). Norm gains and biases are random
    so that a loading mix-up shows; router_std: MoE routers (``mlp.gate``) drawn with this std, large enough
    for decisive top-k choices (no near-ties that rounding could flip)."""
    import transformers

    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif router_std is not None and n.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
    hf.save_pretrained(path)
    return hf


class TinyHFFamilies:
    """Tiny random transformers checkpoints of several model families, for from_hf tests.

    families: {family: (config class name, model class name, its config options)}; common: the config
    options every family shares; router_std: see save_tiny_hf."""

    def __init__(self, families, common, router_std=None):
        self.families, self.common, self.router_std = families, common, router_std

    def save(self, path, family, seed=0, **changes):
        """`family`'s tiny model (its options, then `changes`) saved to `path`; returns the transformers model."""
        cfg_cls, model_cls, options = self.families[family]
        return save_tiny_hf(path, cfg_cls, model_cls, {**self.common, **options, **changes}, seed, self.router_std)

    def save_all(self, root):
        """{family: (checkpoint directory under root, transformers model)} for every family."""
        return {f: (str(root / f), self.save(root / f, f)) for f in self.families}


def load_hf(path, backend="torch"):
    """llmkern.models.from_hf(path, backend) without its warnings (tiny test checkpoints trip some)."""
    import warnings

    from llmkern.models import from_hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_hf(path, backend=backend)


def assert_logits_and_loss_match_transformers(model, hf, x, check_flops=True, **tol):
    """A zoo model's logits, its loss with labels (the first three of row 0 ignored) and its loss without the
    logits (return_logits=False: llmkern's linear_cross_entropy path) equal the transformers model's on ids x;
    its parameter count equals transformers' (and llmkern.flops.param_counts' when check_flops)."""
    from llmkern import flops

    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        want = hf(x, labels=labels)
        logits, loss = model(x, labels=labels)
        torch.testing.assert_close(logits, want.logits, **tol)
        torch.testing.assert_close(loss, want.loss, **tol)
        torch.testing.assert_close(model(x, labels=labels, return_logits=False)[1], want.loss, **tol)
    assert model.num_params() == hf.num_parameters()
    if check_flops:
        assert model.num_params() == flops.param_counts(model.config)["total"]


def edit_hf_config(path, **changes):
    """Update a saved checkpoint's config.json (a pathlib.Path to its directory) with `changes`."""
    import json

    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def random_ids(vocab, B, T, seed=0):
    """int64 token ids [B, T] in [0, vocab), from a generator seeded with `seed`."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_greedy_matches_transformers(model, hf, x, n_new, pad, no_cache=False):
    """llmkern.generate's greedy tokens equal transformers' hf.generate for the prompts x [B, T]: unpadded,
    and with row 1's first three tokens as left padding (attention_mask 0, pad token `pad`); with no_cache
    also the padded case without the KV cache."""
    import warnings

    from llmkern.generation import generate

    am = torch.ones_like(x)
    am[1, :3] = 0
    kw = dict(max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(generate(model, x, n_new), hf.generate(x, attention_mask=torch.ones_like(x), **kw))
        want = hf.generate(x, attention_mask=am, **kw)
        assert torch.equal(generate(model, x, n_new, attention_mask=am, pad_token_id=pad), want)
        if no_cache:
            assert torch.equal(generate(model, x, n_new, attention_mask=am, pad_token_id=pad, use_cache=False), want)


def collect_close(tag, actual, expected, failures, atol=1e-4, rtol=1e-4):
    """Compare two tensors (or two Nones) in float64 and append a one-line message to `failures` when they
    differ, instead of raising: a spawned rank reports all of its mismatches at once (raise_failures)."""
    if actual is None or expected is None:
        if actual is not None or expected is not None:
            failures.append(f"{tag}: one of actual / expected is None")
        return
    try:
        torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol)
    except AssertionError as exc:
        lines = str(exc).splitlines()
        failures.append(f"{tag}: {lines[0]} {lines[-1] if len(lines) > 1 else ''}".rstrip())


def call_outcome(fn):
    """(exception type name, message) of fn(), or None when it returns: a spawned rank records what each call
    raised and reports them together (expect_outcome, raise_failures)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (reported to the test)
        return type(exc).__name__, str(exc)
    return None


def expect_outcome(tag, outcome, kind, words, failures):
    """Append to `failures` unless `outcome` (call_outcome's) is an exception of type name `kind` whose message
    holds every one of `words`."""
    if outcome is None or outcome[0] != kind or not all(w in outcome[1] for w in words):
        failures.append(f"{tag}: expected {kind} naming {words}, got {outcome}")


def raise_failures(rank, failures):
    """AssertionError listing a rank's collected failures, if any."""
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} failures:\n" + "\n".join(failures))


def assert_peft_lora_round_trip(path, workdir, x, atol=1e-5, rtol=1e-5, targets=None, n_layers=None, n_modules=None):
    """A LoRA adapter that PEFT saves on the transformers checkpoint at `path` (`targets`, default every
    attention and MLP projection; random nonzero factors) loads into the zoo (llmkern.peft.load_peft_adapter
    over from_hf) with PEFT's logits on x; saved back with HF names (save_peft_adapter), PEFT reads it and
    gives them again. n_layers: expect n_layers * len(targets) LoRA modules (default 2 layers), or n_modules
    of them (a fused HF target is several zoo modules). Imports peft and transformers."""
    import peft
    import transformers

    from llmkern import peft as lp

    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_lora(pm, std=0.1)
    pm.save_pretrained(workdir / "ad")
    with torch.no_grad():
        want = pm.eval()(x).logits
    zoo = lp.load_peft_adapter(load_hf(path), str(workdir / "ad"))
    assert len(dict(lp.lora_modules(zoo))) == (n_modules or (n_layers or 2) * len(targets))
    with torch.no_grad():
        torch.testing.assert_close(zoo(x), want, atol=atol, rtol=rtol)
    lp.save_peft_adapter(zoo, str(workdir / "back"))
    back = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                          str(workdir / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, atol=atol, rtol=rtol)


def padding_mask(B, Tk, device="cpu"):
    """A bool key_padding_mask [B, Tk] (True = attend): left padding on row 0, random holes elsewhere, the
    last key always visible, and (B > 1) row 1 fully masked (no key at all)."""
    g = torch.Generator().manual_seed(7)
    m = torch.rand(B, Tk, generator=g) > 0.3
    m[:, -1] = True
    m[0, : Tk // 3] = False
    if B > 1:
        m[1] = False
    return m.to(device)


def attention_tma_vs_pointer(monkeypatch, q, k, v, dout, **kw):
    """Run the attention forward and backward kernels (llmkern.kernels.attention) with the pointer loads,
    then with the TMA descriptor kernels forced (every backward kernel too), under the interpreter; assert
    that both launch what they should and give bitwise equal out, lse, dq, dk and dv (the descriptor boxes
    read exactly what the masked loads read)."""
    from llmkern.kernels import attention as A

    launched, launch = [], A._launch
    monkeypatch.setattr(A, "_launch", lambda name, *a: (launched.append(name), launch(name, *a)))
    monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", "all")
    monkeypatch.setattr(A._TMA, "failed", [])
    res = {}
    for mode in ("0", "force"):
        monkeypatch.setenv("LLMKERN_ATTN_TMA", mode)
        o, lse = A.attention_forward(q, k, v, **kw)
        res[mode] = (o, lse) + tuple(A.attention_backward(dout, q, k, v, o, lse, **kw))
    assert launched == ["fwd", "dkdv", "dq", "fwd_tma", "dkdv_tma", "dq_tma"]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["0"], res["force"]):
        assert torch.equal(a, b), name


def attention_grid_slices_equal(monkeypatch, q, k, v, dout, lens, **kw):
    """Batches past the grid limit run in slices (one batch row per launch here): forward, backward and
    decode (the first two queries against the keys, lens per row) give the one-launch results bitwise."""
    from llmkern.kernels import attention as A
    from llmkern.kernels.attention_decode import attention_decode

    def run():
        o, lse = A.attention_forward(q, k, v, **kw)
        dec = attention_decode(q[:, :, :2], k, v, lens, **kw)
        return (o, lse) + tuple(A.attention_backward(dout, q, k, v, o, lse, **kw)) + dec

    whole = run()
    monkeypatch.setattr(A, "MAX_GRID_YZ", 2)
    for a, b in zip(whole, run()):
        assert torch.equal(a, b)
