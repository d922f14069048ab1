"""What goes into a checkpoint: the sharded state dicts handed to ``dist_checkpointing``.

* ``model`` (or ``model0``, ``model1``… with virtual pipelining): each chunk's
  ``GPTModel.sharded_state_dict()``. Tensor keys are global (layer index folded into a stacked
  ``decoder.layers.*`` tensor, TP shards placed by offset), so any TP/PP/VPP layout can load them.
* ``optimizer``: ``optimizer.sharded_state_dict(model_sd)``: Adam moments (and fp32 master
  weights in bf16 runs) keyed after the model tensors they belong to; left out before the first
  update (no state yet; the loading side starts a fresh optimizer). The distributed optimizer
  (GPU) is saved in one of two Megatron formats (``checkpoint.optimizer_format``):
  ``dp_reshardable`` (the default, as in Megatron-LM: each rank writes its own shard of the
  gradient buffers, no communication) resumes under another DP size but not another TP/PP/VPP
  layout; ``fully_reshardable`` gathers each model-parallel rank's state over DP at save time
  (host memory) and resumes under any layout. Megatron-core 0.16's ``fully_sharded_model_space``
  fails at the first save ("ShardedTensor.flattened_range is not supported"), and its
  ``fully_reshardable`` load needs :func:`adam_steps_set_aside` with torch's AdamW (no
  Transformer-Engine/apex).
* ``rng_state``: one ``ShardedObject`` per global rank (Python/NumPy/torch/CUDA/Megatron tracker).
* plain values (rank 0 writes them to ``common.pt``): scheduler state, the caller's train state,
  and a ``ratplus`` section (format version, iteration, parallel layout, architecture).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper)

from .. import collectives
from .architecture import unwrap_model
from .rng import capture_rng_state

FORMAT_VERSION = 1
RNG_KEY = "rng_state"
# Megatron's distributed-optimizer checkpoint formats that this package writes; the first is the default.
DISTRIBUTED_OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")

# Transformer-Engine's fused norm+linear stores the RMSNorm weight inside the linear; the local
# spec keeps a separate norm module. Checkpoints always use the local names so that a model built
# with either spec loads them.
_TE_TO_LOCAL_KEYS = (
    (".self_attention.linear_in.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)


def model_state_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def parallel_layout() -> Dict[str, Optional[int]]:
    return {
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_parallel": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
        "world_size": collectives.world_size(),
    }


def inner_optimizers(optimizer) -> list:
    """The Megatron optimizers inside ``optimizer``: a ChainedOptimizer's members, else itself."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def optimizer_has_stepped(optimizer) -> bool:
    """Whether this rank's optimizer holds per-parameter state (Adam's moments and step count).

    Why: torch's Adam and the fused update create that state at the first update, so a checkpoint
    saved before any update (the first one skipped for a non-finite gradient, then a preemption)
    holds no moments, and the loading side, whose template asks for them, would refuse it."""
    for inner in inner_optimizers(optimizer):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is not None and any(len(s) for s in torch_optimizer.state.values()):
            return True
    return False


def prepare_for_loading(optimizer) -> None:
    """Give a distributed optimizer that has not updated yet its per-parameter state, which its
    ``sharded_state_dict`` reads (without Transformer-Engine/apex, megatron-core asserts on the Adam
    step count of every parameter). Megatron's own dummy step (zero gradients) does it; the loaded
    checkpoint then replaces the weights, master weights, moments and step count it touched."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    for inner in inner_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer) and not any(len(s) for s in inner.optimizer.state.values()):
            inner._init_optimizer_states_with_dummy_values()


def restore_adam_steps(optimizer, loaded: dict) -> None:
    """Put the checkpoint's Adam step count back into a distributed optimizer's torch Adam state.

    Why (megatron-core 0.16 without Transformer-Engine/apex): its load gives every parameter's
    state one shared step tensor, which torch's AdamW then increments once per parameter at each
    update, and the ``dp_reshardable`` load copies into it this rank's step from before the load (1
    after :func:`prepare_for_loading`). Either way Adam's bias correction leaves the uninterrupted
    run's from the first update after a resume."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    inners = inner_optimizers(optimizer)
    states = [loaded] if len(inners) == 1 else [v for _, v in sorted(loaded.items())]
    for inner, state in zip(inners, states):
        if not isinstance(inner, DistributedOptimizer):
            continue
        for group, saved in zip(inner.optimizer.param_groups, state["optimizer"]["param_groups"]):
            if saved.get("step") is None:
                continue
            for param in group["params"]:
                param_state = inner.optimizer.state.get(param, {})
                if torch.is_tensor(param_state.get("step")):     # a tensor of its own for every parameter
                    param_state["step"] = param_state["step"].new_tensor(float(saved["step"]))


