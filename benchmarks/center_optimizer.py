"""Step time of the centers' optimizer: torch's fused kernel vs the unfused row-sparse path.

    python -m benchmarks.center_optimizer --classes 1e6 --dim 128 [--threads 1] [--steps 5] [--device cpu]

For each optimizer (SGD with momentum, AdamW) and center dtype, times ``ShardedCenterOptimizer.step``
through torch's fused kernel and with ``fused=False`` (the unfused path, the baseline): over every row
(full softmax) and over a random 10% of the rows (Partial FC: rows gathered, grouped by step count).
Median of ``--steps`` steps after one warm-up. JSON to ``--out`` (default
``benchmarks/results/center_optimizer_<device>.json``), a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OPTIMIZERS = {"sgd_momentum": dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
              "adamw": dict(kind="adamw", lr=1e-3, weight_decay=0.05)}


def time_steps(classes: int, dim: int, dtype, kwargs: dict, fused: bool, rows_fraction: float | None,
               steps: int, device: str) -> float:
    """Median seconds of one ``step`` (gradient refilled outside the timed region)."""
    import torch

    from ffc_parallel.optim import ShardedCenterOptimizer

    weight = torch.nn.Parameter(torch.randn(classes, dim, device=device).to(dtype))
    opt = ShardedCenterOptimizer(weight, fused=fused, **kwargs)
    grad = torch.randn(classes, dim, device=device).to(dtype)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        rows = None
        if rows_fraction is not None:
            rows = torch.randperm(classes, generator=g)[: int(rows_fraction * classes)].sort().values.to(device)
        weight.grad = grad.clone()          # the fused step scales the gradient in place
        sync(device)
        start = time.perf_counter()
        opt.step(rows, grad_scale=0.5)
        sync(device)
        if step:
            times.append(time.perf_counter() - start)
    assert opt.fused_steps == (steps + 1 if fused else 0), opt.fused_steps
    return statistics.median(times)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=float, default=1e6)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from benchmarks.head_bench import machine, source_state
    from ffc_parallel.optim.center_optimizer import _fused_kernel_exists

    torch.set_num_threads(args.threads)
    classes = int(args.classes)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows = []
    for dtype_name in args.dtypes:
        for name, kwargs in OPTIMIZERS.items():
            m = {label: time_steps(classes, args.dim, dtypes[dtype_name], kwargs, fused, fraction, args.steps,
                                   args.device)
                 for label, fused, fraction in (("fused_s", True, None), ("unfused_s", False, None),
                                                ("partial_fc_10pct_fused_s", True, 0.1),
                                                ("partial_fc_10pct_unfused_s", False, 0.1))}
            rows.append(dict(optimizer=name, dtype=dtype_name, **m, unfused_over_fused=m["unfused_s"] / m["fused_s"],
                             partial_fc_unfused_over_fused=m["partial_fc_10pct_unfused_s"] / m["partial_fc_10pct_fused_s"]))
            print(f"{name:>13} {dtype_name}: all rows fused {m['fused_s']:.3f} s, unfused {m['unfused_s']:.3f} s "
                  f"({rows[-1]['unfused_over_fused']:.2f}x); 10% of rows fused {m['partial_fc_10pct_fused_s']:.3f} s, "
                  f"unfused {m['partial_fc_10pct_unfused_s']:.3f} s ({rows[-1]['partial_fc_unfused_over_fused']:.2f}x)",
                  flush=True)
    report = {"command": "python -m benchmarks.center_optimizer " + " ".join(sys.argv[1:] if argv is None else argv),
              "classes": classes, "dim": args.dim, "threads": args.threads, "device": args.device,
              "fused_kernel": _fused_kernel_exists(args.device, torch.float32), "machine": machine(),
              "source": source_state(), "results": rows}
    out = Path(args.out) if args.out else RESULTS / f"center_optimizer_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
