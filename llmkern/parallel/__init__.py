"""Tensor parallelism with collectives overlapped with compute (Megatron-LM semantics).

    ColumnParallelLinear, RowParallelLinear     the layers (overlap="ring" | "none")
    tensor_parallelize(model, group)            shard a transformer's attention and MLP in place
                                                (vocab_parallel=True: embedding and LM head too;
                                                MoE layers: the routed experts along their FFN width)
    TensorParallelMoE, ShardedExperts           expert tensor parallelism (llmkern.parallel.moe)
    expert_parallelize(model, group)            expert parallelism: whole experts partitioned over the
                                                ranks, tokens exchanged by all-to-all (ExpertParallelMoE,
                                                all_reduce_replicated_grads: llmkern.parallel.expert)
    VocabParallelEmbedding, VocabParallelLMHead vocabulary-sharded embedding / LM head and loss
    context_parallelize(model, group)           context parallelism: the sequence sharded over ranks
                                                (context_parallel_attention, shard_sequence, ...)
    pipeline_parallelize(model, group, ...)     pipeline parallelism: the blocks cut into stages, one per rank
                                                (or v interleaved chunks), micro-batches through them (GPipe /
                                                1F1B / interleaved 1F1B: PipelineParallel,
                                                llmkern.parallel.pipeline); a tensor_parallelize'd model on a
                                                TP x PP grid of groups too
    lora_state                                  LoRA shards <-> whole factors (llmkern.peft's adapter
                                                save/load under tensor parallelism uses it)
    cost_model                                  predicted step time / exposed communication, pipeline bubble
    comm                                        the ring (decomposed) and plain collectives
    launch.spawn                                run a function on p local ranks (tests, benchmarks)

Everything runs on torch.distributed (NCCL on GPUs, gloo on CPUs) and works under torchrun.
"""
from llmkern.parallel import comm  # noqa: F401
from llmkern.parallel.comm import set_validation  # noqa: F401
from llmkern.parallel import guards  # noqa: F401  (llmkern.generate's hook: sys.modules)
from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear, OVERLAPS  # noqa: F401
from llmkern.parallel.tensor_parallel import full_state_dict, load_full_state_dict, tensor_parallelize  # noqa: F401
from llmkern.parallel import lora_state  # noqa: F401
from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead  # noqa: F401
from llmkern.parallel.context import (all_reduce_gradients, context_parallel_attention,  # noqa: F401
                                      context_parallel_positions, context_parallelize, gather_sequence,
                                      shard_sequence)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "tensor_parallelize", "set_validation", "OVERLAPS",
           "comm", "lora_state", "cost_model", "launch",
           "VocabParallelEmbedding", "VocabParallelLMHead",
           "context_parallel_attention", "context_parallelize", "shard_sequence", "gather_sequence",
           "context_parallel_positions", "all_reduce_gradients", "TensorParallelMoE", "ShardedExperts",
           "ExpertParallelMoE", "expert_parallelize", "all_reduce_replicated_grads", "expert_parameter_names",
           "pipeline_parallelize", "PipelineParallel", "full_state_dict", "load_full_state_dict"]

_EXPERT = ("ExpertParallelMoE", "expert_parallelize", "all_reduce_replicated_grads", "expert_parameter_names")


def __getattr__(name):
    if name in ("cost_model", "launch"):
        import importlib

        return importlib.import_module(f"llmkern.parallel.{name}")
    if name in ("TensorParallelMoE", "ShardedExperts"):  # (lazy: llmkern.parallel.moe imports the model zoo)
        from llmkern.parallel import moe

        return getattr(moe, name)
    if name in _EXPERT:  # (lazy too: llmkern.parallel.expert imports the model zoo)
        from llmkern.parallel import expert

        return getattr(expert, name)
    if name in ("pipeline_parallelize", "PipelineParallel"):  # (lazy too: it imports the model zoo)
        from llmkern.parallel import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'llmkern.parallel' has no attribute {name!r}")
