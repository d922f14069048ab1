"""Find what keeps the training forward/backward from being captured in a CUDA graph (GPU).

``train.cuda_graph`` captures the whole forward/backward; when the capture fails, CUDA reports
only that "a previous error" invalidated it. This script narrows it down on a small model:

1. one eager step per mode under ``torch.cuda.set_sync_debug_mode("warn")``, printing the Python
   stack of every host synchronisation inside the forward/backward (none may happen in a capture);
2. captures of growing regions per mode, each reported as ok or with its error: the model's
   forward without autograd, forward + ``backward()`` of the loss, then Megatron's schedule with the
   DDP gradient hooks and ``finalize_model_grads`` (what ``train.cuda_graph`` captures).

Usage (GPU host, repo root): ``python3 tools/bench/probe_cuda_graph.py [--override SECTION.KEY=VALUE]``.
"""
from __future__ import annotations

import argparse
import traceback
import warnings

import torch

from megatron_ratplus.training.cuda_graph import CudaGraphCaptureError, capture_cuda_graph


KEEP_ALIVE = []   # a memory pool lives only as long as a graph using it


def try_capture(label, fn, pool, stream):
    """Capture ``fn`` (returning a tensor) with the mechanism ``train.cuda_graph`` uses, replay it,
    and print ok or the failure's cause; return the pool for the next region."""
    try:
        step, captured_pool = capture_cuda_graph(lambda _inputs: fn(), [], pool, stream)
        KEEP_ALIVE.append(step)
        pool = captured_pool
        step.replay([])
        torch.cuda.synchronize()
        print(f"capture {label}: ok")
    except Exception as e:   # report and go on with the next region
        error = e.__cause__ if isinstance(e, CudaGraphCaptureError) and e.__cause__ is not None else e
        print(f"capture {label}: FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")
        cause = error.__cause__ or error.__context__
        if cause is not None:
            print(f"    caused by {type(cause).__name__}: {str(cause).splitlines()[0]}")
        traceback.print_exception(error, limit=-6)
        torch.cuda.synchronize()
    return pool


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = ap.parse_args()

    from megatron_ratplus.model import set_attention_mode
    from megatron_ratplus.parallel import ParallelLayout, destroy_distributed, initialize_distributed
    from megatron_ratplus.training.config import load_config
    from megatron_ratplus.training.setup import build_training_objects
    from megatron_ratplus.training.step import forward_backward, split_batch

    initialize_distributed(ParallelLayout(), seed=1234)
    vocab, seq = 512, a.seq_len
    cfg = load_config(None, [f"train.seq_len={seq}", "train.micro_batch_size=2", "train.global_batch_size=2",
                             "train.max_steps=10", "train.precision=bf16", "logging.progress=false",
                             "model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=4",
                             "model.dilation=8", "train.cuda_graph=true", *a.override])
    objs = build_training_objects(cfg, cfg.model.model_args(vocab_size=vocab, seq_len=seq), 10)
    batches = [torch.randint(0, vocab, (2, seq + 1), device="cuda")]
    model = objs.model[0]

    def schedule():
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        return forward_backward(objs.model, batches, seq_len=seq)

    def forward_only():
        inputs, labels, positions = split_batch(batches[0])
        with torch.no_grad():
            return model(inputs, positions, None, labels=labels)

    def forward_and_backward():   # no_sync: DDP's hooks accumulate but start no reduction
        inputs, labels, positions = split_batch(batches[0])
        with model.no_sync():
            loss = model(inputs, positions, None, labels=labels).float().sum()
            loss.backward()
        return loss.detach()

    pool = None
    for mode in ("sparse", "dense"):
        set_attention_mode(objs.model, mode)
        for _ in range(2):   # autotuning, first-use choices, compilation
            schedule()
            forward_and_backward()
            forward_only()
        torch.cuda.synchronize()
        print(f"--- {mode}: host synchronisations in one eager forward/backward (sync debug mode) ---")
        syncs = []

        def record(message, category, filename, lineno, file=None, line=None):
            if "called a synchronizing" in str(message):
                syncs.append("".join(traceback.format_stack(limit=8)[:-1]))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                schedule()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        print(f"{len(syncs)} synchronising call(s)")
        for stack in syncs[:6]:
            print(stack)
        for label, fn in (("forward (no grad)", forward_only), ("forward + backward", forward_and_backward),
                          ("Megatron schedule + DDP + finalize", schedule)):
            pool = try_capture(f"{mode}: {label}", fn, pool, objs.step_graphs.stream)
    destroy_distributed()


if __name__ == "__main__":
    main()
