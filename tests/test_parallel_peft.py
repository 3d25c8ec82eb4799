"""PEFT adapters under tensor parallelism: save_peft_adapter on a sharded model writes the files the
unsharded model writes, and load_peft_adapter puts each rank's shard into a sharded model.

Two gloo ranks on 127.0.0.1 (conftest's pool2: a llmkern.parallel.launch.RankPool started once per session), tiny
fp32 models with LoRA on every projection and random lora_B, so a wrong shard or order shows in the
logits: the zoo Llama and GPT (Hugging Face module names, GPT's q/k/v packed into c_attn), and a
plain model with fused qkv_proj / gate_up_proj (sharded segment by segment), rsLoRA and two ranks.
"""
import copy
import json
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn


TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


def _model(arch, lora_r=None, random_b=False):
    from llmkern.models import GPT, Llama, get_config
    from llmkern.peft import inject_lora

    torch.manual_seed(0)
    m = (Llama if arch == "llama" else GPT)(get_config(f"{arch}-tiny"), backend="torch").eval()
    if lora_r:
        torch.manual_seed(1)
        inject_lora(m, TARGETS[arch], r=lora_r, alpha=3.0 * lora_r)
        if random_b:
            _randomize_b(m)
    return m


def _randomize_b(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)


def _tokens(model):
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))


def _files(path):
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f), load_file(os.path.join(path, "adapter_model.safetensors"))


def _same_files(a, b):
    (cfg_a, w_a), (cfg_b, w_b) = _files(a), _files(b)
    return cfg_a == cfg_b and w_a.keys() == w_b.keys() and all(
        torch.equal(w_a[k], w_b[k]) and w_a[k].dtype == w_b[k].dtype for k in w_b)


def _save_reference(rank, model, path):
    import torch.distributed as dist

    from llmkern.peft import save_peft_adapter

    if rank == 0:
        save_peft_adapter(model, path)
    dist.barrier()


# ---- (a) save from a sharded model -------------------------------------------------------------

def save_worker(rank, world_size, tmp):
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import load_peft_adapter, save_peft_adapter

    out = {}
    for arch in ("llama", "gpt"):
        ref = _model(arch, lora_r=4, random_b=True)
        x = _tokens(ref)
        with torch.no_grad():
            want = ref(x)
        tp_dir, ref_dir = os.path.join(tmp, arch, "tp"), os.path.join(tmp, arch, "ref")
        sharded = tensor_parallelize(copy.deepcopy(ref))
        save_peft_adapter(sharded, tp_dir)  # every rank calls it; rank 0 writes
        _save_reference(rank, ref, ref_dir)
        wrote = sorted(os.listdir(tp_dir))
        unsharded = load_peft_adapter(_model(arch), tp_dir)  # into a plain model
        with torch.no_grad():
            err = (unsharded(x) - want).abs().max().item()
        out[arch] = dict(same_files=_same_files(tp_dir, ref_dir), err=err, wrote=wrote)
    return out


# ---- (b) load into a sharded model -------------------------------------------------------------

def load_worker(rank, world_size, tmp):
    from llmkern.parallel import ColumnParallelLinear, RowParallelLinear, tensor_parallelize
    from llmkern.peft import load_peft_adapter

    out = {}
    for arch in ("llama", "gpt"):
        ref = _model(arch, lora_r=4, random_b=True)
        x = _tokens(ref)
        with torch.no_grad():
            want = ref(x)
        path = os.path.join(tmp, arch)
        _save_reference(rank, ref, path)  # the unsharded model's adapter
        sharded = tensor_parallelize(_model(arch, lora_r=4))  # zero lora_B until the load
        n_parallel = sum(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in sharded.modules())
        with torch.no_grad():
            before = (sharded(x) - want).abs().max().item()
        load_peft_adapter(sharded, path)
        trainable = [n for n, p in sharded.named_parameters() if p.requires_grad]
        with torch.no_grad():
            err = (sharded(x) - want).abs().max().item()
        out[arch] = dict(before=before, err=err, trainable=trainable, n_parallel=n_parallel)
    return out


# ---- (c) errors ---------------------------------------------------------------------------------

