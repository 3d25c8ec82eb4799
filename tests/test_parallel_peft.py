"""PEFT adapters under tensor parallelism: save_peft_adapter on a sharded model writes the files the
unsharded model writes, and load_peft_adapter puts each rank's shard into a sharded model.

Two gloo ranks on 127.0.0.1 (llmkern.parallel.launch.RankPool), zoo models with LoRA on every
projection and random lora_B, so a wrong shard or order shows in the logits.
"""
import json
import os

import pytest
import torch

from llmkern.parallel.launch import RankPool

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
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.2)
    return m


def _files(path):
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f), load_file(os.path.join(path, "adapter_model.safetensors"))


def save_load_worker(rank, world_size, tmp):
    import copy

    import torch.distributed as dist

    from llmkern.parallel import tensor_parallelize
    from llmkern.peft import load_peft_adapter, save_peft_adapter

    out = {}
    for arch in ("llama", "gpt"):
        ref = _model(arch, lora_r=4, random_b=True)
        x = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = ref(x)
        tp_dir, ref_dir = os.path.join(tmp, arch, "tp"), os.path.join(tmp, arch, "ref")
        save_peft_adapter(tensor_parallelize(copy.deepcopy(ref)), tp_dir)  # every rank calls it
        if rank == 0:
            save_peft_adapter(ref, ref_dir)
        dist.barrier()
        (cfg_tp, w_tp), (cfg_ref, w_ref) = _files(tp_dir), _files(ref_dir)
        same_files = cfg_tp == cfg_ref and w_tp.keys() == w_ref.keys() and all(
            torch.equal(w_tp[k], w_ref[k]) for k in w_ref)
        unsharded = load_peft_adapter(_model(arch), tp_dir)  # into a plain model
        sharded = tensor_parallelize(_model(arch, lora_r=4))  # zero lora_B until the load
        load_peft_adapter(sharded, tp_dir)
        trainable = [n for n, p in sharded.named_parameters() if p.requires_grad]
        with torch.no_grad():
            err_unsharded = (unsharded(x) - want).abs().max().item()
            err_sharded = (sharded(x) - want).abs().max().item()
        errors = []
        for what, model in (("no LoRA", tensor_parallelize(_model(arch))),
                            ("rank", tensor_parallelize(_model(arch, lora_r=2)))):
            try:
                load_peft_adapter(model, tp_dir)
                errors.append(f"{what}: no error")
            except ValueError as e:
                errors.append(f"{what}: {e}")
        out[arch] = dict(same_files=same_files, err_unsharded=err_unsharded, err_sharded=err_sharded,
                         trainable=trainable, errors=errors)
    return out


@pytest.fixture(scope="module")
def pool():
    p = RankPool(2, pg_timeout=30.0)
    yield p
    p.close()


def test_adapter_saves_and_loads_under_tensor_parallelism(pool, tmp_path):
    results = pool.run(save_load_worker, (str(tmp_path),), timeout=90)
    for rank_result in results:
        for arch, r in rank_result.items():
            assert r["same_files"], arch  # gathered shards = the unsharded model's adapter, bit for bit
            assert r["err_unsharded"] < 1e-5 and r["err_sharded"] < 1e-4, (arch, r)
            assert r["trainable"] and all("lora_" in n for n in r["trainable"]), (arch, r["trainable"])
            no_lora, rank = r["errors"]
            assert "without LoRA parameters" in no_lora, no_lora
            assert "has rank 2, checkpoint has 4" in rank, rank
