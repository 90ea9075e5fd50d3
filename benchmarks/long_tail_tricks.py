"""Long-tail tricks on the built-in synthetic long-tailed data: tail / medium / head accuracy.

    .venv/bin/python benchmarks/long_tail_tricks.py          # 10 to 14 min on 2 busy CPU cores

Trains a small backbone + :class:`ffc_parallel.ShardedClassifier` (cosine softmax, s=16) once per trick
and training seed on :class:`ffc_parallel.data.SyntheticLongTail` (100 identities, 5 to 250 training samples
each, Zipf exponent 0.7: 62 tail classes with < 20 samples, 28 medium, 10 head with > 100), and
reports top-1 accuracy on 10 held-out samples of EVERY class (a balanced test set, as in long-tail
benchmarks), split by the class's training frequency. Two parts: every trick on feature vectors
(MLP, fast), and the CAM-based tricks with their references on 16x16 images (CNN ending in a
global-average-pooled feature map). Every trick gets the same number of optimizer steps per epoch
(the size of the original training set), so samplers that change the epoch size (over-/under-
sampling, CAM balancing) do not change the compute. Writes ``benchmarks/results/long_tail_tricks.json``
and the tables between the markers in ``docs/long_tail.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ffc_parallel as fp
from ffc_parallel.algorithms.cam import CamBalancer, fetch_class_centers
from ffc_parallel.algorithms.mixup import Mixup
from ffc_parallel.data.samplers import (ClassProbabilitySampler, InstanceBalancedSampler, RandomOverSampler,
                                        RandomUnderSampler)
from ffc_parallel.data.sources import frequency_buckets
from ffc_parallel.data.synthetic import SyntheticLongTail
from ffc_parallel.losses import ShardedSigmoidFocal, cb_weights, configure_reweighting, shard_class_counts

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- long_tail_tricks:begin -->", "<!-- long_tail_tricks:end -->"


@dataclass(frozen=True)
class Trick:
    name: str
    reweight: str = "ce"              # fp.losses.REWEIGHTING, or "sigmoid_focal"
    sampler: str = "instance"         # instance, class_balanced, sqrt, progressive, over, under
    mixup: str | None = None          # None, "input", "manifold"
    mixup_stop: int | None = None     # epoch from which mixup is off (fine-tuning after mixup)
    drs: str | None = None            # deferred re-sampling at the switch epoch: "class_balanced" or "cam"
    drw: bool = False                 # deferred re-weighting (CB weights) at the switch epoch
    lr: float = 0.1                   # peak learning rate


def tricks(kind: str, switch: int) -> list[Trick]:
    """The tricks run on ``kind`` data: every trick on vectors; on images (slower) the CAM ones and
    their references."""
    mix_then = f"input mixup, then from epoch {switch} no mixup (fine-tuning) and"
    if kind == "image":
        return [
            Trick("baseline (CE, instance sampling)"),
            Trick(f"input mixup + fine-tuning without mixup from epoch {switch}", mixup="input", mixup_stop=switch),
            Trick(f"DRS (class-balanced from epoch {switch})", drs="class_balanced"),
            Trick(f"CAM-based DRS (CAM-balanced set from epoch {switch})", drs="cam"),
            Trick(f"the paper's best combination: {mix_then} CAM-based DRS", mixup="input", mixup_stop=switch,
              drs="cam"),
        ]
    return [
        Trick("baseline (CE, instance sampling)"),
        Trick("CS_CE (γ=1)", reweight="cs_ce"),
        Trick("CB_CE (β=0.999)", reweight="cb_ce"),
        Trick("softmax focal (γ=2)", reweight="focal"),
        Trick("CB_Focal (β=0.999, γ=2)", reweight="cb_focal"),
        # A sum of C per-class terms per sample: lr 0.1 diverges (dense BCE too); 0.01 trains.
        Trick("sigmoid focal (γ=2, prior π=0.01, lr 0.01)", reweight="sigmoid_focal", lr=0.01),
        Trick("class-balanced sampling", sampler="class_balanced"),
        Trick("square-root sampling", sampler="sqrt"),
        Trick("progressively balanced sampling", sampler="progressive"),
        Trick("random over-sampling", sampler="over"),
        Trick("random under-sampling", sampler="under"),
        Trick("input mixup (α=1)", mixup="input"),
        Trick("manifold mixup (α=1, after block1)", mixup="manifold"),
        Trick(f"input mixup + fine-tuning without mixup from epoch {switch}", mixup="input", mixup_stop=switch),
        Trick(f"DRS (class-balanced from epoch {switch})", drs="class_balanced"),
        Trick(f"DRW (CB weights from epoch {switch})", drw=True),
        Trick(f"the paper's best combination without CAM: {mix_then} DRS", mixup="input", mixup_stop=switch,
              drs="class_balanced"),
    ]


class Net(nn.Module):
    """Backbone with named blocks (``block1``, ``block2``: manifold-mixup points) and a linear embedding.

    ``image``: two conv blocks (BatchNorm, ReLU) ending in a global-average-pooled feature map, so the
    class activation map exists (CAM-ready). ``vector``: a two-block MLP.
    """

    def __init__(self, kind: str, in_dim: int = 64, dim: int = 32):
        super().__init__()
        self.kind = kind
        if kind == "image":
            self.block1 = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU())
            self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.embed = nn.Linear(32, dim)
        else:
            self.block1 = nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU())
            self.block2 = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
            self.embed = nn.Linear(128, dim)

    def feature_maps(self, x):
        return self.block2(self.block1(x))

    def forward(self, x):
        h = self.feature_maps(x)
        return self.embed(h.mean(dim=(2, 3)) if self.kind == "image" else h)


def _sampler(kind: str, labels: torch.Tensor, epochs: int, seed: int, epoch_size: int):
    kw = dict(rank=0, world_size=1, seed=seed)
    if kind == "instance":
        return InstanceBalancedSampler(labels, **kw)
    if kind in ("class_balanced", "sqrt", "progressive"):
        return ClassProbabilitySampler(labels, kind, num_samples=epoch_size, total_epochs=epochs, **kw)
    if kind == "over":
        return RandomOverSampler(labels, **kw)
    if kind == "under":
        return RandomUnderSampler(labels, **kw)
    raise ValueError(kind)


def _batches(sampler, epoch: int, steps: int, batch: int) -> torch.Tensor:
    """``[steps, batch]`` indices: the start of the sampler's epoch, or several of its epochs (reseeded
    ``epoch * 1000 + k``) when one is shorter. Class-probability samplers draw exactly one epoch
    (their ``t`` is the epoch)."""
    if isinstance(sampler, ClassProbabilitySampler):
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler)).view(steps, batch)
    out, sub = [], 0
    while len(out) < steps * batch:
        sampler.set_epoch(epoch * 1000 + sub)
        out.extend(list(sampler))
        sub += 1
    return torch.tensor(out[: steps * batch]).view(steps, batch)


def train_and_eval(trick: Trick, data: dict, epochs: int, switch: int, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    x_train, y_train = data["x"], data["y"]
    model = Net(data["kind"], in_dim=x_train.shape[-1])
    head = fp.ShardedClassifier(32, data["num_classes"], margin=None, scale=16.0, seed=seed)
    counts = shard_class_counts(y_train, head.class_range)
    configure_reweighting(head, trick.reweight if trick.reweight != "sigmoid_focal" else "ce", counts,
                          gamma=1.0, beta=0.999, focal_gamma=2.0)
    sigmoid = ShardedSigmoidFocal(gamma=2.0, prior=0.01) if trick.reweight == "sigmoid_focal" else None
    mixup = Mixup(alpha=1.0, layers=["block1"] if trick.mixup == "manifold" else None, stop_epoch=trick.mixup_stop,
                  seed=seed) if trick.mixup else None
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=trick.lr, momentum=0.9, weight_decay=5e-4)
    steps = math.ceil(x_train.shape[0] / batch)
    sampler = _sampler(trick.sampler, y_train, epochs, seed, steps * batch)
    step = 0
    for epoch in range(epochs):
        for group in opt.param_groups:   # step decay x0.1 at the switch epoch and two epochs before the end
            group["lr"] = trick.lr * (0.1 ** (epoch >= switch)) * (0.1 ** (epoch >= epochs - 1))
        if epoch == switch and trick.drs == "class_balanced":
            sampler = _sampler("class_balanced", y_train, epochs, seed, steps * batch)
        if epoch == switch and trick.drs == "cam":
            balancer = CamBalancer(model.feature_maps, lambda c: fetch_class_centers(head, c),
                                   projection=model.embed.weight.detach(), seed=seed)
            model.eval()   # the first-stage model, BatchNorm with its running statistics
            new_x, new_y = balancer.generate(x_train, y_train)
            model.train()
            x_train, y_train = torch.cat([x_train, new_x]), torch.cat([y_train, new_y])
            sampler = _sampler("instance", y_train, epochs, seed, steps * batch)
        if epoch == switch and trick.drw:
            head.set_class_weight(cb_weights(counts, 0.999))
        for idx in _batches(sampler, epoch, steps, batch):
            x, y = x_train[idx], y_train[idx]
            if mixup is not None and mixup.active(epoch):
                loss = mixup.forward_loss(model, head, x, y, step)
            elif sigmoid is not None:
                loss = sigmoid(head, model(x), y)
            else:
                loss = head(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    head.eval()
    with torch.no_grad():
        pred = torch.cat([head.predict(model(xb), 1)[1][:, 0] for xb in data["x_test"].split(500)])
    correct = (pred == data["y_test"]).double()
    bucket = torch.from_numpy(data["buckets"])[data["y_test"]]
    result = {"tail": float(correct[bucket == 0].mean()), "medium": float(correct[bucket == 1].mean()),
              "head": float(correct[bucket == 2].mean()), "all": float(correct.mean())}
    return result


def build_data(kind: str, num_classes: int, images_per_test_class: int, seed: int) -> dict:
    data = SyntheticLongTail(num_classes, mode=kind, image_size=16, min_images=5, max_images=250,
                             zipf_exponent=0.7, label_noise=0.0, seed=seed)
    x, y = data.batch(np.arange(len(data)))
    x_test, y_test = data.heldout_seen(np.arange(num_classes), images_per_test_class)
    counts = data.class_counts
    return {"kind": kind, "x": x, "y": y.long(), "x_test": x_test, "y_test": y_test.long(), "num_classes": num_classes,
            "buckets": frequency_buckets(counts), "counts": counts, "description": data.describe()}


def markdown_table(rows: list[dict], data: dict, epochs: int, switch: int, seeds) -> str:
    b = data["buckets"]
    lines = [f"{data['description']}; {int((b == 0).sum())} tail classes (< 20 images), {int((b == 1).sum())} "
             f"medium (20-100), {int((b == 2).sum())} head (> 100). {epochs} epochs, learning rate x0.1 at "
             f"epochs {switch} and {epochs - 1}; training seeds {', '.join(map(str, seeds))} (initialisation, "
             f"sampling, mixup draws; the data set is fixed).", "",
             "| trick | tail | medium | head | all |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = []
        for key in ("tail", "medium", "head", "all"):
            vals = [100 * r[key] for r in row["per_seed"]]
            spread = f" ± {(max(vals) - min(vals)) / 2:.1f}" if len(vals) > 1 else ""
            cells.append(f"{np.mean(vals):.1f}{spread}")
        lines.append(f"| {row['trick']['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["vector", "image"], choices=["vector", "image"])
    parser.add_argument("--vector-epochs", type=int, default=12)
    parser.add_argument("--image-epochs", type=int, default=24)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the vector part")
    parser.add_argument("--image-seeds", type=int, nargs="+", default=[0], help="seeds of the image part")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data set (the same for every run)")
    parser.add_argument("--only", nargs="*", help="substrings of trick names to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more only on an idle machine)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "long_tail_tricks.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "long_tail.md"), help="'' to skip writing the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    command = "    .venv/bin/python benchmarks/long_tail_tricks.py" + "".join(" " + a for a in (argv or sys.argv[1:]))
    sections, results = [f"Produced by\n\n{command}\n"], {}
    for kind in args.parts:
        epochs = args.vector_epochs if kind == "vector" else args.image_epochs
        switch = round(0.75 * epochs)
        chosen = [t for t in tricks(kind, switch) if not args.only or any(s in t.name for s in args.only)]
        rows = [{"trick": asdict(t), "per_seed": []} for t in chosen]
        seeds = args.seeds if kind == "vector" else args.image_seeds
        data = build_data(kind, args.classes, args.test_images, args.data_seed)
        for seed in seeds:
            for row, trick in zip(rows, chosen):
                t0 = time.time()
                result = train_and_eval(trick, data, epochs, switch, args.batch, seed)
                row["per_seed"].append(result)
                print(f"{kind} seed {seed} {trick.name[:60]:<60s} tail {100 * result['tail']:5.1f} medium "
                      f"{100 * result['medium']:5.1f} head {100 * result['head']:5.1f} all {100 * result['all']:5.1f}"
                      f"  ({time.time() - t0:.0f} s)", flush=True)
        results[kind] = rows
        title = ("Feature vectors, MLP backbone" if kind == "vector"
                 else "Images (16x16), CNN backbone with a global-average-pooled feature map")
        sections.append(f"#### {title}\n\n" + markdown_table(rows, data, epochs, switch, seeds))
    text = "\n\n".join(sections)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": time.time() - started,
                                           "results": results}, indent=1))
    if args.doc:
        doc = Path(args.doc)
        old = doc.read_text()
        if BEGIN not in old or END not in old:
            raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers to put the table between")
        doc.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", old,
                              flags=re.S))
    print(text)
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
