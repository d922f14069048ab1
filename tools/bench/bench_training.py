"""Training throughput of a RAT+ preset through the real stack (Megatron GPTModel, DDP, Megatron
optimizer, bf16, pipeline schedule), dense-only and joint (sparse + dense update per batch).

Prints a table: device, preset, shapes, median step time, tokens/s, TFLOP/s per GPU (model FLOPs,
DESIGN.md §4 formula), MFU, peak memory, and the ratio to the DESIGN.md anchors (reference code on
one H100: dense 32.6K tok/s, joint 16.7K tok/s for the 1.5B model at B=2, T=4096).

    python tools/bench/bench_training.py --preset ratplus-1.5b --micro-batch 2 --seq-len 4096 --steps 12
    torchrun --nproc_per_node=2 tools/bench/bench_training.py --tp 2 ...   # multi-GPU
    python tools/bench/bench_training.py ... --override train.cuda_graph=true   # forward/backward replayed

With ``train.cuda_graph=true`` the first warm-up steps per mode are eager and the next one captures
the graph, so ``--warmup`` must exceed ``train.cuda_graph_warmup_steps``; the timed steps are replays.

Token batches are random (throughput does not depend on the text); everything else is the
training code path.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch
from gpu_clocks import ClockSampler, nvidia_smi_id
from gpu_idle import PHASE_PREFIX, format_idle_table, idle_by_phase, profiler_intervals

warnings.filterwarnings("ignore")


def phase(name):
    """A host phase for the idle-gap attribution of ``--profile`` (a no-op range otherwise)."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


def use_dilated_pointer_loads():
    """Force the dilated-attention kernels onto pointer loads: Triton's launcher encodes each host TMA
    descriptor on every launch (20-95 us of host time each), which a host-bound step pays in full."""
    from ratplus_kernels.dilated_attention import fused

    forward = fused._fwd_config(128, torch.bfloat16)
    forward["TMA"] = False
    if forward.get("w0"):
        forward["w0"] = dict(forward["w0"], TMA=False)
    fused._OVERRIDE["fwd"] = forward
    fused.W0_BACKWARD.mode = "single_pass"


def in_phase(function, name):
    """``function`` run inside host phase ``name``."""
    def run(*args, **kwargs):
        with phase(name):
            return function(*args, **kwargs)
    return run


def mark_schedule_phases():
    """Wrap the pipeline schedules' per-micro-batch ``forward_step`` and ``backward_step`` in host
    phases, so ``--profile`` tells a GPU waiting for the forward's launches from one waiting
    for the backward's."""
    from megatron.core.pipeline_parallel import schedules

    schedules.forward_step = in_phase(schedules.forward_step, "forward_step")
    schedules.backward_step = in_phase(schedules.backward_step, "backward_step")


def mark_update_phases(objs):
    """Host phases of the loop's update for ``--profile``: gradient zeroing, the forward/backward
    (``loop.training_forward_backward``) and the optimizer step (which reads the loss)."""
    from megatron_ratplus.training import loop

    loop.training_forward_backward = in_phase(loop.training_forward_backward, "forward_backward")
    objs.optimizer.zero_grad = in_phase(objs.optimizer.zero_grad, "zero_grad")
    objs.optimizer.step = in_phase(objs.optimizer.step, "optimizer_step")


ANCHORS = {"dense": 32.6e3, "joint": 16.7e3, "sparse": 34.0e3}   # tokens/s, 1.5B, one H100


def anchor_tokens_per_s(mode, preset, num_layers, micro_batch, accum, sparse_pattern):
    """The DESIGN.md anchor a run compares with, or None. The anchors are the full 1.5B model at
    micro-batch 2 with one update per micro-batch, and for sparse passes its D=64, W=0, P=0 pattern;
    with accumulation the update's cost is shared by several micro-batches, so it is no comparison."""
    same_setup = preset == "ratplus-1.5b" and not num_layers and micro_batch == 2 and accum == 1
    same_pattern = mode == "dense" or tuple(sparse_pattern) == (64, 0, 0)
    return ANCHORS.get(mode) if same_setup and same_pattern else None


