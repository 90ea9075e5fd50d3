"""Two kernel effects behind the disk store's write path and the head's CPU copies, measured alone.

    python -m benchmarks.page_cache_effects [--dir /work] [--out benchmarks/results/page_cache_effects.json]

* Large folios: a 64 MiB file is written once (one ``pwritev``, a page per call, or through a ``MADV_RANDOM`` mapping as the store's),
  flushed; then 32 writes of 64 KiB spread over it. The bytes this process dirtied by them
  (``/proc/self/io`` ``write_bytes``) are what the disk must write back: 2 MiB here for each way but the first
  when the kernel caches the one large write as large folios (Linux 6.x, ext4/XFS).
* First touch: ``index_select`` of 5e5 sorted rows of ``[5e5, 128]`` bf16 into a new tensor and into one
  that exists (best of 5, one thread): the difference is the page faults of fresh memory.
* The stored head's two per-step passes at the 1e7 twin's shapes (best of 5): bringing 5e5 prefetched rows
  into place when 58 of them were not read ahead (two copies into new tensors, as before round 3; one
  gather into a new tensor; one gather into a mapped one, as ``optim/resident_rows.py`` does now), and the
  squared norm of a ``[5e5, 128]`` bf16 gradient in blocks of 2^20 values (an fp64 copy of each block, as
  before round 3; ``vector_norm(dtype=float64)``, round 3, which copies each block inside; and
  ``optim/centers.center_grad_stats`` itself, which copies each block into one fp64 buffer).
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

from ffc_parallel.optim.centers import center_grad_stats

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


def _best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def index_select_seconds(rows: int = 500_000, dim: int = 128) -> dict:
    x = torch.randn(rows, dim).to(torch.bfloat16)
    idx = torch.arange(rows)
    out = torch.empty_like(x)
    return {"into_new_tensor_s": _best(lambda: x.index_select(0, idx)),
            "into_existing_tensor_s": _best(lambda: torch.index_select(x, 0, idx, out=out))}


def prefetched_rows_seconds(rows: int = 500_000, dim: int = 128, late: int = 58, shard: int = 5_000_000) -> dict:
    """Seconds to bring ``rows`` prefetched rows into place, ``late`` of the step's rows not among them."""
    gen = torch.Generator().manual_seed(0)
    ahead_rows = torch.randperm(shard, generator=gen)[:rows].sort().values
    ahead = torch.randn(rows, dim, generator=gen).to(torch.bfloat16)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[torch.randperm(rows, generator=gen)[:late]] = False
    step_rows = torch.cat([ahead_rows[keep], torch.randint(shard, (late,), generator=gen)]).sort().values
    pos = torch.searchsorted(ahead_rows, step_rows).clamp_(max=rows - 1)
    at = (ahead_rows[pos] == step_rows).nonzero().flatten()
    mapped = torch.zeros(rows, dim, dtype=torch.bfloat16)

    def two_copies():
        torch.empty(rows, dim, dtype=torch.bfloat16).index_copy_(0, at, ahead.index_select(0, pos[at]))

    return {"late_rows": late, "two_copies_into_new_s": _best(two_copies),
            "one_gather_into_new_s": _best(lambda: ahead.index_select(0, pos)),
            "one_gather_into_mapped_s": _best(lambda: torch.index_select(ahead, 0, pos, out=mapped))}


def grad_norm_seconds(rows: int = 500_000, dim: int = 128, block_values: int = 1 << 20) -> dict:
    """Seconds (and the sums) of a bf16 gradient's squared norm in blocks: fp64 copies against vector_norm."""
    g = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    step = block_values // dim
    blocks = [g[a:a + step] for a in range(0, rows, step)]
    sums = {"fp64_copy": lambda: sum(float(b.double().pow(2).sum()) for b in blocks),
            "vector_norm_fp64": lambda: sum(float(torch.linalg.vector_norm(b, dtype=torch.float64).square()) for b in blocks),
            "center_grad_stats": lambda: center_grad_stats(g, None)[1]}
    return {**{f"{k}_s": _best(f) for k, f in sums.items()}, **{f"{k}_sum": f() for k, f in sums.items()}}


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
           "index_select": index_select_seconds(), "prefetched_rows": prefetched_rows_seconds(),
           "grad_norm": grad_norm_seconds()}
    for how, n in dirtied.items():
        print(f"first written {how:14s}: {WRITES} x 64 KiB writes dirtied {n / 1e6:.1f} MB")
    s = out["index_select"]
    print(f"index_select [5e5, 128] bf16: {s['into_new_tensor_s'] * 1e3:.1f} ms into a new tensor, "
          f"{s['into_existing_tensor_s'] * 1e3:.1f} ms into an existing one")
    r, g = out["prefetched_rows"], out["grad_norm"]
    print(f"prefetched rows into place ({r['late_rows']} late): two copies {r['two_copies_into_new_s'] * 1e3:.1f} ms, "
          f"one gather into a new tensor {r['one_gather_into_new_s'] * 1e3:.1f} ms, into a mapped one "
          f"{r['one_gather_into_mapped_s'] * 1e3:.1f} ms")
    print(f"gradient norm: fp64 copies {g['fp64_copy_s'] * 1e3:.1f} ms, vector_norm {g['vector_norm_fp64_s'] * 1e3:.1f} ms, "
          f"center_grad_stats {g['center_grad_stats_s'] * 1e3:.1f} ms (sums {g['fp64_copy_sum']:.10g}, "
          f"{g['vector_norm_fp64_sum']:.10g}, {g['center_grad_stats_sum']:.10g})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
