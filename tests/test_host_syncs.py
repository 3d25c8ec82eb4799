"""Host syncs on the per-step hot paths, counted on the CPU.

On CUDA, an op that reads a device value on the host (.item(), .tolist(), bool(t), int(t), a data-dependent
shape: nonzero, boolean-mask indexing, unique, repeat_interleave without output_size) waits for all the work
queued before it, and so does a copy of host data to the device from pageable memory (torch.tensor(list,
device=...), a Python list as an index). A decode step or a training step should cost at most the syncs it
needs (generate: one small read per step for its stop check). These tests count them on the CPU with a
dispatch mode (aten._local_scalar_dense and the data-dependent ops) and a function mode (tolist, host-built
tensors and list indices, which read or copy host memory without dispatching), so that a change cannot add
one back silently.

Checks that run only on CPU tensors (`t.device.type == "cpu" and ...`: no sync on CUDA) are left out of
the counts by the sites listed in _CPU_ONLY.
"""
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import llmkern
from llmkern.models import build

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive"}

# (file, function) of value checks that read tensors only when they are on the CPU (on CUDA they are skipped,
# so they cost no sync there)
_CPU_ONLY = {
    ("llmkern/ops/attention.py", "attention_with_kvcache"),  # cache_seqlens range; the CPU SDPA path's mask
    ("llmkern/ops/cross_entropy.py", "_check_labels"),
    ("llmkern/models/_attn.py", "reorder"),                  # KVCache.reorder's index range
    ("llmkern/models/_attn.py", "_crop_rows"),
    ("llmkern/ops/speculative.py", "_positions"),
}


def _site(stack):
    """The innermost llmkern frame of a stack: (path from the repository, function, line)."""
    for f in reversed(stack):
        path = f.filename.replace("\\", "/")
        if "/llmkern/" in path and "/tests/" not in path:
            return "llmkern/" + path.rsplit("/llmkern/", 1)[1], f.name, f.lineno
    return None


class _Recorder:
    def __init__(self):
        self.hits = []  # (kind, (path, function, line) or None)

    def hit(self, kind):
        site = _site(traceback.extract_stack()[:-2])
        if site is None or (site[0], site[1]) not in _CPU_ONLY:
            self.hits.append((kind, site))


class _Dispatch(TorchDispatchMode):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is aten._local_scalar_dense.default:
            self.rec.hit("item")
        elif name in _DATA_DEPENDENT:
            self.rec.hit(name)
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.rec.hit("repeat_interleave")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.rec.hit("bool mask index")
        return func(*args, **kwargs)


def _has_list(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, list) for i in items)


class _Functions(TorchFunctionMode):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu):
            self.rec.hit(func.__name__)
        elif func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
            self.rec.hit("host data to a tensor")
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_list(args[1]):
            self.rec.hit("list index")
        return func(*args, **kwargs)


class count_syncs:
    """with count_syncs() as c: ...; c.hits: the host syncs (kind, site) the block would cost on CUDA."""

    def __enter__(self):
        self.rec = _Recorder()
        self._f, self._d = _Functions(self.rec), _Dispatch(self.rec)
        self._f.__enter__()
        self._d.__enter__()
        return self

    def __exit__(self, *exc):
        self._d.__exit__(*exc)
        self._f.__exit__(*exc)

    @property
    def hits(self):
        return self.rec.hits


def _syncs(fn):
    with count_syncs() as c:
        fn()
    return c.hits


def _per_step(model, prompt, **kw):
    """The syncs generate costs per extra decode step (generating 6 tokens against 3), and the 6-token hits."""
    def run(n):
        with torch.no_grad():
            return _syncs(lambda: llmkern.generate(model, prompt, n, **kw))
    few, many = run(3), run(6)
    return (len(many) - len(few)) / 3, many


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return build("llama-tiny")


def _prompt(model, B=2, T=6):
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, model.config.vocab_size, (B, T), generator=g)


# ---- llmkern.sample -----------------------------------------------------------------------------------

def test_sample_tensor_arguments_cost_one_sync():
    """Every tensor argument's value check goes into the call's one read (it was one per argument: per-row
    knobs, prev_tokens, output_start, position, and the seeds, whose int64 range check could never fail)."""
    B, V = 3, 50
    logits = torch.randn(B, V)
    prev = torch.randint(0, V, (B, 7))
    kw = dict(temperature=torch.tensor([0.5, 1.0, 0.8]), top_k=torch.tensor([0, 5, 3]), repetition_penalty=1.2,
              prev_tokens=prev, output_start=torch.tensor([2, 3, 4]), seed=torch.tensor([1, 2, 3]),
              position=torch.tensor([7, 7, 7]))
    hits = _syncs(lambda: llmkern.sample(logits, **kw))
    assert len(hits) == 1, hits


def test_sample_tensor_seed_costs_no_sync():
    logits, seeds = torch.randn(2, 40), torch.tensor([5, 6])
    hits = _syncs(lambda: llmkern.sample(logits, temperature=0.7, top_p=0.9, seed=seeds, position=3))
    assert hits == []