def print_host_profile(mode, run_step, rows=50):
    """cProfile one step: where the host spends its time. A step is host-bound when the host's time to
    queue it exceeds the GPU's time to run it (the profiler's CUDA total); blocking device-to-host reads
    show up here as time in the call that makes them."""
    import cProfile
    import io
    import pstats

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    run_step()
    profiler.disable()
    queued = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"--- host profile: {mode} step (queued in {queued * 1e3:.1f} ms under cProfile) ---")
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(rows)
        print(text.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="ratplus-1.5b")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--modes", default="dense,joint", help="comma list of dense, sparse, joint")
    ap.add_argument("--num-layers", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--recompute", default=None, choices=[None, "full", "selective"])
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of two steps per mode and where the GPU "
                    "waited for the host (idle time per host phase)")
    ap.add_argument("--host-profile", action="store_true",
                    help="print the host's (Python) costliest functions over one step per mode (cProfile), to "
                         "find what keeps the host from running ahead of the GPU")
    ap.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a run-config override, e.g. train.gradient_accumulation_fusion=false (repeatable)")
    ap.add_argument("--dilated-pointer-loads", action="store_true",
                    help="dilated attention without host TMA descriptors (pointer loads, the pointer single-pass "
                         "W = 0 backward): less host time per launch, a little more GPU time")
    ap.add_argument("--clocks", action="store_true",
                    help="sample the SM clock, power and clock-event reasons (nvidia-smi) over each mode's timed "
                         "steps and print them below the table")
    a = ap.parse_args()
    if a.clocks and not torch.cuda.is_available():
        raise SystemExit("--clocks samples a CUDA GPU through nvidia-smi; this machine has none")

    from megatron_ratplus.model.config import pad_vocab_size
    from megatron_ratplus.parallel import ParallelLayout, destroy_distributed, initialize_distributed
    from megatron_ratplus.training.config import load_config
    from megatron_ratplus.training.metrics import device_peak_tflops
    from megatron_ratplus.training.setup import build_training_objects
    from megatron_ratplus.training import fused_optimizer_update, loop

    if a.profile:
        mark_schedule_phases()
    if a.dilated_pointer_loads:
        use_dilated_pointer_loads()
    info = initialize_distributed(ParallelLayout(a.tp, a.pp, None, a.sp), seed=1234)
    world = info["world_size"]
    dp = world // (a.tp * a.pp)
    overrides = [f"model.preset={a.preset}", f"model.kernel_backend={a.kernel_backend}",
                 f"train.seq_len={a.seq_len}", f"train.micro_batch_size={a.micro_batch}",
                 f"train.global_batch_size={a.micro_batch * a.accum * dp}", "train.max_steps=1000",
                 "train.precision=bf16", f"parallel.tensor_parallel={a.tp}",
                 f"parallel.pipeline_parallel={a.pp}", f"parallel.sequence_parallel={a.sp}",
                 "logging.progress=false"]
    if a.num_layers:
        overrides.append(f"model.num_layers={a.num_layers}")
    if a.recompute:
        overrides.append(f"train.recompute={a.recompute}")
    overrides += a.override
    cfg = load_config(None, overrides)
    args = cfg.model.model_args(vocab_size=a.vocab, seq_len=a.seq_len)
    objs = build_training_objects(cfg, args, 1000)
    if objs.step_graphs is not None and a.warmup <= objs.step_graphs.warmup_steps:
        raise SystemExit(f"--warmup {a.warmup}: with CUDA graphs the first {objs.step_graphs.warmup_steps} steps per "
                         "mode are eager and the next one captures; give --warmup of at least "
                         f"{objs.step_graphs.warmup_steps + 1} so the timed steps are replays")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq_len + 1), generator=gen).to(device)
               for _ in range(a.accum)]
    tokens_per_step = a.micro_batch * a.accum * dp * a.seq_len
    flops_per_token = args.flops_per_token(a.seq_len, pad_vocab_size(args.vocab_size, a.tp))
    peak = device_peak_tflops()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"

    if a.profile:
        mark_update_phases(objs)

    def update(mode):
        """The training loop's own update (loss read inside the optimizer step, non-finite skip)."""
        loss, grad_norm, _ = loop.train_update(objs, batches, mode, a.seq_len)
        grad_norms.append(grad_norm)
        return loss

    rows, grad_norms = [], []   # grad_norms: every update's (pre-clip) norm, to tell whether the timed ones clip
    clock_readings = {}
    for mode in a.modes.split(","):
        passes = ["sparse", "dense"] if mode == "joint" else [mode]
        times, host_times = [], []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sampling = contextlib.ExitStack()
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                grad_norms.clear()       # keep the timed updates' norms only
                if a.clocks:
                    sampler = sampling.enter_context(ClockSampler(nvidia_smi_id(torch.cuda.current_device())))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for p in passes:
                loss = update(p)
            queued = time.perf_counter() - t0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
                host_times.append(queued)
        sampling.close()
        if a.clocks:
            clock_readings[mode] = sampler.reading
        timed_norms = list(grad_norms)     # before the profiled steps below add theirs
        if a.profile and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):   # two steps: the boundary between them is profiled too
                    for p in passes:
                        loss = update(p)
                torch.cuda.synchronize()
            if info["rank"] == 0:
                print(f"--- profile: {mode}, two steps ---")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60,
                                                max_name_column_width=90))
                busy, phases = profiler_intervals(prof.events())
                print(format_idle_table(busy, idle_by_phase(busy, phases)))
        if a.host_profile and info["rank"] == 0:
            print_host_profile(mode, lambda: [update(p) for p in passes])
        med = statistics.median(times)
        tok_s = tokens_per_step / med
        tflops = flops_per_token * tokens_per_step * len(passes) / med / world / 1e12
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
        reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if torch.cuda.is_available() else float("nan")
        anchor = anchor_tokens_per_s(mode, a.preset, a.num_layers, a.micro_batch, a.accum,
                                     (args.dilation, args.local_window, args.initial_tokens))
        clipped = sum(n is not None and n > cfg.train.clip_grad > 0 for n in timed_norms)
        rows.append((mode, med * 1e3, statistics.median(host_times) * 1e3, tok_s / world, tflops,
                     (tflops / peak) if peak else None, mem, reserved, (tok_s / world / anchor) if anchor else None, loss,
                     f"{clipped}/{len(timed_norms)}"))
    if info["rank"] == 0:
        print(f"device: {name} × {world} | preset {a.preset} ({args.num_parameters(pad_vocab_size(args.vocab_size)):,} "
              f"params, {args.num_layers} layers) | micro-batch {a.micro_batch} × {a.accum} | T={a.seq_len} | "
              f"TP={a.tp} PP={a.pp} SP={a.sp} DP={dp} | bf16 | kernels={a.kernel_backend} | "
              f"wgrad fusion={objs.transformer_config.gradient_accumulation_fusion} | "
              f"CUDA graphs={'on' if objs.step_graphs else 'off'} | "
              f"fused optimizer update={'on' if fused_optimizer_update.installed_count(objs.optimizer) else 'off'}"
              + (f" | overrides: {' '.join(a.override)}" if a.override else "")
              + (" | dilated attention: pointer loads" if a.dilated_pointer_loads else ""))
        print("host ms: time to queue the step (the loss is read inside the optimizer step); near the step time, the host limits it")
        print(f"clipped: timed updates whose gradient norm exceeded clip_grad={cfg.train.clip_grad} (they pay the "
              "clipping scale)")
        print("mem GiB: peak allocated during the mode's steps (replayed CUDA graphs allocate nothing, so a mode "
              "replaying graphs captured by an earlier mode shows less); rsrv GiB: peak held by the caching "
              "allocator, graph pools included")
        print(f"{'mode':<7}{'step ms':>10}{'host ms':>9}{'tok/s/GPU':>12}{'TFLOP/s/GPU':>13}{'MFU':>7}{'mem GiB':>9}"
              f"{'rsrv GiB':>10}{'vs anchor':>11}{'loss':>8}{'clipped':>9}")
        for mode, ms, host_ms, tok, tf, mfu, mem, reserved, ratio, loss, clipped in rows:
            print(f"{mode:<7}{ms:>10.1f}{host_ms:>9.1f}{tok:>12,.0f}{tf:>13.1f}{(f'{100 * mfu:.1f}%' if mfu else '-'):>7}"
                  f"{mem:>9.1f}{reserved:>10.1f}{(f'{ratio:.2f}x' if ratio else '-'):>11}{loss:>8.3f}{clipped:>9}")
        for mode, reading in clock_readings.items():
            print(f"clocks over the timed {mode} steps ({reading.samples} samples): {reading.short()}")
    destroy_distributed()


if __name__ == "__main__":
    main()
