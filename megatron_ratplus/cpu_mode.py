"""CPU mode: run Megatron-core's real code paths (GPTModel, pipeline schedules, DDP, optimizer,
dist_checkpointing) on a machine without a GPU, over gloo.

Why this exists: Megatron-core hard-codes CUDA in many places (``device="cuda"``,
``torch.cuda.current_device()``, ``torch.cuda.synchronize()``, CUDA RNG state trackers, CUDA
streams). A recipe should be smoke-testable on a laptop or a CI runner before cluster time is
spent, and the test-suite must exercise the same code that runs on the cluster, not a mock of it.

What it does, only when ``torch.cuda.is_available()`` is False:

* installs a :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA device arguments
  (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, and bare integer device indices) to CPU
  for tensor factories and ``Tensor.to``/``Tensor.cuda``;
* turns ``torch.cuda.synchronize/set_device/empty_cache`` into no-ops, makes
  ``current_device()`` return ``"cpu"``, and gives ``torch.cuda.Stream``,
  ``Event`` and ``stream()`` harmless CPU stand-ins;
* reports CUDA type strings from ``Tensor.type()`` (Megatron's gradient clipping asserts them);
* maps the CUDA RNG API used by Megatron's ``CudaRNGStatesTracker`` onto the CPU generator, so
  ``model_parallel_cuda_manual_seed`` and the tracker's ``fork()`` work;
* makes ``torch.cuda.memory_*`` report 0.

It is a strict no-op when CUDA exists (returns False) so the same entry point runs on a cluster.
Enable it before building any Megatron object: :func:`enable_cpu_mode`.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"enabled": False, "mode": None}
_LOCK = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means "that CUDA device" in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda or func is torch.Tensor.cpu:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's grad clipping asserts 'torch.cuda.FloatTensor' type strings.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.pin_memory or func is torch.Tensor.is_pinned:
            return args[0] if func is torch.Tensor.pin_memory else False
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def query(self):
        return True


class _CpuEvent:
    """Stand-in for torch.cuda.Event; timings come from the wall clock elsewhere."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _returning(value):
    """A new function returning ``value``: one object per patched attribute, because TorchDynamo
    indexes ``torch.cuda``'s functions by identity and refuses one object found under two names
    with different tracing rules (``synchronize`` and ``set_device``), which broke any
    ``torch.compile`` decorator met on import after CPU mode was on."""
    def stand_in(*args, **kwargs):
        return value
    return stand_in


def _patch_cuda_module() -> None:
    cuda = torch.cuda
    cuda.synchronize = _returning(None)
    cuda.set_device = _returning(None)
    cuda.empty_cache = _returning(None)
    # A device string rather than an index: backward passes run on autograd's worker threads, where
    # the (thread-local) function mode is not active, and Megatron allocates there with
    # ``device=torch.cuda.current_device()``.
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 1
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda *a, **k: _CpuStream()
    cuda.default_stream = lambda *a, **k: _CpuStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _returning(0))
    cuda.reset_peak_memory_stats = _returning(None)
    # RNG: the CUDA generator API, served by the CPU generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = _returning(None)  # torch.manual_seed already seeded the CPU generator
    cuda.random.manual_seed = cuda.manual_seed


def _patch_megatron() -> None:
    """Megatron helpers that talk to CUDA generators directly."""
    try:
        from megatron.core.tensor_parallel import random as mp_random
    except ImportError:  # megatron not installed: the torch-level patches are all we need
        return

    def _get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = _get_state
    mp_random._set_cuda_rng_state = _set_state


def enable_cpu_mode() -> bool:
    """Enable the CPU emulation if (and only if) no CUDA device is present.

    Returns True when the emulation is active. Idempotent and process-wide: the function mode is
    pushed once and stays for the life of the process (Megatron objects keep calling into CUDA
    APIs long after construction).
    """
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _STATE["enabled"]:
            return True
        _patch_cuda_module()
        _patch_megatron()
        mode = _CudaToCpuMode()
        mode.__enter__()
        _STATE["mode"] = mode
        _STATE["enabled"] = True
    return True


def cpu_mode_enabled() -> bool:
    return _STATE["enabled"]

