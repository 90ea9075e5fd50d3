"""The simplest script a user could write instead of ffc-train: one process, the images decoded once into one
tensor, a backbone with an ordinary linear softmax head (``nn.Linear`` + cross-entropy), SGD with ffc-train's
warmup + cosine schedule; top-1 on a test ImageFolder in eval mode.

    python -m benchmarks.plain_softmax --data-path OUT/train --eval-data-path OUT/test [--backbone cnn]
           [--steps 800] [--batch-size 256] [--image-size 32] [--lr 0.1] [--out FILE]

The training and test images are those ffc-train trains and evaluates on with the same ``--unseen-fraction``
and seed (``ffc_parallel.data.build_data``: the same classes held out, the same held-out images), so the
two are compared on exactly the same data. Prints and writes (``--out``) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn


def plain_run(data_path, eval_data_path, *, backbone="cnn", steps=800, batch_size=256, image_size=32,
              channels=1, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_steps=50, embedding_dim=128,
              unseen_fraction=0.1, decode_cache=None, seed=0) -> dict:
    """Train and test as described in the module docstring; returns samples/s, wall time and test top-1."""
    from ffc_parallel.data import build_data
    from ffc_parallel.models import build_backbone

    torch.manual_seed(seed)
    bundle = build_data("imagefolder", path=data_path, eval_path=eval_data_path, image_size=image_size,
                        channels=channels, unseen_fraction=unseen_fraction, decode_cache=decode_cache, seed=seed)
    n = len(bundle.train)
    x, y = (bundle.train.batch(np.arange(n)) if hasattr(bundle.train, "batch") else
            (torch.stack([bundle.train[i][0] for i in range(n)]), torch.as_tensor(bundle.train.labels)))
    model = nn.Sequential(build_backbone(backbone, bundle.input_shape, embedding_dim),
                          nn.Linear(embedding_dim, bundle.num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def lr_at(step):   # ffc-train's WarmupCosineLR: linear warmup, cosine to 1% of the peak
        if step < warmup_steps:
            return lr * step / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(seed)
    perm, pos, losses = torch.randperm(n, generator=g), 0, []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos: pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        tx, ty = bundle.test
        pred = torch.cat([model(tx[i: i + 512]).argmax(1) for i in range(0, len(tx), 512)])
    return {"script": "plain softmax", "backbone": backbone, "steps": steps, "batch_size": batch_size,
            "train_seconds": wall, "samples_per_s": steps * batch_size / wall,
            "top1_test": float((pred == ty).float().mean()), "test_images": len(ty),
            "num_classes": bundle.num_classes, "loss_first": float(np.mean(losses[:10])),
            "loss_last": float(np.mean(losses[-10:]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--eval-data-path", required=True)
    p.add_argument("--backbone", default="cnn")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--unseen-fraction", type=float, default=0.1)
    p.add_argument("--decode-cache", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = plain_run(args.data_path, args.eval_data_path, backbone=args.backbone, steps=args.steps,
                       batch_size=args.batch_size, image_size=args.image_size, lr=args.lr,
                       unseen_fraction=args.unseen_fraction, decode_cache=args.decode_cache)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
