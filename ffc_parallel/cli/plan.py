"""``ffc-plan``: memory per GPU, communication per step and capacity of the class-sharded head.

    ffc-plan --num-classes 1e9 --dim 512 --gpus 64 --gpu-memory 80GB --dtype fp16 \\
             --sample-rate 0.1 --optimizer sgd --batch 512 [--center-storage host] [--json]

See ``docs/planner.md`` for every formula.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..planner import (DEFAULT_HOST_BANDWIDTH, DEFAULT_HOST_MEMORY, DEFAULT_PAGE_CPU_SECONDS,
                       DEFAULT_RUN_CPU_SECONDS, RATE_FIELDS, HeadConfig, format_plan, parse_bytes, parse_count,
                       parse_rate, plan)

_OFFLOAD_REMOVED = ("--offload was removed (master weights and optimizer state in host memory was never a mode of "
                    "the head): use --center-storage host (rows, master copy and optimizer state in host memory) "
                    "or --center-storage disk (on local NVMe)")


def _arg(parse):
    """An argparse type from a parser that raises ValueError (shows its message)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _storage(text: str) -> str:
    """``device``, ``host``, ``disk`` or the head's ``disk:/local/nvme/dir`` (the directory does not matter here)."""
    tier = text.split(":", 1)[0] if text.startswith("disk:") else text
    if tier not in ("device", "host", "disk"):
        raise ValueError(f"--center-storage must be device, host, disk or disk:/dir, got {text!r}")
    return tier


def _rates(path: str) -> dict:
    """The measured rates of a ``benchmarks/planner_rates.py`` JSON file (its top-level ``RATE_FIELDS``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--rates {path}: cannot read it as JSON ({exc})") from None
    rates = {k: float(data[k]) for k in RATE_FIELDS if isinstance(data, dict) and k in data}
    if not rates:
        raise ValueError(f"--rates {path}: none of {', '.join(RATE_FIELDS)} in it; write it with "
                         f"python -m benchmarks.planner_rates")
    return rates


class _Removed(argparse.Action):
    """An option that no longer exists: fail with ``message`` (which names its replacement)."""

    def __init__(self, option_strings, dest, message, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


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
    p.add_argument("--offload", action=_Removed, message=_OFFLOAD_REMOVED)
    p.add_argument("--center-storage", type=_arg(_storage), default="device",
                   help="where each rank's rows, fp32 master copy and optimizer state live: device, host "
                        "(host memory) or disk (or disk:/local/nvme/dir: local NVMe); default device")
    p.add_argument("--negative-sampling", default="uniform", choices=["uniform", "block"],
                   help="Partial FC negatives: uniform rows, or contiguous blocks of --sample-block rows")
    p.add_argument("--sample-block", type=int, default=None,
                   help="rows per block of block sampling (default: the head's, 64 KiB of centers)")
    p.add_argument("--host-memory", type=_arg(parse_bytes), default=DEFAULT_HOST_MEMORY,
                   help="host memory per GPU for the head (default 250GB: 2TB per 8-GPU node)")
    p.add_argument("--host-bandwidth", type=_arg(parse_rate), default=DEFAULT_HOST_BANDWIDTH,
                   help="host <-> device bytes/s each way (default 25GB/s, PCIe 4 x16)")
    p.add_argument("--rates", type=_arg(_rates), default={},
                   help="a JSON file of measured rates (python -m benchmarks.planner_rates writes one): "
                        f"{', '.join(RATE_FIELDS)}; the options below override it")
    p.add_argument("--disk-read-bandwidth", type=_arg(parse_rate), default=None,
                   help="disk tier read bytes/s (default 3GB/s, NVMe)")
    p.add_argument("--disk-write-bandwidth", type=_arg(parse_rate), default=None,
                   help="disk tier write bytes/s (default 2GB/s, NVMe)")
    p.add_argument("--compute-rate", type=_arg(parse_count), default=None,
                   help="effective FLOP/s of the head's matrix products per GPU, e.g. 200T or 40G "
                        "(omit: no compute or step time)")
    p.add_argument("--memory-bandwidth", type=_arg(parse_rate), default=None,
                   help="bytes/s of the elementwise passes over the used rows (default 2TB/s cuda, 10GB/s cpu)")
    p.add_argument("--page-cpu-seconds", type=float, default=None,
                   help=f"disk store: CPU seconds per page through its mapping, each way "
                        f"(default {DEFAULT_PAGE_CPU_SECONDS:g})")
    p.add_argument("--run-cpu-seconds", type=float, default=None,
                   help=f"disk store: CPU seconds per preadv/pwritev call of a run of rows "
                        f"(default {DEFAULT_RUN_CPU_SECONDS:g})")
    p.add_argument("--backbone-flops", type=_arg(parse_count), default=0,
                   help="backbone forward FLOPs per sample, for the step time (default 0)")
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
    rates = {k: getattr(args, k) if getattr(args, k) is not None else args.rates.get(k) for k in RATE_FIELDS}
    try:
        cfg = HeadConfig(num_classes=args.num_classes, dim=args.dim, gpus=args.gpus, batch=args.batch,
                         dtype=args.dtype, sample_rate=args.sample_rate, optimizer=args.optimizer,
                         momentum=not args.no_momentum, master_weights=args.master_weights,
                         center_storage=args.center_storage, negative_sampling=args.negative_sampling,
                         sample_block=args.sample_block, host_memory=args.host_memory,
                         host_bandwidth=args.host_bandwidth, backbone_flops=args.backbone_flops,
                         memory_budget_mb=args.memory_budget_mb,
                         chunk_size=args.chunk_size, backbone_params=args.backbone_params,
                         grads_persist=args.grads_persist, device=args.device,
                         device_memory=args.gpu_memory, reserve=args.reserve,
                         **{k: v for k, v in rates.items() if v is not None})
    except ValueError as exc:
        print(f"ffc-plan: {exc}", file=sys.stderr)
        return 2
    result = plan(cfg)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