def test_sample_still_checks_every_tensor_argument():
    """One read, every check: a bad value of any tensor argument still raises."""
    logits = torch.randn(2, 10)
    prev = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="position"):
        llmkern.sample(logits, seed=torch.tensor([1, 2]), position=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="prev_tokens"):
        llmkern.sample(logits, prev_tokens=torch.tensor([[0, 10, 1], [0, 0, 0]]), repetition_penalty=1.1)
    with pytest.raises(ValueError, match="output_start"):
        llmkern.sample(logits, prev_tokens=prev, output_start=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="temperature"):
        llmkern.sample(logits, temperature=torch.tensor([1.0, -1.0]), prev_tokens=prev)


# ---- generate -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(strategy="greedy"),
    dict(strategy="greedy", repetition_penalty=1.3, eos_token_id=3),
    dict(strategy="sample", temperature=0.8, top_k=5, top_p=0.9, seed=1),
    dict(strategy="sample", temperature=torch.tensor([0.7, 1.0]), seed=torch.tensor([3, 4]),
         presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.1),
    dict(strategy="sample", num_return_sequences=2, seed=1, top_p=0.9),
    dict(strategy="beam", num_beams=1, repetition_penalty=1.2),
    dict(strategy="beam", num_beams=3, repetition_penalty=1.2, eos_token_id=3),
], ids=["greedy", "greedy-penalty-eos", "sample", "sample-tensor-knobs-penalties", "sample-nrs", "beam1", "beam3"])
def test_generate_one_sync_per_step(llama, kw):
    """A decode step reads one small tensor (its stop check); sample's value checks run at the first step only
    (they cost up to four more reads per step: knobs, prev_tokens, seeds, positions)."""
    per_step, hits = _per_step(llama, _prompt(llama), **kw)
    assert per_step == 1, hits


def test_generate_bans_cost_no_host_copy_per_step(llama):
    """min_new_tokens, bad_words_ids: the banned ids go to the device once, not each step (a host list as an
    index, a boolean-mask index and torch.tensor(list, device=) were host syncs on CUDA every step)."""
    per_step, hits = _per_step(llama, _prompt(llama), bad_words_ids=[[7], [8, 9], [10, 11, 12]], min_new_tokens=5,
                               eos_token_id=3)
    assert per_step == 1, hits


# ---- training step ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-tiny", "gpt-tiny"])
def test_training_step_costs_no_sync(name):
    torch.manual_seed(0)
    model = build(name)
    x = _prompt(model, 2, 16)
    model(x, x)  # (first-call setup out of the count)

    def step():
        _, loss = model(x, x)
        loss.backward()
    assert _syncs(step) == []


# ---- dropout seeds ------------------------------------------------------------------------------------

def test_int_dropout_seed_is_filled_on_the_device():
    """An int seed's two words are filled on the device: torch.tensor(words, device=) was a host copy per
    attention / LoRA call with dropout."""
    from llmkern.kernels.lora import seed_tensor
    from llmkern.ops import _checks
    from llmkern.reference.lora import seed_words

    for seed in (0, 7, 2**31 + 5, 2**64 - 1, -3):
        assert _syncs(lambda: _checks.dropout_seed(seed, 0.1, "cpu")) == []
        assert _syncs(lambda: seed_tensor(seed, "cpu")) == []
        assert _checks.dropout_seed(seed, 0.1, "cpu").tolist() == list(seed_words(seed))
        assert seed_tensor(seed, "cpu").dtype == torch.int32


# ---- multi-adapter LoRA through the PEFT integration -------------------------------------------------

