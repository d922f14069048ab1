"""Sharded checkpoints on Megatron-core ``dist_checkpointing`` (torch_dist format).

* :class:`CheckpointManager` — periodic saves (optionally asynchronous), resume from ``latest``
  with fallback past incomplete checkpoints, resharding to another TP/PP/DP layout, keep-last-N.
* :func:`load_weights_only` — model weights of a checkpoint (adaptation, evaluation).
* :class:`PreemptionHandler` — SIGTERM/SIGUSR1 and wall-time limits, agreed across ranks.
* :class:`CheckpointError` — every refusal (broken checkpoint, config mismatch, overwrite).

Command line: ``ratplus-ckpt inspect|list`` (:mod:`.inspect_cli`). Conversion helpers for the
Hugging Face exporter: :mod:`.hf_bridge`.

Names are imported lazily, so ``PreemptionHandler`` or ``CheckpointError`` do not pull in
Megatron-core.
"""
import importlib

_EXPORTS = {
    "CheckpointManager": ".manager",
    "load_weights_only": ".manager",
    "resolve_checkpoint": ".manager",
    "complete_checkpoints_after": ".manager",
    "CheckpointError": ".errors",
    "PreemptionHandler": ".preemption",
    "checkpoint_problems": ".validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
