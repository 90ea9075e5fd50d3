"""Accuracy of Partial FC with uniform vs block negative sampling at the same rate.

    python -m benchmarks.negative_sampling [--num-identities 10000] [--sample-rate 0.1] [--seeds 0,1]
        [--variants uniform,block,block:512] [--ranks 2] [--epochs 2] [--work /tmp/ffc-negsampling]
        [--out benchmarks/results/negative_sampling.json] [--reuse] [-- extra ffc-train options]

Each variant is ``uniform`` (rows drawn uniformly), ``block`` (``--negative-sampling block`` with the
default ``--sample-block``: 64 KiB of centers, 128 rows at fp32 D 128) or ``block:N`` (blocks of N rows).
Each (variant, seed) is one ``ffc-train`` run on the built-in long-tailed synthetic data under the
DeepSpeed launcher (``--ranks`` ranks, one thread each), centers on the device (the draws are the same for
every storage tier). Its ``metrics.json`` gives top-1 / top-5 on held-out images of training identities,
top-1 per frequency bucket (head / medium / tail), TAR@FAR 1e-3 / 1e-4 and Recall@1 on unseen identities.
JSON (every run, and the mean and spread over seeds per variant) to ``--out``, a table on stdout.
``--reuse`` reads the runs already in ``--work`` (e.g. seeds run one invocation at a time) instead of
training them again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ffc_parallel.distributed.init import _free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("top1_seen", "top5_seen", "acc_head", "acc_medium", "acc_tail", "tar_at_far_1e-3", "tar_at_far_1e-4",
           "recall_at_1", "loss_last", "samples_per_s")


def variant_args(variant: str) -> list[str]:
    if variant == "uniform":
        return ["--negative-sampling", "uniform"]
    if variant == "block":
        return ["--negative-sampling", "block"]
    if variant.startswith("block:"):
        return ["--negative-sampling", "block", "--sample-block", variant.split(":", 1)[1]]
    raise ValueError(f"unknown variant {variant!r}")


def run(variant: str, seed: int, a, extra: list[str]) -> dict:
    out_dir = Path(a.work) / f"{variant.replace(':', '_')}_seed{seed}"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(a.ranks), "--master_port", str(_free_port()), "--module",
           "ffc_parallel.cli.train", "--num-identities", str(a.num_identities), "--sample-rate", str(a.sample_rate),
           "--epochs", str(a.epochs), "--seed", str(seed), "--output-dir", str(out_dir), "--log-every", "50",
           *variant_args(variant), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    done = out_dir / "metrics.json"
    if a.reuse and done.exists() and json.loads((out_dir / "options.json").read_text()).get("seed") == seed:
        proc = None   # --reuse: an earlier run of the same variant and seed (its wall time is not known here)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0 if proc is not None else None
    if proc is not None and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"ffc-train failed ({variant}, seed {seed})")
    m = json.loads((out_dir / "metrics.json").read_text())
    row = {"variant": variant, "seed": seed, "wall_s": wall, "command": " ".join(cmd[1:]),
           **{k: m.get(k) for k in METRICS}, "steps": m.get("steps")}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-identities", type=int, default=10000)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default="uniform,block,block:512")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--work", default="/tmp/ffc-negsampling")
    p.add_argument("--out", default=str(RESULTS / "negative_sampling.json"))
    p.add_argument("--reuse", action="store_true", help="read the metrics of runs already in --work")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = [run(v, s, a, extra) for s in seeds for v in a.variants.split(",")]
    summary = {}
    for v in a.variants.split(","):
        mine = [r for r in runs if r["variant"] == v]
        summary[v] = {k: {"mean": statistics.mean(r[k] for r in mine),
                          "spread": (max(r[k] for r in mine) - min(r[k] for r in mine))}
                      for k in METRICS if all(r[k] is not None for r in mine)}
    record = {"benchmark": "negative_sampling", "argv": argv, "extra": extra, "num_identities": a.num_identities,
              "sample_rate": a.sample_rate, "epochs": a.epochs, "ranks": a.ranks, "seeds": seeds,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs, "summary": summary}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    cols = ("top1_seen", "acc_head", "acc_medium", "acc_tail", "tar_at_far_1e-3", "tar_at_far_1e-4", "recall_at_1")
    print(f"\n{'variant':>10} " + " ".join(f"{c:>16}" for c in cols))
    for v, s in summary.items():
        print(f"{v:>10} " + " ".join(f"{100 * s[c]['mean']:>9.1f} ±{100 * s[c]['spread'] / 2:>4.1f}" for c in cols))
    print(f"(mean over seeds {seeds}, ± half the spread, in %); wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
