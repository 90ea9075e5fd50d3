"""Two kernel effects behind the disk store's write path and the head's CPU copies, measured alone.

    python -m benchmarks.page_cache_effects [--dir /work] [--out benchmarks/results/page_cache_effects.json]

* Large folios: a 64 MiB file is written once (one ``pwritev``, a page per call, or through a ``MADV_RANDOM`` mapping as the store's),
  flushed; then 32 writes of 64 KiB spread over it. The bytes this process dirtied by them
  (``/proc/self/io`` ``write_bytes``) are what the disk must write back: 2 MiB here for each way but the first
  when the kernel caches the one large write as large folios (Linux 6.x, ext4/XFS).
* First touch: ``index_select`` of 5e5 sorted rows of ``[5e5, 128]`` bf16 into a new tensor and into one
  that exists (best of 5, one thread): the difference is the page faults of fresh memory.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FILE_BYTES, WRITES, WRITE_BYTES = 64 << 20, 32, 64 << 10


def _write_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))


def dirtied_after(how: str, path: Path) -> int:
    """Bytes 32 writes of 64 KiB dirty after the file was first written ``how``."""
    data = os.urandom(FILE_BYTES)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, FILE_BYTES)
        if how == "one_write":
            os.pwritev(fd, [data], 0)
        elif how == "page_per_call":
            view = memoryview(data)
            for offset in range(0, FILE_BYTES, mmap.PAGESIZE):
                os.pwrite(fd, view[offset:offset + mmap.PAGESIZE], offset)
        else:
            with mmap.mmap(fd, FILE_BYTES) as m:
                m.madvise(mmap.MADV_RANDOM)   # as the store maps its segments
                m[:] = data
        os.fsync(fd)
        before = _write_bytes()
        for k in range(WRITES):
            os.pwrite(fd, b"x" * WRITE_BYTES, k * (FILE_BYTES // WRITES))
        return _write_bytes() - before
    finally:
        os.close(fd)
        path.unlink()


def index_select_seconds(rows: int = 500_000, dim: int = 128) -> dict:
    x = torch.randn(rows, dim).to(torch.bfloat16)
    idx = torch.arange(rows)
    out = torch.empty_like(x)

    def best(fn):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    return {"into_new_tensor_s": best(lambda: x.index_select(0, idx)),
            "into_existing_tensor_s": best(lambda: torch.index_select(x, 0, idx, out=out))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work", help="a directory on the disk the store would use")
    ap.add_argument("--out", default=str(RESULTS / "page_cache_effects.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(args.dir) / "ffc-page-cache-effects.bin"
    dirtied = {how: dirtied_after(how, path) for how in ("one_write", "page_per_call", "mapping")}
    out = {"command": "python -m benchmarks.page_cache_effects " + " ".join(argv if argv is not None else []),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "bytes_written_by_the_writes": WRITES * WRITE_BYTES, "bytes_dirtied_after_first_write": dirtied,
           "index_select": index_select_seconds()}
    for how, n in dirtied.items():
        print(f"first written {how:14s}: {WRITES} x 64 KiB writes dirtied {n / 1e6:.1f} MB")
    s = out["index_select"]
    print(f"index_select [5e5, 128] bf16: {s['into_new_tensor_s'] * 1e3:.1f} ms into a new tensor, "
          f"{s['into_existing_tensor_s'] * 1e3:.1f} ms into an existing one")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
