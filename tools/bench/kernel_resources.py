"""Registers, spills, shared memory and resident CTAs per SM of the RAT+ Triton kernels, compiled
offline for an H100 (compute capability 9.0; ``--arch 80``: A100) — no GPU needed.

    PYTHONPATH=kernels:. python tools/bench/kernel_resources.py [--kernels recurrence,dilated]
        [--sweep] [--arch 90]             # --kernels optimizer: the fused AdamW update; rmsnorm

For the same compiler as the GPU host, put that Triton first on the path, e.g.
``pip install --target /tmp/triton36 --no-deps triton==3.6.0`` and ``PYTHONPATH=/tmp/triton36:kernels:.``.

Every kernel is compiled through its real host code at the DESIGN.md anchor shape (B=4, T=4096,
16 heads x 128, bf16), so constexprs, launch options and argument specialisations are those of a
GPU launch (see ``ratplus_kernels.offline``). Rows: the default launch configurations (the
recurrence's autotuning candidates; the dilated attention's per-pattern defaults), and with
``--sweep`` every configuration the GPU benchmarks' ``--sweep`` times. A configuration that
spills registers, or fits one CTA per SM, is a candidate to drop before spending GPU time on it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ratplus_kernels.offline import kernel_resources, offline_compilation  # noqa: E402

B, T, H, DH = 4, 4096, 16, 128


def _row(family: str, setting: str, kernel) -> dict:
    r = kernel_resources(kernel)
    return dict(family=family, setting=setting, kernel=r.name.strip("_"), warps=r.num_warps,
                stages=r.num_stages, regs=r.registers, spill=f"{r.spill_stores}/{r.spill_loads}",
                smem_kib=f"{r.shared / 1024:.0f}", ctas=r.ctas_per_sm, note="SPILLS" if r.spills else "")


def recurrence_rows(sweep: bool, arch: int):
    import bench_recurrence as bench
    import ratplus_kernels.recurrence.fused as fm

    g, k, v = (torch.empty(T, B, H, DH, dtype=torch.bfloat16) for _ in range(3))
    # the layer's case: g, k, v are slots of the fused projection, gradients written into slots
    # of its gradient (strided stores: GRADS_LIKE_INPUTS)
    proj, dproj = (torch.empty(T, B, H, 5, DH, dtype=torch.bfloat16) for _ in range(2))
    slot_inputs = tuple(proj[:, :, :, i] for i in (4, 2, 3))
    slot_grads = tuple(dproj[:, :, :, i] for i in (4, 2, 3))

    fwd = [fm._launch_kwargs(c) for c in fm.forward_candidates()]
    bwd = [fm._launch_kwargs(c) for c in fm.backward_candidates()]
    if sweep:
        sweep_fwd, sweep_bwd = bench.sweep_metas(("lookback",))
        fwd += [m for m in sweep_fwd if m not in fwd]
        bwd += [m for m in sweep_bwd if m not in bwd]
    rows = []
    try:
        fm._FORCE_CONFIG["fwd"] = bench._as_meta((16, 64, 2, 4))   # BT=16 fits every backward
        with offline_compilation(arch) as compiled:
            ko, vo, _, _, inc, bt_f = fm._forward(g, k, v, None, None, False)
        for m in fwd:
            fm._FORCE_CONFIG["fwd"] = m
            with offline_compilation(arch) as compiled:
                fm._forward(g, k, v, None, None, False)
            rows.append(_row("recurrence", "fwd " + bench.config_label(m), compiled[0]))
        for m in bwd:
            fm._FORCE_CONFIG["bwd"] = m
            with offline_compilation(arch) as compiled:
                fm._backward(g, k, v, ko, vo, None, None, None, None, inc, bt_f)
            rows.append(_row("recurrence", "bwd " + bench.config_label(m), compiled[0]))
            with offline_compilation(arch) as compiled:
                fm._backward(*slot_inputs, ko, vo, None, None, None, None, inc, bt_f, slot_grads)
            rows.append(_row("recurrence", "bwd into slots " + bench.config_label(m), compiled[0]))
    finally:
        fm._FORCE_CONFIG.update(fwd=None, bwd=None)
    return rows


def dilated_rows(sweep: bool, arch: int):
    import bench_dilated_attention as bench
    import ratplus_kernels.dilated_attention.fused as fm

    q, k, v, do = (torch.empty(T, B, H, DH, dtype=torch.bfloat16) for _ in range(4))
    lse = torch.empty(B, H, T, dtype=torch.float32)
    scale = DH ** -0.5
    base = fm._bwd_config(DH, torch.bfloat16)
    rows = []
    for pattern in bench.PATTERNS:
        name = "D=%d W=%d P=%d" % pattern
        fwd_cfgs = [None] + (bench.FWD_SWEEP if sweep else [])
        for fc in fwd_cfgs:
            with fm.block_config(fwd=fc), offline_compilation(arch) as compiled:
                fm._forward(q, k, v, *pattern, scale)
            rows.append(_row("dilated", f"{name} fwd {fc or 'default'}", compiled[0]))
        if pattern[1] == 0:                    # W = 0 has two backwards (chosen at run time)
            single = base.get("w0") or bench.BWD_SWEEP_VARIANTS["w0"][0]
            single_tma = base.get("w0_tma") or bench.BWD_SWEEP_VARIANTS["w0_tma"][0]
            split = dict(base, **bench._NO_SINGLE_PASS)
            bwd_cfgs = [("default split", split),
                        ("default split dq_w0", dict(split, dq=base.get("dq_w0") or base["dq"])),
                        ("default single pass", dict(split, w0=single)),
                        ("default single pass TMA", dict(split, w0_tma=single_tma))]
        else:
            bwd_cfgs = [("default", base)]
        if sweep:
            bwd_cfgs += [(f"{kind} {c}", {**base, **bench._NO_SINGLE_PASS, kind: c})
                         for kind, cs in bench.BWD_SWEEP_VARIANTS.items() for c in cs]
        for label, bc in bwd_cfgs:
            with fm.block_config(bwd=bc), offline_compilation(arch) as compiled:
                fm._backward(q, k, v, q, lse, do, None, *pattern, scale)
            for kernel in compiled:
                if "global" in kernel.metadata.name:
                    continue                   # the tiny row-copy kernel
                rows.append(_row("dilated", f"{name} bwd {label}", kernel))
    # one row per distinct compiled kernel and setting (the sweep repeats the unchanged ones)
    seen, unique = set(), []
    for r in rows:
        key = (r["setting"].split(" bwd ")[0], r["kernel"], r["warps"], r["stages"], r["regs"],
               r["spill"], r["smem_kib"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def optimizer_rows(sweep: bool, arch: int):
    """The fused AdamW + bf16 weight write (its default block, or every block the GPU sweep timed)."""
    import ratplus_kernels.optimizer.fused as fm

    n = 3 * 8192
    params, grads, moments, squares = ([torch.empty(n)] for _ in range(4))
    steps, low = [torch.zeros(())], [torch.empty(n, dtype=torch.bfloat16)]
    configs = [(fm.BLOCK, fm.NUM_WARPS)]
    if sweep:
        configs += [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8) if (b, w) not in configs]
    default = configs[0]
    rows = []
    try:
        for block, warps in configs:
            fm.BLOCK, fm.NUM_WARPS = block, warps
            fm._TABLES.clear()
            with offline_compilation(arch) as compiled:
                fm.fused_adamw_update(params, grads, moments, squares, steps, low, lr=1e-4, beta1=0.9, beta2=0.95,
                                      eps=1e-8, weight_decay=0.1)
            rows.append(_row("optimizer", f"{block} elements{' (default)' if (block, warps) == default else ''}",
                             compiled[0]))
    finally:
        fm.BLOCK, fm.NUM_WARPS = default
        fm._TABLES.clear()
    return rows


def rmsnorm_rows(sweep: bool, arch: int):
    """The RMSNorm forward and backward (alone, and with the residual branch's gradient) at the
    presets' widths, bf16; with ``--sweep`` also the wider rows and fp32 (the pipelined backward's
    prefetched rows take shared memory)."""
    import ratplus_kernels.rmsnorm.fused as fm

    cases = [(d, torch.bfloat16) for d in (2048, 2560)]
    if sweep:
        cases += [(d, dtype) for d in (4096, fm.MAX_COLUMNS) for dtype in (torch.bfloat16, torch.float32)]
    rows = []
    for d, dtype in cases:
        for residual in (False, True):
            x = torch.empty(64, d, dtype=dtype, requires_grad=True)
            w = torch.empty(d, dtype=dtype, requires_grad=True)
            dy = torch.empty(64, d, dtype=dtype)
            # the autograd functions themselves: the public entry points refuse CPU tensors, and
            # offline compilation launches nothing
            with offline_compilation(arch) as compiled:
                if residual:
                    y, res = fm._FusedRMSNormWithResidual.apply(x, w, 1e-6)
                    torch.autograd.grad((y, res), (x, w), (dy, dy))
                else:
                    torch.autograd.grad(fm._FusedRMSNorm.apply(x, w, 1e-6), (x, w), dy)
            setting = f"d={d} {str(dtype).replace('torch.', '')}{' +residual' if residual else ''}"
            rows += [_row("rmsnorm", setting, kernel) for kernel in compiled]
    return rows


def print_table(rows) -> None:
    cols = ["family", "setting", "kernel", "warps", "stages", "regs", "spill", "smem_kib", "ctas", "note"]
    head = {"spill": "spill st/ld B", "smem_kib": "smem KiB", "ctas": "CTAs/SM"}
    print("| " + " | ".join(head.get(c, c) for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="recurrence,dilated")
    ap.add_argument("--sweep", action="store_true", help="also every configuration the GPU sweeps time")
    ap.add_argument("--arch", type=int, default=90, choices=[80, 90],
                    help="CUDA compute capability x 10 (90: H100/H200, 80: A100)")
    args = ap.parse_args(argv)
    families = {"recurrence": recurrence_rows, "dilated": dilated_rows, "optimizer": optimizer_rows,
                "rmsnorm": rmsnorm_rows}
    unknown = set(args.kernels.split(",")) - set(families)
    if unknown:
        ap.error(f"unknown kernels {sorted(unknown)}; choose from {sorted(families)}")
    print(f"offline compilation for sm_{args.arch} (CTAs/SM from its limits): triton {triton.__version__}, torch {torch.__version__}, "
          f"B={B} T={T} H={H} Dh={DH} bf16")
    rows = []
    for fam in args.kernels.split(","):
        rows += families[fam](args.sweep, args.arch)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
