"""Million-way instance classification, small: self-supervised features on shifted digits, evaluated by kNN.

    .venv/bin/python benchmarks/instance_knn.py                       # one process, ~10 min on 2 busy cores
    torchrun --nproc_per_node 2 benchmarks/instance_knn.py            # same run, head sharded over 2 ranks

Data: scikit-learn's built-in digits (no download), 8x8 images placed at a random position of a
12x12 canvas. 1,437 training images (labels NOT used for training: each image is its own class),
360 held-out labelled images for evaluation. A view of an image = the digit at a fresh random
position plus pixel noise, so instance classification has to learn features that ignore position.

Training: MLP backbone (BatchNorm) + :func:`ffc_parallel.instance_classifier` (one class per image,
cosine softmax with temperature 0.15, sharded over the ranks), the contrastive prior before the first
epoch, hardest-class label smoothing (K neighbours, alpha) refreshed every epoch, SGD. Evaluation:
weighted kNN (k=20) and a linear probe on frozen features, labels of the training images used for
the first time here; the randomly initialised backbone is the baseline. Writes
``benchmarks/results/instance_knn.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ffc_parallel as fp
from ffc_parallel.data.digits import load_digits_tensors
from ffc_parallel.algorithms.instance import HardestClassSmoothing, contrastive_prior, instance_classifier
from ffc_parallel.evaluation import knn_accuracy, linear_probe_accuracy

ROOT = Path(__file__).resolve().parent.parent
CANVAS, DIGIT = 12, 8


def place(digits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``digits[n, 8, 8]`` pasted at ``offsets[n, 2]`` on a ``[n, 12, 12]`` canvas of -1 (background)."""
    out = torch.full((digits.shape[0], CANVAS, CANVAS), -1.0)
    for i, (r, c) in enumerate(offsets.tolist()):
        out[i, r: r + DIGIT, c: c + DIGIT] = digits[i]
    return out.flatten(1)


def random_view(digits: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    offsets = torch.randint(CANVAS - DIGIT + 1, (digits.shape[0], 2), generator=generator)
    view = place(digits, offsets)
    return view + noise * torch.randn(view.shape, generator=generator)


def backbone(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(CANVAS * CANVAS, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


@torch.no_grad()
def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    out = F.normalize(net(x), dim=1)
    net.train()
    return out


def evaluate(net, train_x, train_y, test_x, test_y) -> dict:
    a, b = features(net, train_x), features(net, test_x)
    return {"knn_top1": knn_accuracy(a, train_y, b, test_y, k=20), "linear_probe_top1": linear_probe_accuracy(a, train_y, b, test_y)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.15)
    parser.add_argument("--neighbours", type=int, default=5, help="K of hardest-class smoothing (0: off)")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--no-prior", action="store_true", help="skip the contrastive prior")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instance_knn.json"))
    args = parser.parse_args(argv)

    info = fp.init_distributed(verbose=False)
    rank, world = info.rank, info.world_size
    images, labels = load_digits_tensors()
    digits = images[:, 0]
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(digits.shape[0], generator=g)
    train_idx, test_idx = order[:1437], order[1437:]
    train_digits = digits[train_idx]
    num_images = train_digits.shape[0]
    fixed = torch.Generator().manual_seed(args.seed + 1)        # one fixed placement per image, for evaluation
    bank_x, bank_y = random_view(train_digits, fixed, 0.0), labels[train_idx]
    test_x, test_y = random_view(digits[test_idx], fixed, 0.0), labels[test_idx]

    net = backbone(args.dim, args.seed)
    results = {"config": vars(args) | {"world_size": world, "num_images": num_images}, "random_init": evaluate(net, bank_x, bank_y, test_x, test_y)}
    head = instance_classifier(num_images, args.dim, args.temperature, seed=args.seed)
    start = time.perf_counter()
    if not args.no_prior:
        # each rank embeds its share of the images (one view each), rows land on their owners
        mine = torch.arange(rank, num_images, world)
        batches = [(bank_x[mine[i: i + 256]], mine[i: i + 256]) for i in range(0, mine.numel(), 256)]
        contrastive_prior(net, batches, head, progress=False)
    smoothing = HardestClassSmoothing(head, k=args.neighbours, alpha=args.alpha) if args.neighbours else None
    opt = torch.optim.SGD([{"params": net.parameters()}, {"params": head.parameters(), "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = num_images // args.batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    local = args.batch_size // world
    history = []
    for epoch in range(args.epochs):
        if smoothing is not None:
            smoothing.maybe_refresh(epoch)
        perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            ids = perm[step * args.batch_size: (step + 1) * args.batch_size][rank * local: (rank + 1) * local]
            view_gen = torch.Generator().manual_seed((args.seed * 1000 + epoch) * 10_000 + step * 64 + rank)
            x = random_view(train_digits[ids], view_gen, args.noise)
            soft = smoothing.soft_targets(ids) if smoothing is not None else None
            loss = head(net(x), ids, soft_targets=soft)
            opt.zero_grad()
            loss.backward()
            if world > 1:                              # the backbone's gradient is the SUM over ranks
                for p in net.parameters():
                    torch.distributed.all_reduce(p.grad)
            opt.step()
            schedule.step()
            epoch_loss += float(loss.detach())
        history.append(epoch_loss / steps_per_epoch)
        if rank == 0 and (epoch % 10 == 9 or epoch == args.epochs - 1):
            print(f"epoch {epoch + 1}/{args.epochs} loss {history[-1]:.3f}", flush=True)
    results["train_seconds"] = time.perf_counter() - start
    results["loss_per_epoch"] = history
    results["learned"] = evaluate(net, bank_x, bank_y, test_x, test_y)
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps({k: results[k] for k in ("random_init", "learned", "train_seconds")}, indent=2))
    return results


if __name__ == "__main__":
    main()
    fp.exit_distributed(0)
