"""This machine's rates, as the planner's step time takes them: measured apart from any training run.

    python -m benchmarks.planner_rates [--dim 128] [--batch 128] [--dtype bf16] [--rows 4e6] [--step-rows 5e5]
        [--block 256] [--steps 5] [--dir /work/ffc-bench-store] [--out benchmarks/results/planner_rates.json]
    ffc-plan ... --device cpu --rates benchmarks/results/planner_rates.json

One process, one thread (``torch.set_num_threads(1)``, as each rank of a CPU run), no head, no DeepSpeed:

* ``compute_rate``: the head's effective FLOP/s: its forward + backward over ``--step-rows`` classes at
  global batch ``B`` (the planner's FLOP count over the seconds: the logits' elementwise passes are in it);
  ``gemm_rate``, for comparison, its three matrix products on one tile alone (``[B, D] x [D, T]``; ``T``
  the tile ``planner.loss_layout`` gives on the CPU), best of 5.
* ``memory_bandwidth``: row bytes per second of a gather and a scatter of ``--step-rows`` rows of ``[rows, D]``
  (``index_select`` into a new buffer, ``index_copy_`` back), the elementwise passes the planner counts.
* The disk store (``optim/center_store.py``) with the 1e8 scale run's row layout (``dtype`` weights and the
  int64 step count): each step reads the rows of one draw of the head's negative candidates
  (``heads/sampling.negative_candidates``), writes them back changed and releases the mapping, as a training
  step does. Timed with the pages cached (``warm``) and dropped before each step (``cold``: ``fsync`` and
  ``POSIX_FADV_DONTNEED``), and with runs of adjacent rows by ``preadv``/``pwritev`` (``runs``, the store's
  path) or every row through the mapping (``mapping``, ``RUN_BYTES`` set above any run). Medians over
  ``--steps`` of CPU seconds (``time.process_time``, user + system) and wall seconds.
  Derived: ``page_cpu_seconds`` (CPU per mapped page and direction, block sampling through the mapping,
  warm, less the copy of its bytes at ``memory_bandwidth``), ``run_cpu_seconds`` (per ``preadv``/``pwritev``
  call beyond its copy), ``disk_read_bandwidth`` (cold block reads: bytes over the wall time the warm read
  did not need) and ``disk_write_bandwidth`` (a step's writes and their ``fsync``: bytes over the wall time
  beyond the write's CPU).

JSON to ``--out`` (the rates at its top level are what ``ffc-plan --rates`` reads); a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from ffc_parallel.heads.sampling import negative_candidates
from ffc_parallel.optim import center_store, row_layout
from ffc_parallel.optim.row_layout import PAGE_BYTES
from ffc_parallel.planner import DTYPE_BYTES, TORCH_DTYPES, HeadConfig, loss_layout, parse_count

RESULTS = Path(__file__).resolve().parent / "results"


def _files(store):
    for f in store.fields.values():
        for segment in f.segments:
            yield segment


def _flush(store, drop: bool) -> float:
    """``fsync`` every segment file (and evict its pages when ``drop``); returns the wall seconds."""
    t0 = time.perf_counter()
    for segment in _files(store):
        segment._map.flush()
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _count(store, rows: torch.Tensor) -> tuple[int, int, int]:
    """(mapped pages, runs, bytes) of reading ``rows`` of every field, as the store splits them."""
    pages = runs = 0
    for f in store.fields.values():
        row = f.width * f.dtype.itemsize
        found, rest = f.runs(rows)
        runs += len(found)
        if rest is not None:   # distinct (segment, page) of the other rows
            pages += torch.unique(rows[rest] % f.segment_rows * row // PAGE_BYTES
                                  + rows[rest] // f.segment_rows * (1 << 40)).numel()
    return pages, runs, rows.numel() * store.row_bytes


def measure_store(store, rows_per_step: int, sampling: str, block: int, steps: int, cold: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    keys = ("read_cpu_s", "read_wall_s", "write_cpu_s", "write_wall_s", "flush_wall_s")
    samples = {k: [] for k in keys}
    for _ in range(steps):
        rows = negative_candidates(store.num_rows, rows_per_step, gen, sampling, block).sort().values
        pages, runs, nbytes = _count(store, rows)
        if cold:
            _flush(store, drop=True)
        c0, w0 = time.process_time(), time.perf_counter()
        values = store.read(rows)
        c1, w1 = time.process_time(), time.perf_counter()
        values["weight"].add_(1)
        values["step"].add_(1)
        c2, w2 = time.process_time(), time.perf_counter()
        store.write(rows, values)
        store.release()
        c3, w3 = time.process_time(), time.perf_counter()
        flush = _flush(store, drop=False) if cold else 0.0
        for key, value in zip(keys, (c1 - c0, w1 - w0, c3 - c2, w3 - w2, flush)):
            samples[key].append(value)
    return {**{k: statistics.median(v) for k, v in samples.items()},
            "mapped_pages": pages, "runs": runs, "bytes": nbytes, "rows": rows_per_step}


def gemm_rate(batch: int, dim: int, dtype: str) -> tuple[float, int]:
    """FLOP/s of the head's three products on one CPU tile, and the tile."""
    tile = loss_layout(HeadConfig(num_classes=10**7, dim=dim, batch=batch, dtype=dtype, sample_rate=0.05,
                                  device="cpu")).tile
    dt = TORCH_DTYPES[dtype]
    x, w = torch.randn(batch, dim, dtype=dt), torch.randn(tile, dim, dtype=dt)
    g = torch.randn(batch, tile, dtype=dt)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            x @ w.T, g @ w, g.T @ x
        best = min(best, (time.perf_counter() - t0) / 10)
    return 6 * batch * tile * dim / best, tile


