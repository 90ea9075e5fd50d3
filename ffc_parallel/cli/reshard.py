"""``ffc-reshard SRC DST --world-size N``: rewrite a checkpoint's class shards (every head's centers and
their optimizer state, every FFC class pool) for N ranks, offline (no process group). DeepSpeed's files
are copied unchanged: loading at another world size converts its ZeRO state itself. Every file of SRC is
checked against its manifest's sizes and sha256 first; a damaged file, a full disk or any other failure
exits 2 with a message naming the file, leaving no partial output."""
from __future__ import annotations

import argparse
import sys

from ..checkpoint import read_manifest, reshard, resolve_tag
from ..checkpoint_files import CheckpointError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ffc-reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory written by engine.save_checkpoint")
    parser.add_argument("dst", help="output checkpoint directory (created; may be the same parent as others)")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks to shard the centers for")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in SRC/latest)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    try:
        _, tag_dir = resolve_tag(args.src, args.tag)
        before = read_manifest(tag_dir)
        out = reshard(args.src, args.dst, args.world_size, tag=args.tag, progress=not args.quiet)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"ffc-reshard: {exc}", file=sys.stderr)
        return 2
    for name, entry in before["parts"].items():
        size = f"{entry['num_classes']} classes" if entry["kind"] == "head" else f"{entry['pool_size']} pool slots"
        print(f"ffc-reshard: {name}: {size} x {entry['embedding_dim']}: {before['world_size']} -> {args.world_size} shards")
    print(f"ffc-reshard: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
