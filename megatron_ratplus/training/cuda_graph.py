"""Full-iteration CUDA graphs of the training forward/backward, one graph per attention mode.

Why: at the recipes' micro-batch of 2 sequences the training step is host-bound. The host queues
a layer's launches (Megatron's schedule, the DDP hooks, the RAT+ layer's Triton and compiled
kernels) about as slowly as the GPU runs them (docs/benchmarks.md, "Where the GPU waits"). A
captured graph replays the whole forward/backward with one launch, so the GPU no longer waits.

How (the approach of Megatron-core's ``FullCudaGraphWrapper``, keyed differently): the first
``warmup_steps`` calls for a key run eagerly. They trigger Triton autotuning, the kernels'
first-use timings, ``torch.compile`` and Megatron's lazily built buffers, none of which may happen
inside a capture. The next call copies its micro-batches into static input buffers, captures
``run(static_inputs)`` on a side stream, and replays it; later calls copy and replay. Megatron's
wrapper keys its graphs by training/validation only; joint training runs two different
forward/backwards per batch (sparse, then dense attention), so here the key is the attention mode
and the micro-batches' shapes. The graphs share one memory pool: they replay one after the other,
never concurrently, and each one's output is read before the other replays.

Only the forward/backward is captured. The optimizer step, gradient zeroing, the loss read and
evaluation stay eager, so the loss-skipping and clipping logic and checkpointing are unchanged.
Requirements, checked where the config is validated: a GPU, no pipeline parallelism (its
point-to-point schedule is not captured here), no activation recomputation (its RNG
bookkeeping is host-side) and no overlapped parameter all-gather (its forward hooks wait for the
optimizer's eager all-gather, a wait a replay would skip). Python side effects inside the
captured region (DDP's per-parameter bookkeeping, autograd hooks) run once, during the capture;
their GPU work replays.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

Run = Callable[[List[torch.Tensor]], torch.Tensor]


class CudaGraphCaptureError(RuntimeError):
    """Capturing the forward/backward failed: something in it is not capturable."""


def _generators_to_register():
    """Megatron's tracked RNG states that are graph-safe generators (``use_cudagraphable_rng``);
    the default CUDA generator is registered by torch itself."""
    try:
        from megatron.core.tensor_parallel.random import get_all_rng_states
        states = get_all_rng_states()
    except (AssertionError, ImportError):
        return []
    return [s for s in states.values() if isinstance(s, torch.Generator)]


class CapturedStep:
    """One captured forward/backward: static inputs, the graph, its output."""

    def __init__(self, graph, static_inputs: List[torch.Tensor], output: torch.Tensor):
        self.graph = graph
        self.static_inputs = static_inputs
        self.output = output

    def replay(self, microbatches: Sequence[torch.Tensor]) -> torch.Tensor:
        for static, batch in zip(self.static_inputs, microbatches):
            static.copy_(batch, non_blocking=True)
        self.graph.replay()
        # A copy: the graph's output is overwritten by the next replay (of either graph: shared pool).
        return self.output.clone()


def capture_cuda_graph(run: Run, static_inputs: List[torch.Tensor], pool, stream) -> Tuple[CapturedStep, object]:
    """Capture ``run(static_inputs)`` on ``stream`` into a CUDA graph sharing memory ``pool``
    (None: a new one).

    The capture records the work without running it; :meth:`CapturedStep.replay` runs it.
    Returns the step and the pool for the next capture.
    """
    graph = torch.cuda.CUDAGraph()
    for generator in _generators_to_register():
        graph.register_generator_state(generator)
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            output = run(static_inputs)
    except Exception as e:   # the message names the operation that is not capturable
        raise CudaGraphCaptureError(
            f"capturing the training forward/backward in a CUDA graph failed: {type(e).__name__}: {e}. "
            "Train without it (train.cuda_graph=false)") from e
    if not isinstance(output, torch.Tensor):
        raise CudaGraphCaptureError(f"the captured forward/backward must return a tensor, got {type(output).__name__}")
    return CapturedStep(graph, static_inputs, output), graph.pool()


class ForwardBackwardGraphs:
    """Runs the training forward/backward eagerly ``warmup_steps`` times per key, then from a CUDA
    graph captured on the next call.

    ``capture``: ``(run, static_inputs, pool, stream) -> (step with .replay(microbatches), pool)``;
    the CUDA implementation by default (tests pass a stand-in to check the bookkeeping on CPU).

    Captures and the eager warm-up steps run on one side stream, :attr:`stream`, and the DDP
    wrappers must be built under :meth:`capture_stream_context`. Why: DDP keeps each parameter's
    ``AccumulateGrad`` autograd node alive from its construction on, and a node runs on the stream
    it was created on. Built on the default (legacy) stream, every captured backward would make
    the legacy stream wait on the capturing one, which invalidates the capture ("operation would
    make the legacy stream depend on a capturing blocking stream").
    """

    def __init__(self, warmup_steps: int = 2, capture=capture_cuda_graph):
        if warmup_steps < 1:
            raise ValueError(f"CUDA graphs need at least one eager warm-up step (autotuning, first-use "
                             f"timings, compilation happen there), got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self._capture = capture
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._eager_calls: Counter = Counter()
        self._steps: Dict[Hashable, object] = {}
        self._pool = None

    @contextlib.contextmanager
    def capture_stream_context(self):
        """The context to build the DDP wrappers and run the warm-up steps in (see the class
        docstring). The capture stream first waits for the work queued so far (DDP copies the
        initialised parameters into its buffers), and the current stream waits for the side
        stream's work on leaving."""
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    @staticmethod
    def key(name: str, microbatches: Sequence[torch.Tensor]) -> Hashable:
        return (name, tuple((tuple(m.shape), m.dtype, str(m.device)) for m in microbatches))

    @property
    def captured(self) -> List[Hashable]:
        return list(self._steps)

    def __call__(self, name: str, run: Run, microbatches: Sequence[torch.Tensor]) -> torch.Tensor:
        """``run(microbatches)``: the loss tensor of one forward/backward named ``name`` (the
        attention mode); eager during warm-up, then replayed from the graph."""
        microbatches = list(microbatches)
        key = self.key(name, microbatches)
        step = self._steps.get(key)
        if step is None:
            if self._eager_calls[key] < self.warmup_steps:
                self._eager_calls[key] += 1
                with self.capture_stream_context():   # warm up where the capture will run
                    return run(microbatches)
            static_inputs = [m.clone() for m in microbatches]
            step, self._pool = self._capture(run, static_inputs, self._pool, self.stream)
            self._steps[key] = step
        return step.replay(microbatches)


def describe(graphs: Optional[ForwardBackwardGraphs]) -> str:
    """The run log's line on CUDA graphs."""
    if graphs is None:
        return "off (eager launches)"
    return (f"full forward/backward per attention mode, captured after {graphs.warmup_steps} eager "
            f"step(s) per mode")