@contextlib.contextmanager
def adam_steps_set_aside(optimizer):
    """Inside: a distributed optimizer's loads copy parameter states without torch AdamW's "step".

    Why (megatron-core 0.16 without Transformer-Engine/apex): the ``fully_reshardable`` load copies
    every key of a parameter's torch AdamW state from the checkpoint, which keeps the step count in
    the param groups instead, and fails with KeyError 'step'. The step tensors are put back as they
    were; :func:`restore_adam_steps` then sets them from the checkpoint."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    patched = []
    for inner in inner_optimizers(optimizer):
        if not isinstance(inner, DistributedOptimizer):
            continue
        copy_states = inner._set_main_param_and_optimizer_states

        def without_step(model_param, tensors, inner=inner, copy_states=copy_states):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            state = inner.optimizer.state[inner.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                copy_states(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step
        inner._set_main_param_and_optimizer_states = without_step
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states    # the class's method again


def optimizer_kind(optimizer) -> Optional[str]:
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner_optimizers(optimizer)) \
        else "plain"


def sharded_metadata(optimizer, distributed_format: str = DISTRIBUTED_OPTIMIZER_FORMATS[0]) -> dict:
    """The (serialisable) metadata steering ``sharded_state_dict`` of model and optimizer;
    ``distributed_format``: one of :data:`DISTRIBUTED_OPTIMIZER_FORMATS` (checked by the
    CheckpointManager that asks), for a distributed optimizer."""
    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if optimizer_kind(optimizer) == "distributed":
        meta["distrib_optim_sharding_type"] = distributed_format
        if distributed_format == "fully_reshardable" and not torch.cuda.is_available():
            # Megatron gathers over NCCL on the GPU; without one, over its gloo DP group to DP rank 0.
            meta["distrib_optim_fully_reshardable_mem_efficient"] = True
    return meta


def runtime_metadata(meta: dict) -> dict:
    return dict(meta, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))


def canonicalize_keys(sharded_state_dict: dict) -> dict:
    """Rename Transformer-Engine fused-norm tensor keys to the local spec's names (in place)."""
    for item in nested_values(sharded_state_dict):
        if isinstance(item, ShardedBase):
            for te_suffix, local_suffix in _TE_TO_LOCAL_KEYS:
                if item.key.endswith(te_suffix):
                    item.key = item.key[: -len(te_suffix)] + local_suffix
    return sharded_state_dict


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module], metadata: dict) -> dict:
    chunks = list(model_chunks)
    out = {}
    for i, chunk in enumerate(chunks):
        sd = unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        out[model_state_key(i, len(chunks))] = canonicalize_keys(sd)
    return out


def rng_sharded_object() -> ShardedObject:
    """This rank's RNG states, one slot per global rank."""
    return ShardedObject(RNG_KEY, capture_rng_state(), (collectives.world_size(),), (collectives.rank(),),
                         replica_id=0)


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def save_strategy():
    """torch_dist, with the writes spread over data-parallel replicas (fully parallel save)."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"), _dp_group())


def load_strategy(checkpoint_dir: str):
    """torch_dist, each DP replica reading a part and exchanging it (fully parallel load)."""
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(checkpoint_dir), _dp_group())


def versions() -> dict:
    try:
        from megatron.core.package_info import __version__ as mcore_version
    except ImportError:  # pragma: no cover
        mcore_version = None
    return {"torch": str(torch.__version__), "megatron_core": str(mcore_version)}
