"""Checkpoint <-> plain TP=1 state dict, for the Hugging Face converter (``ratplus-convert``).

* :func:`load_full_state_dict` reads any checkpoint (any TP/PP/DP layout it was saved with) into
  a TP=1/PP=1 ``GPTModel`` built on CPU from the stored model args, and returns that model's
  ``state_dict()`` in fp32 (``_extra_state`` entries dropped). When the checkpoint holds fp32
  master weights (bf16 training with the plain optimizer), those are used instead of the bf16
  model weights.
* :func:`read_train_state` returns a checkpoint's stored train state (run config, step, tokens).
* :func:`save_full_state_dict` writes such a state dict as a weights-only checkpoint
  (``iter_0000000`` + the ``latest`` tracker) that training can start from
  (``checkpoint.init_from``) or that :func:`load_full_state_dict` reads back.

Both run in a single process: they initialise a world of one (CPU mode without a GPU) when no
process group exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling

from .. import collectives
from .errors import CheckpointError
from .manager import CheckpointManager, resolve_checkpoint
from .paths import TRACKER_NAME, iter_dir_name, list_iter_dirs, tracker_path
from .state import model_sharded_state_dict, runtime_metadata, sharded_metadata
from .validate import RATPLUS_KEY, decode_train_state, load_common, read_dcp_index

MASTER_PREFIX = "optimizer.state.fp32_param."
_PADDED_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _ensure_single_process() -> None:
    from megatron.core import parallel_state

    from ..parallel import ParallelLayout, initialize_distributed
    if collectives.initialized() and parallel_state.model_parallel_is_initialized():
        if (collectives.world_size() != 1 or parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise CheckpointError("hf_bridge works in a single process (world size 1, TP=PP=1); "
                                  f"this process is one of {collectives.world_size()}")
        return
    initialize_distributed(ParallelLayout())


def build_tp1_model(model_args: dict) -> torch.nn.Module:
    """An fp32 TP=1/PP=1 RAT+ ``GPTModel`` on CPU (local spec, reference kernels)."""
    from ..model import RATPlusModelArgs, build_gpt_model, to_transformer_config
    try:
        args = RATPlusModelArgs.from_dict(dict(model_args))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model args: {e}") from e
    config = to_transformer_config(args, use_cpu_initialization=True, params_dtype=torch.float32,
                                   kernel_backend="reference")
    return build_gpt_model(args, config, spec="local")


def _plain_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def read_train_state(ckpt_dir) -> dict:
    """The train state a checkpoint stores (step, tokens, run config, model args…), read without
    building a model; ``ckpt_dir`` is an ``iter_*`` directory or a save_dir (its latest)."""
    path = resolve_checkpoint(str(ckpt_dir))
    if path is None:
        raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    return decode_train_state(load_common(path))


def load_full_state_dict(ckpt_dir) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(model_args_dict, state_dict)`` of a checkpoint (an ``iter_*`` dir or a save_dir)."""
    _ensure_single_process()
    path = resolve_checkpoint(str(ckpt_dir))
    if path is None:
        raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    common = load_common(path)
    info = common[RATPLUS_KEY]
    model_args = info.get("model_args") or decode_train_state(common).get("model_args")
    if not model_args:
        raise CheckpointError(f"checkpoint {path} does not store the model args (train_state['model_args']); "
                              f"cannot rebuild the model")
    if hasattr(model_args, "to_dict"):
        model_args = model_args.to_dict()
    model = build_tp1_model(model_args)

    sharded = model_sharded_state_dict([model], runtime_metadata(sharded_metadata(None)))
    index = read_dcp_index(path).state_dict_metadata
    if (info.get("optimizer") or {}).get("kind") == "plain":
        # bf16 training keeps fp32 master weights in the optimizer state: export those.
        for item in nested_values(sharded):
            if isinstance(item, ShardedTensor):
                stored, master = index.get(item.key), index.get(MASTER_PREFIX + item.key)
                if (master is not None and stored is not None and hasattr(stored, "properties")
                        and stored.properties.dtype != torch.float32):
                    item.key = MASTER_PREFIX + item.key
    try:
        loaded, _missing, unexpected = dist_checkpointing.load(
            sharded, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as e:
        raise CheckpointError(f"reading checkpoint {path} failed: {type(e).__name__}: {e}") from e
    if unexpected:
        raise CheckpointError(f"checkpoint {path} lacks tensors the model needs: "
                              f"{', '.join(sorted(unexpected))}")
    model.load_state_dict(loaded["model"], strict=True)
    return dict(model_args), _plain_state_dict(model)


def check_import_target(out_dir: Path) -> None:
    """An imported model is iteration 0 of a new save_dir: written beside a run's checkpoints it
    would become that save_dir's ``latest`` and a later ``checkpoint.load=latest`` would resume
    from it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    held = [p.name for _, p in list_iter_dirs(out_dir)]
    if tracker_path(out_dir).exists():
        held.append(TRACKER_NAME)
    if held:
        raise CheckpointError(f"{out_dir} already holds checkpoints ({', '.join(held[-3:])}); write the "
                              f"converted checkpoint to a new or empty directory")


def save_full_state_dict(model_args_dict: dict, state_dict: Dict[str, torch.Tensor], out_dir,
                         train_state: Optional[dict] = None) -> Path:
    """Write ``state_dict`` (TP=1 ``GPTModel`` names) as a weights-only checkpoint in ``out_dir``.

    The embedding and output layer may have either the padded row count of the built model or
    exactly ``vocab_size`` rows (padding rows are then zero). Never overwrites an existing
    checkpoint. Returns the checkpoint directory (``out_dir/iter_0000000``).
    """
    _ensure_single_process()
    check_import_target(Path(out_dir))
    model = build_tp1_model(model_args_dict)
    expected = model.state_dict()
    state_dict = dict(state_dict)
    vocab = int(model_args_dict["vocab_size"])
    for name in _PADDED_ROWS:
        t = state_dict.get(name)
        if t is not None and name in expected and t.shape[0] == vocab < expected[name].shape[0]:
            padded = torch.zeros(expected[name].shape, dtype=t.dtype)
            padded[:vocab] = t
            state_dict[name] = padded
    missing = sorted(k for k in expected if not k.endswith("_extra_state") and k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong = sorted(f"{k}: got {tuple(state_dict[k].shape)}, model needs {tuple(expected[k].shape)}"
                   for k in expected if k in state_dict and not k.endswith("_extra_state")
                   and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        lines = ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected: {', '.join(unexpected)}"] if unexpected else []) + \
                [f"wrong shape {w}" for w in wrong]
        raise CheckpointError("state dict does not fit the model args:\n  " + "\n  ".join(lines))
    with torch.no_grad():
        for k, v in state_dict.items():
            if not k.endswith("_extra_state"):
                expected[k].copy_(v.to(expected[k].dtype))
    # Params are views of the state dict tensors: they were filled in place above.
    ts = dict(train_state or {})
    ts.setdefault("step", 0)
    ts.setdefault("consumed_tokens", 0)
    ts["model_args"] = dict(model_args_dict)
    CheckpointManager(out_dir).save(0, [model], None, None, ts)
    return Path(out_dir) / iter_dir_name(0)