def errors_worker(rank, world_size, tmp):
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import load_peft_adapter, save_peft_adapter

    ref = _model("llama", lora_r=4, random_b=True)
    path = os.path.join(tmp, "adapter")
    _save_reference(rank, ref, path)
    errors = {}

    def expect(what, fn, exc=ValueError):
        try:
            fn()
            errors[what] = "no error"
        except exc as e:
            errors[what] = f"{type(e).__name__}: {e}"

    expect("no LoRA", lambda: load_peft_adapter(tensor_parallelize(_model("llama")), path))
    expect("save no LoRA", lambda: save_peft_adapter(tensor_parallelize(_model("llama")), os.path.join(tmp, "x")))

    # rank mismatch on some layers only: nothing may change, also in the layers checked before the error
    model = _model("llama", lora_r=4)
    inject = model.layers[1].self_attn.o_proj
    from llmkern.peft import LoRALinear

    model.layers[1].self_attn.o_proj = LoRALinear(inject.base_layer, r=2, alpha=6.0)
    sharded = tensor_parallelize(model)
    state = {k: v.clone() for k, v in sharded.state_dict().items()}
    scalings = [getattr(m, "lora_scaling", None) for m in sharded.modules()]
    expect("rank", lambda: load_peft_adapter(sharded, path))
    unchanged = all(torch.equal(v, sharded.state_dict()[k]) for k, v in state.items()) and scalings == [
        getattr(m, "lora_scaling", None) for m in sharded.modules()]

    # a checkpoint whose lora_B does not fit the layer's rows
    if rank == 0:
        from safetensors.torch import load_file, save_file

        bad = os.path.join(tmp, "bad")
        os.makedirs(bad)
        w = load_file(os.path.join(path, "adapter_model.safetensors"))
        key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        w[key] = torch.cat([w[key], w[key][:2]])
        save_file(w, os.path.join(bad, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json")) as f, open(os.path.join(bad, "adapter_config.json"), "w") as g:
            g.write(f.read())
    import torch.distributed as dist

    dist.barrier()
    fresh = tensor_parallelize(_model("llama", lora_r=4))
    expect("shape", lambda: load_peft_adapter(fresh, os.path.join(tmp, "bad")))

    # rank 0 cannot write: every rank raises promptly instead of waiting in a barrier
    blocker = os.path.join(tmp, "a_file")
    if rank == 0:
        open(blocker, "w").close()
    dist.barrier()
    t0 = time.perf_counter()
    expect("write", lambda: save_peft_adapter(tensor_parallelize(_model("llama", lora_r=4)), blocker),
           (OSError, RuntimeError))
    return dict(errors=errors, unchanged=unchanged, write_s=time.perf_counter() - t0)


# ---- (d) fused projections, rsLoRA, several ranks, a scaling set by hand ------------------------

class _Attn(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head, self.head_dim = n_head, d // n_head
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class _MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * h)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        g, u = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(g) * u)


class _Fused(nn.Module):
    def __init__(self, d=16, n_head=4, h=24, n_layer=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": _Attn(d, n_head), "mlp": _MLP(d, h)})
                                    for _ in range(n_layer))
        self.head = nn.Linear(d, 8)  # not a target

    def forward(self, x):
        for b in self.blocks:
            x = x + b["attn"](x)
            x = x + b["mlp"](x)
        return self.head(x)


def _fused_model(lora=True):
    from llmkern.peft import inject_lora

    torch.manual_seed(0)
    m = _Fused().eval()
    if lora:
        torch.manual_seed(1)
        inject_lora(m, ["qkv_proj", "o_proj"], r=4, alpha=5.0, use_rslora=True)
        inject_lora(m, ["gate_up_proj", "down_proj"], r=2, alpha=5.0, use_rslora=True)
        _randomize_b(m)
    return m


def fused_worker(rank, world_size, tmp):
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import load_peft_adapter, save_peft_adapter

    ref = _fused_model()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(x)
    tp_dir, ref_dir = os.path.join(tmp, "tp"), os.path.join(tmp, "ref")
    sharded = tensor_parallelize(copy.deepcopy(ref))
    save_peft_adapter(sharded, tp_dir)
    _save_reference(rank, ref, ref_dir)
    same = _same_files(tp_dir, ref_dir)
    cfg = _files(tp_dir)[0]
    back = load_peft_adapter(_fused_model(lora=False), tp_dir)
    from llmkern.peft import inject_lora

    into = _fused_model(lora=False)  # LoRA injected (zero B) before sharding, then loaded
    inject_lora(into, ["qkv_proj", "o_proj"], r=4)
    inject_lora(into, ["gate_up_proj", "down_proj"], r=2)
    into = tensor_parallelize(into)
    load_peft_adapter(into, ref_dir)
    with torch.no_grad():
        err_back, err_into = (back(x) - want).abs().max().item(), (into(x) - want).abs().max().item()

    # a scaling the wrapper's alpha no longer gives (set by hand): alpha is derived from it, exactly
    layer = sharded.blocks[0]["attn"].o_proj
    layer.lora_scaling = 0.1
    odd_dir = os.path.join(tmp, "odd")
    save_peft_adapter(sharded, odd_dir)
    with torch.no_grad():
        want_odd = sharded(x)
    odd = load_peft_adapter(_fused_model(lora=False), odd_dir)
    with torch.no_grad():
        err_odd = (odd(x) - want_odd).abs().max().item()
    return dict(same=same, cfg=cfg, err_back=err_back, err_into=err_into, err_odd=err_odd,
                odd_scaling=odd.blocks[0]["attn"].o_proj.scaling)


@pytest.fixture
def pool(pool2):
    return pool2  # (conftest's session pool: starting ranks costs seconds)


def test_save_from_sharded_model_writes_the_unsharded_files(pool, tmp_path):
    results = pool.run(save_worker, (str(tmp_path),), timeout=90)
    for rank_result in results:
        for arch, r in rank_result.items():
            assert r["same_files"], arch  # gathered shards = the unsharded model's adapter, bit for bit
            assert r["wrote"] == ["adapter_config.json", "adapter_model.safetensors"], r
            assert r["err"] < 1e-5, (arch, r)


def test_load_into_sharded_model(pool, tmp_path):
    results = pool.run(load_worker, (str(tmp_path),), timeout=90)
    for rank_result in results:
        for arch, r in rank_result.items():
            assert r["n_parallel"] > 0 and r["before"] > 1e-3, (arch, r)  # the adapter changes the logits
            assert r["err"] < 1e-4, (arch, r)
            assert r["trainable"] and all("lora_" in n for n in r["trainable"]), (arch, r["trainable"])


def test_errors_under_tensor_parallelism(pool, tmp_path):
    results = pool.run(errors_worker, (str(tmp_path),), timeout=90)
    for rank, r in enumerate(results):
        e = r["errors"]
        # (the first module of the checkpoint, in key order)
        assert "layers.0.mlp.down_proj (from model.layers.0.mlp.down_proj in the checkpoint) is a " \
               "RowParallelLinear without LoRA parameters" in e["no LoRA"], e
        assert "inject LoRA" in e["no LoRA"] and "before tensor_parallelize" in e["no LoRA"], e
        assert "no LoRALinear modules to save" in e["save no LoRA"], e
        assert "layers.1.self_attn.o_proj" in e["rank"] and "has rank 2, checkpoint has 4" in e["rank"], e
        assert r["unchanged"], "a failed load changed the model"
        assert "layers.0.mlp.down_proj" in e["shape"] and "do not fit" in e["shape"], e
        assert ("FileExistsError" if rank == 0 else "RuntimeError: save_peft_adapter: the writing rank") in e["write"], e
        assert r["write_s"] < 10, r


def test_fused_projections_rslora_and_rank_pattern(pool, tmp_path):
    results = pool.run(fused_worker, (str(tmp_path),), timeout=90)
    for r in results:
        assert r["same"], r["cfg"]
        cfg = r["cfg"]
        assert cfg["use_rslora"] is True and cfg["r"] in (2, 4) and cfg["rank_pattern"], cfg
        assert cfg["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], cfg
        assert r["err_back"] < 1e-5 and r["err_into"] < 1e-5 and r["err_odd"] < 1e-5, r
        assert r["odd_scaling"] == 0.1, r


def test_alpha_for_gives_back_the_scaling_exactly():
    from llmkern.parallel.lora_state import alpha_for

    g = torch.Generator().manual_seed(0)
    refused = 0
    for _ in range(2000):
        r = int(torch.randint(1, 257, (1,), generator=g))
        for rs in (False, True):
            # a scaling some alpha gives (what from_linear / load_peft_adapter set), without the record
            alpha = float(torch.rand((), generator=g, dtype=torch.float64) * 64)
            s = alpha / (math.sqrt(r) if rs else r)
            layer = SimpleNamespace(lora_scaling=s, lora_A=torch.empty(r, 1), lora_alpha=None, lora_use_rslora=None)
            a = alpha_for(layer, r, rs)
            assert a / (math.sqrt(r) if rs else r) == s, (s, r, rs, a)
            # any float: an exact alpha, or a ValueError (no float alpha gives s: never written inexactly)
            layer.lora_scaling = float(torch.rand((), generator=g, dtype=torch.float64) * 10)
            try:
                a = alpha_for(layer, r, rs)
            except ValueError as e:
                assert "exactly" in str(e)
                refused += 1
            else:
                assert a / (math.sqrt(r) if rs else r) == layer.lora_scaling
    assert refused < 1000
    # the wrapper's alpha is kept while it gives the scaling
    layer = SimpleNamespace(lora_scaling=7 / 3, lora_A=torch.empty(3, 1), lora_alpha=7, lora_use_rslora=False)
    assert alpha_for(layer, 3, False) == 7


# ---- PEFT wrappers that a sharded layer cannot reproduce (regressions: sharded silently wrong) ----

class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def _peft_two(second=None, first=None):
    """_Two under PEFT LoRA (adapter "default", config `first`), plus an adapter "second" when given,
    with random factors (PEFT starts lora_B and its bias at zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = dict(r=2, target_modules=["up_proj", "down_proj"])
    m = get_peft_model(_Two().double(), LoraConfig(**targets, **(first or {})))
    if second is not None:
        m.add_adapter("second", LoraConfig(**targets, **second))
    with torch.no_grad():
        for n, prm in m.named_parameters():
            if "lora" in n:
                prm.normal_()
    return m


def peft_wrapper_worker(rank, world_size):
    from llmkern.parallel import tensor_parallelize

    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = {}
    for case in ("lora_bias", "two_active", "second_active"):
        m = _peft_two(first=dict(lora_bias=True) if case == "lora_bias" else None,
                      second=None if case == "lora_bias" else {})
        if case == "two_active":
            m.base_model.set_adapter(["default", "second"])
        elif case == "second_active":
            m.base_model.set_adapter("second")
        with torch.no_grad():
            want = m(x)
        inner = m.base_model.model
        try:
            tensor_parallelize(inner)
        except NotImplementedError as exc:
            seen[case] = str(exc)
            continue
        with torch.no_grad():
            seen[case] = (inner(x) - want).abs().max().item()
    return seen


def test_peft_lora_bias_and_several_active_adapters_refused(pool):
    """Regression: lora_bias=True (lora_B's bias) was dropped and only the first of several active adapters
    kept (PEFT sums them): now refused on every rank; one active adapter among several is the one sharded."""
    pytest.importorskip("peft")
    for seen in pool.run(peft_wrapper_worker, timeout=90):
        assert "lora_bias" in seen["lora_bias"], seen
        assert "2 active adapters" in seen["two_active"], seen
        assert seen["second_active"] < 1e-10, seen


def peft_model_save_worker(rank, world_size, tmp):
    """save_peft_adapter on a tensor-parallelized peft.PeftModel: the keys named from the wrapped model (the
    wrapper's base_model.model. prefix came twice; PEFT loaded none of them, with a warning only)."""
    import warnings

    from peft import PeftModel

    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import save_peft_adapter

    m = _peft_two()
    ref = copy.deepcopy(m)
    tensor_parallelize(m)
    save_peft_adapter(m, os.path.join(tmp, "tp"))  # every rank; rank 0 writes
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a missing key is only a warning in PEFT)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(_Two().double(), os.path.join(tmp, "tp"))
    with torch.no_grad():
        return (loaded(x) - ref(x)).abs().max().item()


def test_save_from_sharded_peft_model_loads_in_peft(pool, tmp_path):
    pytest.importorskip("peft")
    assert all(err < 1e-10 for err in pool.run(peft_model_save_worker, (str(tmp_path),), timeout=90))


def fp16_lora_scale_worker(rank, world_size):
    """float16 LoRA shards with s = alpha / r = 1/16 and large intermediates: the sharded layers' gradients must be
    finite wherever the unsharded layer's (plain autograd) are."""
    from llmkern.parallel import ColumnParallelLinear, RowParallelLinear
    from llmkern.peft import inject_lora

    out = {}
    for kind, cls in (("column", ColumnParallelLinear), ("row", RowParallelLinear)):
        for overlap in ("none", "ring"):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(16, 16, bias=False)).half()
            inject_lora(m, ["0"], r=16, alpha=1.0, adapter_dtype="base")  # (float16 factors: float32 is the default)
            lin = m[0]
            with torch.no_grad():
                lin.lora_A.fill_(0.25)
                lin.lora_B.fill_(0.25)
            x = torch.full((1024, 16), 40.0, dtype=torch.float16)
            dy = torch.full((1024, 16), 0.5, dtype=torch.float16)  # (an upstream gradient under a loss scale)
            xa = x.clone().requires_grad_()
            lin(xa).backward(dy)
            kw = {} if kind == "column" else {"input_is_parallel": False}
            tp = cls.from_linear(lin, overlap=overlap, **kw)
            xt = x.clone().requires_grad_()
            y = tp(xt)
            y.backward(dy[:, :y.shape[1]])
            for name, want, got in (("A", lin.lora_A.grad, tp.lora_A.grad), ("B", lin.lora_B.grad, tp.lora_B.grad)):
                out[(kind, overlap, name)] = (bool(torch.isfinite(want).all()), bool(torch.isfinite(got).all()))
    return out


def bf16_float32_lora_worker(rank, world_size, tmp):
    """A bf16 model's LoRA, float32 by default (PEFT's autocast_adapter_dtype): the shards keep float32 through
    tensor_parallelize, save_peft_adapter and load_peft_adapter."""
    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import inject_lora, load_peft_adapter, save_peft_adapter

    def model(random_b):
        m = _model("llama").to(torch.bfloat16)
        torch.manual_seed(1)
        inject_lora(m, ["q_proj", "o_proj", "down_proj"], r=4, alpha=12.0)
        if random_b:
            _randomize_b(m)
        return m

    def lora_dtypes(m):
        return {p.dtype for n, p in m.named_parameters() if "lora_" in n}

    ref = model(True)
    x = _tokens(ref)
    sharded = tensor_parallelize(copy.deepcopy(ref))
    tp_dir, ref_dir = os.path.join(tmp, "tp"), os.path.join(tmp, "ref")
    save_peft_adapter(sharded, tp_dir)
    _save_reference(rank, ref, ref_dir)
    loaded = load_peft_adapter(tensor_parallelize(model(False)), ref_dir)
    with torch.no_grad():
        same_logits = torch.equal(loaded(x), sharded(x))
    return dict(sharded=lora_dtypes(sharded), loaded=lora_dtypes(loaded), same_files=_same_files(tp_dir, ref_dir),
                files={t.dtype for t in _files(tp_dir)[1].values()}, same_logits=same_logits)


def test_bf16_model_keeps_float32_lora_shards(pool, tmp_path):
    for r in pool.run(bf16_float32_lora_worker, (str(tmp_path),), timeout=90):
        assert r["sharded"] == r["loaded"] == r["files"] == {torch.float32}, r
        assert r["same_files"] and r["same_logits"], r


def test_fp16_lora_shards_scale_before_the_second_gemm(pool):
    """Regression: the sharded layers applied s after their float16 products ((dy B) A, dy^T (x A^T)), which
    overflowed to inf where autograd of the unsharded layer (s first) stayed finite."""
    for res in pool.run(fp16_lora_scale_worker, timeout=90):
        for key, (want_finite, got_finite) in res.items():
            assert want_finite and got_finite, (key, res)


def test_peft_lora_dropout_is_the_active_adapters():
    """Regression: lora_dropout was read from the first adapter, not the active one."""
    pytest.importorskip("peft")
    from llmkern.parallel.layers import _lora_parts

    m = _peft_two(second=dict(lora_dropout=0.5))
    m.base_model.set_adapter("second")  # active adapter with dropout: refused (it used to be accepted)
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        _lora_parts(m.base_model.model.up_proj)
    m = _peft_two(first=dict(lora_dropout=0.5), second={})
    m.base_model.set_adapter("second")  # the inactive adapter's dropout is not used: accepted
    layer = m.base_model.model.up_proj
    _, A, B, s = _lora_parts(layer)
    assert A is layer.lora_A["second"].weight and B is layer.lora_B["second"].weight and s == layer.scaling["second"]
