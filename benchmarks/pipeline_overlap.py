"""How much of the head's embedding all-gather / reduce-scatter the pipelining hides.

    python -m benchmarks.pipeline_overlap --world 2 --classes-per-rank 200000 --batch-per-rank 256 \
        --dim 512 --pieces 1 2 4 --out benchmarks/results/pipeline_overlap.json

For each number of gather pieces, every rank runs a few forward+backward steps of
``fp.ShardedClassifier`` (gloo on CPU, nccl on GPU) and reports the median step time and the time
spent blocked on the embedding collectives (``head.comm_stats``). With one piece every collective is
waited for at once, so its blocked time is the whole communication time: the hidden share with P
pieces is ``1 - exposed(P) / exposed(1)``, measured in the same run. Results go to JSON (rank 0's
numbers plus the slowest rank's step time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def rank_body(classes_per_rank, batch_per_rank, dim, pieces, steps):
    import torch

    import ffc_parallel as fp

    world = fp.get_world_size()
    out = []
    for p in pieces:
        head = fp.ShardedClassifier(dim, classes_per_rank * world, margin="arcface", gather_pieces=p)
        g = torch.Generator().manual_seed(fp.get_rank())
        x = torch.randn(batch_per_rank, dim, generator=g, requires_grad=True)
        y = torch.randint(classes_per_rank * world, (batch_per_rank,), generator=g)
        times, fwd, bwd = [], [], []
        for step in range(steps + 1):
            start = time.perf_counter()
            head(x, y).backward()
            if step:  # the first step warms up
                times.append(time.perf_counter() - start)
                fwd.append(head.comm_stats["forward"])
                bwd.append(head.comm_stats["backward"])
            head.weight.grad, x.grad = None, None
        median = lambda rows, key: statistics.median(r[key] for r in rows)
        out.append({"pieces": p, "step_s": statistics.median(times),
                    "forward": {k: median(fwd, k) for k in fwd[0]},
                    "backward": {k: median(bwd, k) for k in bwd[0]}})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--classes-per-rank", type=int, default=200_000)
    parser.add_argument("--batch-per-rank", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/pipeline_overlap.json")
    args = parser.parse_args(argv)
    from ffc_parallel.testing import run_ranks

    per_rank = run_ranks("benchmarks.pipeline_overlap:rank_body", args.world, timeout=3600, kwargs=dict(
        classes_per_rank=args.classes_per_rank, batch_per_rank=args.batch_per_rank, dim=args.dim,
        pieces=args.pieces, steps=args.steps))
    records = []
    exposed = lambda rec: rec["forward"]["exposed_s"] + rec["backward"]["exposed_s"]
    baseline = next((exposed(r) for r in per_rank[0] if r["pieces"] == 1), None)
    for i, rec in enumerate(per_rank[0]):
        rec = dict(rec, slowest_rank_step_s=max(r[i]["step_s"] for r in per_rank))
        if baseline:
            rec["hidden_fraction"] = max(0.0, 1.0 - exposed(rec) / baseline)
        records.append(rec)
        print(f"pieces={rec['pieces']}: step {rec['step_s']:.3f} s, exposed communication "
              f"{exposed(rec) * 1e3:.1f} ms (forward {rec['forward']['exposed_s'] * 1e3:.1f}, backward "
              f"{rec['backward']['exposed_s'] * 1e3:.1f})"
              + (f", {rec['hidden_fraction']:.0%} of the one-piece communication hidden" if baseline else ""))
    result = {"config": vars(args), "records": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
