"""Where a step of the head spends its time: torch.profiler over forward + backward, one process.

    python -m benchmarks.profile_head --classes 1e6 --batch 256 --dim 128 [--threads 1] [--steps 2]

Prints the operators sorted by self CPU time (share of the step), the time in matrix products vs
the rest, and the step's wall and CPU time. Run it on a quiet machine: the shares are what matter.
"""
from __future__ import annotations

import argparse
import time


def profile(classes: int, batch: int, dim: int, sample_rate: float, steps: int, memory_budget_mb, chunk_size,
            top: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import ffc_parallel as fp

    head = fp.ShardedClassifier(dim, classes, margin="arcface", sample_rate=sample_rate, chunk_size=chunk_size,
                                **({} if memory_budget_mb is None else {"memory_budget_mb": memory_budget_mb}))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=g, requires_grad=True)
    y = torch.randint(classes, (batch,), generator=g)
    print(f"chunk plan: {head._plan(batch, classes)}")

    def step():
        head.weight.grad, x.grad = None, None
        head(x, y).backward()

    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"step: {wall:.3f} s wall, {cpu:.3f} s CPU; profiled self time {total / 1e6 / steps:.3f} s/step, "
          f"matrix products {gemm / total:.1%}")
    print(f"{'operator':<36}{'share':>8}{'s/step':>10}{'calls/step':>12}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"{e.key:<36}{e.self_cpu_time_total / total:>8.1%}{e.self_cpu_time_total / 1e6 / steps:>10.3f}"
              f"{e.count / steps:>12.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=float, default=1e6)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-budget-mb", type=float, default=None)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    profile(int(args.classes), args.batch, args.dim, args.sample_rate, args.steps, args.memory_budget_mb,
            args.chunk_size, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
