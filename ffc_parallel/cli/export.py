"""``ffc-export CHECKPOINT OUT.pt``: the model without its class shards, as a plain fp32 ``state_dict``
for inference (``backbone.load_state_dict(torch.load(OUT.pt))``); the class centers are left out. The
checkpoint's files are checked against its manifest's sizes and sha256 first; a damaged file, a full disk or
any other failure exits 2 with a message naming the file, leaving no partial OUT.pt."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import read_manifest, resolve_tag
from ..checkpoint_files import (CheckpointError, atomic_torch_save, describe, no_space, no_space_message,
                                saved_bytes, verify_checkpoint)
from ..deepspeed_bridge.checkpoints import consolidated_fp32_state_dict

PREFIX = "backbone."


def backbone_state_dict(tag_dir: Path) -> dict:
    """fp32 weights of a checkpoint's model, whatever its ZeRO stage (ZeRO partitions are merged),
    without the sharded parts (heads, class pools); a :class:`~ffc_parallel.HybridModel`'s
    ``backbone.`` prefix is dropped, so the result loads into the backbone itself. Verifies the
    checkpoint's files first (:class:`~ffc_parallel.checkpoint_files.CheckpointError` names a bad one)."""
    manifest = read_manifest(tag_dir)
    verify_checkpoint(tag_dir, manifest, collective=False)
    parts = tuple(f"{name}." for name in manifest["parts"])
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
    out = Path(args.out)
    try:
        _, tag_dir = resolve_tag(args.checkpoint, args.tag)
        state = backbone_state_dict(tag_dir)
        try:
            atomic_torch_save(state, out)
        except Exception as exc:
            needed = saved_bytes(state)
            if no_space(exc, out, needed):
                raise CheckpointError(no_space_message(out.parent, needed, out.name,
                                                       describe(exc))) from exc
            raise CheckpointError(f"could not write {out}: {describe(exc)}") from exc
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"ffc-export: {exc}", file=sys.stderr)
        return 2
    print(f"ffc-export: {len(state)} backbone tensors, {sum(v.numel() for v in state.values())} values -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
