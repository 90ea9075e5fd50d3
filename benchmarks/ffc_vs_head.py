"""FFC's class pool vs the class-sharded head as the number of identities grows (one process, CPU).

    .venv/bin/python benchmarks/ffc_vs_head.py                 # ~5-10 min on 2 CPU cores
    .venv/bin/python benchmarks/ffc_vs_head.py --identities 1e5 1e6 --head-run-limit 1e5   # quick

Each measurement runs in a FRESH process (peak RSS is per process) and times the classification part
of a training step only: the embeddings ``[B, D]`` are given (no backbone), so the numbers isolate what
grows with the identities.

* head: :class:`ffc_parallel.ShardedClassifier` (ArcFace, full softmax) + SGD with momentum: forward,
  backward, optimizer step. State: weight, gradient and momentum, ``3 * N * D * 4`` bytes.
* ffc: :func:`ffc_parallel.algorithms.ffc.pool_loss` forward and backward against a :class:`ClassPool`
  of ``pool_size`` slots, then :meth:`ClassPool.update` with the batch's gallery features; labels
  drawn from ``[0, N)``. State: ``pool_size * (D * 4 + 16)`` bytes, whatever N.

Head sizes above ``--head-run-limit`` are NOT run (they do not fit this shared machine): their memory
is the formula above plus the measured fixed overhead, their step time the measured time per class
times N; such rows say ``"measured": false``. Writes ``benchmarks/results/ffc_vs_head.json`` and the
table between the markers in ``docs/benchmarks_ffc.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- ffc_vs_head:begin -->", "<!-- ffc_vs_head:end -->"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(kind: str, identities: int, batch: int, dim: int, pool_size: int, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    import ffc_parallel as fp
    from ffc_parallel.algorithms.ffc import ClassPool, pool_loss

    torch.manual_seed(0)
    base = _peak_rss_mb()
    g = torch.Generator().manual_seed(1)
    if kind == "idle":
        return {"peak_rss_mb": base}
    if kind == "head":
        head = fp.ShardedClassifier(dim, identities, margin="arcface")
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)

        def step():
            x = torch.randn(batch, dim, generator=g, requires_grad=True)
            loss = head(x, torch.randint(identities, (batch,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        pool = ClassPool(pool_size, dim)
        margin = fp.heads.resolve_margin("arcface", 32.0)
        filled = torch.randint(identities, (pool_size,), generator=g).unique()   # no [N]-sized tensor
        pool.update(F.normalize(torch.randn(filled.numel(), dim, generator=g), dim=1), filled)

        def step():
            x = torch.randn(batch, dim, generator=g, requires_grad=True)
            labels = torch.randint(identities, (batch,), generator=g)
            loss, _ = pool_loss(F.normalize(x, dim=1), pool.lookup(labels), pool, margin, topk=5)
            loss.backward()
            pool.update(F.normalize(torch.randn(batch, dim, generator=g), dim=1), labels)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"step_s": (time.perf_counter() - start) / steps, "peak_rss_mb": _peak_rss_mb()}


def _run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--pool-size", type=int, default=30_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--head-run-limit", type=float, default=1e6, help="largest head actually run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ffc_vs_head.json"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--child", nargs=6)
    args = parser.parse_args(argv)
    if args.child:
        kind, n, b, d, p, s = args.child
        print(json.dumps(child(kind, int(n), int(b), int(d), int(p), int(s))))
        return {}

    import torch

    idle = _run_child("idle", 0, 0, 0, 0, 0)["peak_rss_mb"]
    rows, per_class_s, overhead_mb = [], None, None
    for n in sorted(int(v) for v in args.identities):
        ffc = _run_child("ffc", n, args.batch, args.dim, args.pool_size, args.steps)
        state_mb = 3 * n * args.dim * 4 / 2**20
        if n <= args.head_run_limit:
            head = _run_child("head", n, args.batch, args.dim, args.pool_size, args.steps)
            head["measured"] = True
            per_class_s = head["step_s"] / n
            overhead_mb = head["peak_rss_mb"] - idle - state_mb
        else:
            head = {"measured": False, "step_s": per_class_s * n if per_class_s else None,
                    "peak_rss_mb": idle + state_mb + (overhead_mb or 0.0)}
        rows.append({"identities": n, "head": head, "ffc": ffc,
                     "head_state_mb_formula": state_mb,
                     "ffc_state_mb_formula": args.pool_size * (args.dim * 4 + 16) / 2**20,
                     "step_time_ratio_head_over_ffc": head["step_s"] / ffc["step_s"] if head["step_s"] else None,
                     "memory_ratio_head_over_ffc": (head["peak_rss_mb"] - idle) / max(ffc["peak_rss_mb"] - idle, 1e-9)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "out", "no_docs")},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "idle_rss_mb": idle, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        _write_table(result)
    return result


def _write_table(result: dict) -> None:
    c = result["config"]
    lines = [f"B = {c['batch']}, D = {c['dim']}, pool = {c['pool_size']:,} slots, {result['threads']} threads, "
             f"idle process {result['idle_rss_mb']:.0f} MB RSS (subtracted below).", "",
             "| identities | head step (s) | head memory (MB) | FFC step (s) | FFC memory (MB) | step ratio head/FFC | memory ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        h, f, idle = r["head"], r["ffc"], result["idle_rss_mb"]
        mark = "" if h["measured"] else " (formula)"
        lines.append(f"| {r['identities']:.0e} | {h['step_s']:.3f}{mark} | {h['peak_rss_mb'] - idle:,.0f}{mark} | "
                     f"{f['step_s']:.3f} | {f['peak_rss_mb'] - idle:,.0f} | {r['step_time_ratio_head_over_ffc']:.1f} | "
                     f"{r['memory_ratio_head_over_ffc']:.1f} |")
    doc = ROOT / "docs" / "benchmarks_ffc.md"
    text = doc.read_text()
    table = BEGIN + "\n" + "\n".join(lines) + "\n" + END
    doc.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S))


if __name__ == "__main__":
    main()