def head_rate(batch: int, dim: int, dtype: str, columns: int) -> float:
    """Effective FLOP/s of the head itself: forward + backward of ``ShardedClassifier`` (ArcFace, one
    process, every one of ``columns`` classes used) counted as the planner counts them,
    ``6 B R D + 2 B D (R - cached)``; the logits' elementwise passes are in it. Best of 3."""
    import ffc_parallel as fp
    cfg = HeadConfig(num_classes=columns, dim=dim, batch=batch, dtype=dtype, device="cpu")
    flops = 6 * batch * columns * dim + 2 * batch * dim * (columns - loss_layout(cfg).cached)
    head = fp.ShardedClassifier(dim, columns, margin="arcface", dtype=TORCH_DTYPES[dtype])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=gen).to(TORCH_DTYPES[dtype]).requires_grad_()
    y = torch.randint(columns, (batch,), generator=gen)
    best = float("inf")
    for _ in range(4):
        head.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        head(x, y).backward()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def gather_rate(rows: int, step_rows: int, dim: int, dtype: str) -> float:
    """Row bytes per second of an ``index_select`` and an ``index_copy_`` of ``step_rows`` sorted rows."""
    table = torch.randn(rows, dim).to(TORCH_DTYPES[dtype])
    idx = torch.randperm(rows)[:step_rows].sort().values
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        got = table.index_select(0, idx)
        table.index_copy_(0, idx, got)
        best = min(best, time.perf_counter() - t0)
    return 2 * step_rows * dim * DTYPE_BYTES[dtype] / best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128, help="the head's global batch B")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rows", default="4e6", help="rows of the store")
    ap.add_argument("--step-rows", default="5e5", help="rows a step reads and writes")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dir", default="/work/ffc-bench-store")
    ap.add_argument("--out", default=str(RESULTS / "planner_rates.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, step_rows = parse_count(args.rows), parse_count(args.step_rows)
    gemm, tile = gemm_rate(args.batch, args.dim, args.dtype)
    compute = head_rate(args.batch, args.dim, args.dtype, step_rows)
    bandwidth = gather_rate(rows, step_rows, args.dim, args.dtype)
    print(f"GEMM {gemm / 1e9:.1f} GFLOP/s (tile {tile}); the head {compute / 1e9:.1f} GFLOP/s at {step_rows} columns; "
          f"gather + scatter {bandwidth / 1e9:.2f} GB/s", flush=True)
    root = Path(args.dir)
    store = center_store.CenterStore("disk", rows, root)
    results, default_run_bytes = [], row_layout.RUN_BYTES
    try:
        store.add("weight", TORCH_DTYPES[args.dtype], args.dim)
        store.add("step", torch.int64, 1)
        chunk = 1 << 20
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            store.write_range(lo, {"weight": torch.randn(n, args.dim).to(TORCH_DTYPES[args.dtype]),
                                   "step": torch.zeros(n, 1, dtype=torch.long)})
        for sampling in ("block", "uniform"):
            for path in ("runs", "mapping"):
                row_layout.RUN_BYTES = default_run_bytes if path == "runs" else 1 << 62
                for cache in ("warm", "cold"):
                    r = measure_store(store, step_rows, sampling, args.block, args.steps, cache == "cold")
                    results.append({"sampling": sampling, "path": path, "cache": cache, **r})
                    print(f"{sampling:8s} {path:8s} {cache}: read {r['read_cpu_s']:.3f} CPU s {r['read_wall_s']:.3f} "
                          f"wall, write {r['write_cpu_s']:.3f} CPU s {r['write_wall_s']:.3f} wall, fsync "
                          f"{r['flush_wall_s']:.3f} s; {r['mapped_pages']} mapped pages, {r['runs']} runs, "
                          f"{r['bytes'] / 1e6:.1f} MB", flush=True)
    finally:
        row_layout.RUN_BYTES = default_run_bytes
        store.close()
        shutil.rmtree(root, ignore_errors=True)

    def pick(sampling, path, cache):
        return next(r for r in results if (r["sampling"], r["path"], r["cache"]) == (sampling, path, cache))

    # a step reads and writes each page or run once: two faults (or calls) and two copies of its bytes
    mapped, runs = pick("block", "mapping", "warm"), pick("block", "runs", "warm")
    copy = 2 * mapped["bytes"] / bandwidth
    page = max(0.0, mapped["read_cpu_s"] + mapped["write_cpu_s"] - copy) / (2 * mapped["mapped_pages"])
    run = max(0.0, runs["read_cpu_s"] + runs["write_cpu_s"] - copy - 2 * runs["mapped_pages"] * page) \
        / (2 * max(1, runs["runs"]))
    cold = pick("block", "runs", "cold")
    disk_read = cold["bytes"] / max(1e-6, cold["read_wall_s"] - runs["read_cpu_s"])
    disk_write = cold["bytes"] / max(1e-6, cold["write_wall_s"] + cold["flush_wall_s"] - cold["write_cpu_s"])
    out = {"compute_rate": compute, "gemm_rate": gemm, "memory_bandwidth": bandwidth, "page_cpu_seconds": page,
           "run_cpu_seconds": run, "disk_read_bandwidth": disk_read, "disk_write_bandwidth": disk_write,
           "command": "python -m benchmarks.planner_rates " + " ".join(argv if argv is not None else []),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__},
           "config": {"dim": args.dim, "batch": args.batch, "dtype": args.dtype, "tile": tile, "rows": rows,
                      "step_rows": step_rows, "block": args.block, "steps": args.steps},
           "store": results}
    print(f"per mapped page and direction {page * 1e6:.2f} us CPU; per run call {run * 1e6:.2f} us CPU; "
          f"disk read {disk_read / 1e6:.0f} MB/s, write {disk_write / 1e6:.0f} MB/s")
    speedup = (mapped["read_cpu_s"] + mapped["write_cpu_s"]) / (runs["read_cpu_s"] + runs["write_cpu_s"])
    print(f"block sampling, warm: runs by preadv/pwritev take 1/{speedup:.1f} of the mapping's CPU")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
