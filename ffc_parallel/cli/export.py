"""``ffc-export CHECKPOINT OUT.pt``: the model without its class shards, as a plain fp32 ``state_dict``
for inference (``backbone.load_state_dict(torch.load(OUT.pt))``); the class centers are left out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import atomic_torch_save, read_manifest, resolve_tag
from ..deepspeed_bridge.checkpoints import consolidated_fp32_state_dict

PREFIX = "backbone."


def backbone_state_dict(tag_dir: Path) -> dict:
    """fp32 weights of a checkpoint's model, whatever its ZeRO stage (ZeRO partitions are merged),
    without the sharded parts (heads, class pools); a :class:`~ffc_parallel.HybridModel`'s
    ``backbone.`` prefix is dropped, so the result loads into the backbone itself."""
    parts = tuple(f"{name}." for name in read_manifest(tag_dir)["parts"])
    full = consolidated_fp32_state_dict(Path(tag_dir))
    kept = {k: v for k, v in full.items() if not k.startswith(parts) and not k.endswith("_extra_state")}
    if kept and all(k.startswith(PREFIX) for k in kept):
        kept = {k[len(PREFIX):]: v for k, v in kept.items()}
    if not kept:
        raise ValueError(f"{tag_dir} holds no weights besides its class shards")
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ffc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory written by engine.save_checkpoint")
    parser.add_argument("out", help="output file (torch.save of the backbone's state_dict)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    args = parser.parse_args(argv)
    try:
        _, tag_dir = resolve_tag(args.checkpoint, args.tag)
        state = backbone_state_dict(tag_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ffc-export: {exc}", file=sys.stderr)
        return 2
    atomic_torch_save(state, Path(args.out))
    print(f"ffc-export: {len(state)} backbone tensors, {sum(v.numel() for v in state.values())} values -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
