"""Margin and scale of ffc-train's head on real image sets against a plain softmax script at equal steps.

    python -m benchmarks.margin_defaults --sets /work/data15 [--steps glyphs32=200,digits32=100]
           [--configs arcface:64,arcface:32,...] [--parallel 2] [--out benchmarks/results/margin_defaults.json]

``--sets DIR`` holds the sets written by ``python -m ffc_parallel.data.packaged`` (``DIR/<name>/train``,
``DIR/<name>/test``). For each set, every ``--configs`` entry (``margin:scale``, ffc-train's ``--margin`` and
``--scale``) runs one single-process ``ffc-train`` (``--backbone cnn``, batch 256, ``--no-flip``: a mirrored
character is another class, SGD lr 0.1 with warmup and cosine) for the same steps, and
:mod:`benchmarks.plain_softmax` trains the same backbone with a ``nn.Linear`` softmax head on the same
images. Reports test top-1 (the test images of each set come from another font / other digits) and the first
and last logged loss; ``--parallel`` runs that many at once (one thread each).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIGS = "arcface:64,arcface:32,arcface:16,cosface:64,cosface:32,cosface:16,none:16"
UNSEEN = {"digits32": 0.2}   # 10 classes: verification needs 2 classes kept out of training


def _ffc_train(train, test, margin, scale, steps, unseen, cache, out) -> dict:
    cmd = [sys.executable, "-m", "ffc_parallel.cli.train", "--data", "imagefolder", "--data-path", train,
           "--eval-data-path", test, "--image-size", "32", "--channels", "1", "--backbone", "cnn", "--no-flip",
           "--batch-size", "256", "--max-steps", str(steps), "--margin", margin, "--unseen-fraction", str(unseen),
           "--decode-cache", cache, "--output-dir", out, "--log-every", "10"]
    if scale:
        cmd += ["--scale", str(scale)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = json.loads((Path(out) / "metrics.json").read_text())
    return {k: m.get(k) for k in ("top1_test", "top5_test", "loss_first", "loss_last", "samples_per_s",
                                  "train_seconds", "num_classes")}


def _plain(train, test, steps, unseen, cache) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.plain_softmax", "--data-path", train, "--eval-data-path", test,
           "--steps", str(steps), "--batch-size", "256", "--unseen-fraction", str(unseen), "--decode-cache", cache,
           "--threads", "1"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", required=True)
    p.add_argument("--steps", default="glyphs32=200,digits32=100")
    p.add_argument("--configs", default=CONFIGS)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/margin_defaults.json")
    args = p.parse_args(argv)
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    configs = [c.split(":") for c in args.configs.split(",")]
    jobs = []
    with tempfile.TemporaryDirectory(prefix="ffc_margins_") as tmp:
        for name, n in steps.items():
            train, test = str(Path(args.sets) / name / "train"), str(Path(args.sets) / name / "test")
            cache, unseen = str(Path(args.sets) / "cache"), UNSEEN.get(name, 0.1)
            jobs.append(((name, "plain softmax"), _plain, (train, test, n, unseen, cache)))
            for margin, scale in configs:
                out = str(Path(tmp) / f"{name}_{margin}_{scale}")
                jobs.append(((name, f"{margin} s={scale}"), _ffc_train, (train, test, margin, scale, n, unseen, cache,
                                                                         out)))
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [(key, pool.submit(fn, *a)) for key, fn, a in jobs]
            results = {}
            for (name, label), f in futures:
                r = f.result()
                results.setdefault(name, {})[label] = r
                print(f"{name:10s} {label:16s} top-1 {r['top1_test']:.3f}  loss {r['loss_first']:.2f} -> "
                      f"{r['loss_last']:.2f}", flush=True)
    report = {"command": "python -m benchmarks.margin_defaults " + " ".join(argv or sys.argv[1:]),
              "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), shared with other "
                         f"jobs; {args.parallel} runs at once, one thread each",
              "steps": steps, "batch_size": 256, "backbone": "cnn", "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
