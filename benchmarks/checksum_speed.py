"""How fast the checkpoint table's checksum is against a cheaper one and against the reads alone.

    python -m benchmarks.checksum_speed [--gib 1] [--repeats 3]

Writes a file of random bytes (page-cached after the first pass), then times reading it in 8 MiB
blocks: the reads alone, zlib's crc32, and sha256 (what ``checkpoint_files.hash_file`` computes), each
the best of ``--repeats`` passes, in GB/s. One core.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib

BLOCK = 8 << 20


def _pass(path: str, consume) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            consume(block)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    size = int(args.gib * 2**30)
    with tempfile.NamedTemporaryFile(prefix="ffc_checksum_", delete=False) as f:
        for _ in range(0, size, BLOCK):
            f.write(os.urandom(BLOCK))
        path = f.name
    try:
        crc = [0]
        sha = hashlib.sha256()
        ways = {"read": lambda b: None, "crc32": lambda b: crc.__setitem__(0, zlib.crc32(b, crc[0])),
                "sha256": sha.update}
        _pass(path, ways["read"])   # into the page cache
        for name, consume in ways.items():
            best = min(_pass(path, consume) for _ in range(args.repeats))
            print(f"{name:7s} {os.path.getsize(path) / best / 1e9:5.2f} GB/s", flush=True)
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
