"""ffc-train on 2 ranks against the plain single-process softmax script: same images, backbone, steps and global
batch; samples/s and test top-1 of both, measured alternately in one run.

    python -m benchmarks.ffc_vs_plain --sets /work/data15 --set glyphs32 [--steps 400] [--repeats 1]
           [--backbone cnn] [--out benchmarks/results/ffc_vs_plain.json]

``ffc-train``: ``deepspeed --num_gpus 2 --module ffc_parallel.cli.train --data imagefolder --data-path
SET/train --eval-data-path SET/test --backbone cnn --no-flip --batch-size 128`` (128 per rank, 256 in all),
``OMP_NUM_THREADS=1`` per rank, its defaults otherwise (margin, scale, decode cache). The plain script
(:mod:`benchmarks.plain_softmax`): one process with both cores' threads, batch 256, an ``nn.Linear`` softmax
head. Both get the images decoded before the clock starts (ffc-train: its decode cache, built by a first
untimed pass). Samples/s is each run's steps x 256 / training seconds; accuracy is top-1 on ``SET/test``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from ffc_parallel.distributed.init import _free_port


def ffc_train(train, test, steps, backbone, cache, out, extra=()) -> dict:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "ffc_parallel.cli.train",
           "--data", "imagefolder", "--data-path", train, "--eval-data-path", test, "--image-size", "32",
           "--channels", "1", "--backbone", backbone, "--no-flip", "--batch-size", "128", "--max-steps", str(steps),
           "--decode-cache", cache, "--output-dir", out, *extra]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    m = json.loads((Path(out) / "metrics.json").read_text())
    return {"script": "ffc-train, 2 ranks", "command": " ".join(cmd[1:]), "steps": m["steps"],
            "train_seconds": m["train_seconds"], "samples_per_s": m["steps"] * 256 / m["train_seconds"],
            "top1_test": m["top1_test"], "top5_test": m["top5_test"], "test_images": m["test_images"],
            "loss_first": m["loss_first"], "loss_last": m["loss_last"]}


def plain(train, test, steps, backbone, cache) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.plain_softmax", "--data-path", train, "--eval-data-path", test,
           "--steps", str(steps), "--batch-size", "256", "--backbone", backbone, "--decode-cache", cache,
           "--threads", str(min(2, os.cpu_count() or 1))]
    proc = subprocess.run(cmd, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", required=True)
    p.add_argument("--set", default="glyphs32")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--backbone", default="cnn")
    p.add_argument("--out", default="benchmarks/results/ffc_vs_plain.json")
    args = p.parse_args(argv)
    train, test = str(Path(args.sets) / args.set / "train"), str(Path(args.sets) / args.set / "test")
    cache = str(Path(args.sets) / "cache")
    runs = []
    with tempfile.TemporaryDirectory(prefix="ffc_vs_plain_") as tmp:
        for r in range(args.repeats):   # alternate the order: a load change on the shared machine hits both
            order = [("ffc", "plain"), ("plain", "ffc")][r % 2]
            for which in order:
                result = (ffc_train(train, test, args.steps, args.backbone, cache, str(Path(tmp) / f"run{r}"))
                          if which == "ffc" else plain(train, test, args.steps, args.backbone, cache))
                runs.append({"repeat": r, **result})
                print(f"{result['script']:20s} {result['samples_per_s']:7.0f} samples/s  {result['train_seconds']:6.0f} s"
                      f"  top-1 {result['top1_test']:.3f}", flush=True)
    ratios = []
    for r in range(args.repeats):
        f, q = [next(x for x in runs if x["repeat"] == r and x["script"].startswith(s)) for s in ("ffc", "plain")]
        ratios.append({"repeat": r, "samples_per_s_ratio": f["samples_per_s"] / q["samples_per_s"],
                       "top1_ffc_minus_plain": f["top1_test"] - q["top1_test"]})
    report = {"command": "python -m benchmarks.ffc_vs_plain " + " ".join(argv or sys.argv[1:]),
              "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), shared with other "
                         "agents' jobs: timings are noisy",
              "set": args.set, "steps": args.steps, "global_batch": 256, "backbone": args.backbone,
              "runs": runs, "ratios": ratios}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
