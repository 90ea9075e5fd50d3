"""``ffc-plan``: memory per GPU, communication per step and capacity of the class-sharded head.

    ffc-plan --num-classes 1e9 --dim 512 --gpus 64 --gpu-memory 80GB --dtype fp16 \\
             --sample-rate 0.1 --optimizer sgd --batch 512 [--json]

See ``docs/planner.md`` for every formula.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..planner import HeadConfig, format_plan, parse_bytes, parse_count, plan


def _arg(parse):
    """An argparse type from a parser that raises ValueError (shows its message)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffc-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-classes", required=True, type=_arg(parse_count), help="global classes, e.g. 1e9 or 25M")
    p.add_argument("--dim", required=True, type=int, help="embedding dimension")
    p.add_argument("--gpus", type=int, default=1, help="ranks the classes are sharded over")
    p.add_argument("--batch", type=int, default=128, help="per-GPU micro-batch (global = gpus x batch)")
    p.add_argument("--gpu-memory", type=_arg(parse_bytes), default=None,
                   help="memory per GPU, e.g. 80GB, 40GiB (omit: no fit check)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="centers and embeddings")
    p.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC rate")
    p.add_argument("--optimizer", default="sgd", choices=["none", "sgd", "adam", "adamw"])
    p.add_argument("--no-momentum", action="store_true", help="SGD without a momentum buffer")
    master = p.add_mutually_exclusive_group()
    master.add_argument("--master-weights", dest="master_weights", action="store_true", default=None,
                        help="fp32 master copy of half centers (default for fp16/bf16)")
    master.add_argument("--no-master-weights", dest="master_weights", action="store_false")
    p.add_argument("--offload", action="store_true", help="master weights and optimizer state in CPU memory")
    p.add_argument("--memory-budget-mb", type=float, default=256, help="the head's memory_budget_mb")
    p.add_argument("--chunk-size", type=int, default=None, help="the head's chunk_size")
    p.add_argument("--backbone-params", type=_arg(parse_count), default=0,
                   help="backbone parameter count, for its gradient all-reduce volume")
    p.add_argument("--reserve", type=_arg(parse_bytes), default=parse_bytes("1GiB"),
                   help="kept back per GPU for CUDA context, NCCL, allocator slack and the backbone "
                        "(not modelled; default 1GiB)")
    p.add_argument("--grads-persist", action="store_true",
                   help="center gradients kept between steps (set_to_none=False, gradient accumulation)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where the head runs: its loss tiles and cache differ on CPU (see docs/planner.md)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = HeadConfig(num_classes=args.num_classes, dim=args.dim, gpus=args.gpus, batch=args.batch,
                         dtype=args.dtype, sample_rate=args.sample_rate, optimizer=args.optimizer,
                         momentum=not args.no_momentum, master_weights=args.master_weights,
                         offload=args.offload, memory_budget_mb=args.memory_budget_mb,
                         chunk_size=args.chunk_size, backbone_params=args.backbone_params,
                         grads_persist=args.grads_persist, device=args.device,
                         device_memory=args.gpu_memory, reserve=args.reserve)
    except ValueError as exc:
        print(f"ffc-plan: {exc}", file=sys.stderr)
        return 2
    result = plan(cfg)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
