"""Where an ffc-train step on image files spends its time, phase by phase, on 2 ranks (gloo, one thread each).

    python -m benchmarks.image_step_profile --data-path SET/train [--backbones cnn,resnet] [--steps 30]
           [--batch-size 128] [--out benchmarks/results/image_step_profile.json]

Each rank builds what ffc-train builds (``build_data`` with the decode cache, the backbone, the sharded
ArcFace head, ``fp.initialize`` with ffc-train's DeepSpeed config) and times, per step: reading a batch
from the decode cache (with the random flip), decoding the same 128 image files instead (what a step
paid before the cache, ``--decode-cache none``), the backbone's forward, the head's forward (the
all-gather of the embeddings and the fused margin softmax over the rank's classes), the backward
(backbone and head, the embedding gradients' reduce-scatter, DeepSpeed's gradient all-reduce), the
optimizer step (DeepSpeed's and the centers') and ffc-train's per-step bookkeeping (the detached loss).
Host-to-device copies are zero on CPU. Reports rank 0's median milliseconds per phase and its share.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def rank_profile(data_path: str, backbone: str, steps: int, batch_size: int, cache: str) -> dict:
    """One rank's phase times (ms per step, medians over ``steps`` after 3 warm-up steps)."""
    import torch

    import ffc_parallel as fp
    from ffc_parallel.cli.train import TrainOptions, deepspeed_config
    from ffc_parallel.data import ImageFolder, build_data
    from ffc_parallel.data.augment import random_flip
    from ffc_parallel.models import build_backbone

    torch.set_num_threads(1)
    info = fp.init_distributed()
    bundle = build_data("imagefolder", path=data_path, image_size=32, channels=1, decode_cache=cache)
    files = ImageFolder(data_path, 32, 1)
    source = random_flip(bundle.train, 0)
    net = build_backbone(backbone, bundle.input_shape, 128)
    head = fp.ShardedClassifier(128, bundle.num_classes, margin="arcface")
    model = fp.HybridModel(net, head)
    opts = TrainOptions(batch_size=batch_size, backbone=backbone)
    engine, _, _, _ = fp.initialize(model=model, config=deepspeed_config(opts, steps + 3))
    rng = np.random.default_rng(info.rank)
    phases = {k: [] for k in ("read decoded batch", "decode image files instead", "backbone forward",
                              "head forward (all-gather, margin softmax)", "backward (both, collectives)",
                              "optimizer step", "bookkeeping")}
    losses = []
    for step in range(steps + 3):
        idx = rng.integers(0, len(source), batch_size)
        t = [time.perf_counter()]
        x, y = source.batch(idx)
        t.append(time.perf_counter())
        torch.stack([files[int(i)][0] for i in idx[: batch_size]])
        t.append(time.perf_counter())
        emb = net(x)
        t.append(time.perf_counter())
        loss = head(emb, y)
        t.append(time.perf_counter())
        engine.backward(loss)
        t.append(time.perf_counter())
        engine.step()
        t.append(time.perf_counter())
        losses.append(loss.detach())
        t.append(time.perf_counter())
        if step >= 3:
            for k, a, b in zip(phases, t, t[1:]):
                phases[k].append((b - a) * 1e3)
    return {k: float(np.median(v)) for k, v in phases.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--backbones", default="cnn,resnet")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache", default=None, help="decode cache directory (default: next to --data-path)")
    p.add_argument("--out", default="benchmarks/results/image_step_profile.json")
    args = p.parse_args(argv)
    from ffc_parallel.testing import run_ranks

    cache = args.cache or str(Path(args.data_path).parent.parent / "cache")
    results = {}
    for backbone in args.backbones.split(","):
        ranks = run_ranks("benchmarks.image_step_profile:rank_profile", world_size=2, timeout=900,
                          kwargs=dict(data_path=args.data_path, backbone=backbone, steps=args.steps,
                                      batch_size=args.batch_size, cache=cache))
        ms = ranks[0]
        step = sum(v for k, v in ms.items() if k != "decode image files instead")
        results[backbone] = {"ms": ms, "step_ms_with_cache": step,
                             "share_of_step": {k: v / step for k, v in ms.items()}}
        print(backbone, f"step {step:.1f} ms:", ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
    report = {"command": "python -m benchmarks.image_step_profile " + " ".join(argv or sys.argv[1:]),
              "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), shared with other "
                         "agents' jobs", "batch_per_rank": args.batch_size, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