def test_peft_mixed_adapter_batch_skips_the_per_layer_id_check(monkeypatch):
    """lora_linear_multi checks adapter_ids' range by reading them (on CUDA after the layer's kernels are
    queued: still one host wait per layer). The PEFT integration builds the ids in [-1, n) on the host and
    passes scalings as checked floats, so it runs without that check; a direct call keeps it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import llmkern.ops.lora as lora_ops
    from llmkern.integrations.peft import use_fused_lora

    made = []
    real = lora_ops._ValueCheck
    monkeypatch.setattr(lora_ops, "_ValueCheck", lambda *a: made.append(1) or real(*a))
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                adapter_name="a1").eval()
    model.add_adapter("a2", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, 64, (3, 5))
    names = ["a2", "__base__", "a1"]
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits
        use_fused_lora(model)
        got = model(ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert made == []  # (two q_proj layers ran lora_linear_multi without the check)
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="adapter_ids"):  # a direct call is still checked
        llmkern.lora_linear_multi(x, torch.randn(8, 32), None, torch.randn(2, 4, 32), torch.randn(2, 8, 4),
                                  [1.0, 1.0], torch.tensor([0, 1, 2, -1]))
    assert made == [1]


# ---- what the skipped checks must not reach ------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generate_scorers_calls_are_checked(llama, strategy):
    """generate's decode loop skips sample's value checks from its second step on (_checks.trusted), but a
    scorer is the caller's code: an llmkern.sample call (or a nested generate) made inside it is checked at
    every step, and so is any other op's (one trust flag covers sample's and lora_linear_multi's checks). (The
    scorers ran inside the trusted block: a bad temperature tensor was taken unchecked.)"""
    outcomes = []

    def scorer(seqs, logp):
        try:
            llmkern.sample(torch.randn(2, 10), temperature=torch.tensor([1.0, -1.0]), seed=0)
            outcomes.append("accepted")
        except ValueError as e:
            outcomes.append("temperature" in str(e))
        try:
            llmkern.lora_linear_multi(torch.randn(4, 32), torch.randn(8, 32), None, torch.randn(2, 4, 32),
                                      torch.randn(2, 8, 4), [1.0, 1.0], torch.tensor([0, 1, 2, -1]))
            outcomes.append("accepted")
        except ValueError as e:
            outcomes.append("adapter_ids" in str(e))
        return torch.zeros_like(logp)

    llmkern.generate(llama, _prompt(llama), 3, strategy=strategy, scorers=[(1.0, scorer)],
                     seed=1 if strategy == "sample" else None)
    assert outcomes == [True] * 6


def _bias(V, token, value):
    b = torch.zeros(V)
    b[token] = value
    return b


@pytest.mark.parametrize("strategy, name, given, changed, extra", [
    ("sample", "temperature", lambda V: torch.tensor([0.7, 1.0]), lambda V: [-1.0, float("nan")], {}),
    ("sample", "temperature", lambda V: torch.tensor([0.7, 1.0]), lambda V: [0.01, 5.0], {}),  # valid, ignored too
    ("sample", "temperature", lambda V: torch.tensor(0.7), lambda V: float("nan"), dict(num_return_sequences=2)),
    ("sample", "top_k", lambda V: torch.tensor([5, 0]), lambda V: [-3, -1], {}),
    ("sample", "top_p", lambda V: torch.tensor([0.9, 1.0]), lambda V: [0.0, 1.5], {}),
    ("sample", "min_p", lambda V: torch.tensor([0.05, 0.0]), lambda V: [1.5, float("nan")], {}),
    ("sample", "presence_penalty", lambda V: torch.tensor([0.5, 0.0]), lambda V: [float("nan"), -float("inf")], {}),
    ("greedy", "repetition_penalty", lambda V: torch.tensor([1.3, 1.0]), lambda V: [-1.0, float("nan")], {}),
    ("sample", "logit_bias", lambda V: torch.zeros(V), lambda V: _bias(V, 7, 50.0), {}),
    ("beam", "logit_bias", lambda V: torch.zeros(V), lambda V: _bias(V, 7, 50.0), dict(num_beams=2)),
], ids=["temperature-bad", "temperature-valid", "temperature-0dim-nrs", "top_k", "top_p", "min_p", "presence",
        "greedy-repetition", "logit_bias", "beam-logit_bias"])
def test_generate_decodes_with_the_knob_values_it_checked(llama, strategy, name, given, changed, extra):
    """generate checks its per-row knob tensors' values at the first step and trusts them from the second on
    (no host sync per step), so it decodes with its own copies of them, taken when it is called: a scorer (the
    caller's code) that changes the caller's tensor in place mid-run changes nothing, out-of-range values or
    valid ones. (The later steps read the caller's tensor: a negative or NaN temperature, a negative top_k, a
    top_p of 0 were used unchecked, and a valid change took effect half-way through.)"""
    V, steps = llama.config.vocab_size, []
    kw = dict(extra, strategy=strategy, return_dict=True, seed=1 if strategy == "sample" else None)

    def scorer(seqs, logp):
        steps.append(seqs.shape[1])
        if len(steps) == 2:  # the second step: the first one has checked the values
            knob.copy_(torch.as_tensor(changed(V), dtype=knob.dtype))
        return torch.zeros_like(logp)

    with torch.no_grad():
        want = llmkern.generate(llama, _prompt(llama), 5, scorers=[lambda s, lp: torch.zeros_like(lp)],
                                **{name: given(V)}, **kw)
        knob = given(V)
        got = llmkern.generate(llama, _prompt(llama), 5, scorers=[scorer], **{name: knob}, **kw)
    assert len(steps) >= 3
    torch.testing.assert_close(knob, torch.as_tensor(changed(V), dtype=knob.dtype), equal_nan=True)  # (changed)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.scores)


def test_host_to_device_does_not_pin_under_graph_capture(monkeypatch):
    """A pinned, non-blocking copy captured into a CUDA graph reads the pinned block at every replay, after
    the caching host allocator has handed it out again: under capture host_to_device copies as before."""
    from llmkern.ops import _checks

    class Pinned(Exception):
        pass

    def pin(self, *a, **k):
        raise Pinned

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append((a, k)) or self)
    _checks.host_to_device(torch.tensor([1, 2], dtype=torch.int32), "cuda")
    assert moved == [((torch.device("cuda"),), {})]
