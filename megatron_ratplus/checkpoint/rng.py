"""Random-number generator states of one rank: Python, NumPy, torch (CPU and CUDA) and
Megatron's model-parallel CUDA RNG tracker (dropout / initialisation streams)."""
from __future__ import annotations

import random

import numpy as np
import torch


def _tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    return get_cuda_rng_tracker()


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": None,
    }
    try:
        state["tracker"] = _tracker().get_states()
    except Exception:  # tracker not initialised (no model-parallel seed): nothing to keep
        pass
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        _tracker().set_states(state["tracker"])
