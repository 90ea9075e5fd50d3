"""ffc-train with glibc's heap sampled: how much of a training's RSS is live memory and how much is free
memory glibc keeps (the planner's ``peak_host_bytes`` counts live tensors only).

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/heap_sampler.py --heap-out OUT.json <ffc-train options>

Every rank runs ``ffc_parallel.cli.train`` with a thread that reads ``mallinfo2()`` (glibc 2.33+) and the
RSS (``/proc/self/statm``) every 5 ms. Rank 0 writes to ``--heap-out``: just before training
(``metrics.json`` ``training_started_unix_s``, when the RSS before training was read after ``malloc_trim``) and at the training's peaks
(until ``metrics.csv`` was last written: the evaluation after training is left out),
``live`` (bytes malloc handed out and not freed: ``uordblks + hblkhd``), ``free_held`` (free bytes in
its arenas: ``fordblks``), ``rss`` and ``file_rss`` (its file-backed and shared pages: statm's third
field); the growths the planner is compared with, and the RSS growth split into those parts and
``other`` (anonymous memory outside malloc: Python's object arenas, thread stacks; less free memory
glibc gave back with ``madvise``). The sampler is not
part of the library: it runs here only.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import runpy
import sys
import threading
import time
from pathlib import Path

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
PERIOD_S = 0.005


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def _rss() -> tuple[int, int]:
    """``(resident, resident and file-backed or shared)`` bytes of this process (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, int(fields[2]) * page


def _sampler(samples: list, stop: threading.Event) -> None:
    """Append ``(time, live, free_held, rss, file_rss)`` every ``PERIOD_S`` until ``stop``."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    while not stop.is_set():
        m = libc.mallinfo2()
        samples.append((time.time(), m.uordblks + m.hblkhd, m.fordblks, *_rss()))
        time.sleep(PERIOD_S)


def summarize(samples: list, training_start: float, training_end: float) -> dict:
    """The first sample at or after ``training_start`` (when ffc-train read its RSS before training, just
    after ``malloc_trim``: the sample before it may precede the trim) as the baseline, and the samples
    at the training's RSS and live peaks (bytes), up to ``training_end`` (the time its last log line was
    written: evaluation comes after). A baseline picked by its RSS alone can fall inside the setup, where a
    block just allocated counts as live before its pages are written."""
    after = [s for s in samples if training_start <= s[0] <= training_end]
    if len(after) < 2:
        raise SystemExit("heap_sampler: no sample at the training's start or none during training")
    before, training = after[0], after[1:]
    at_rss, at_live = max(training, key=lambda s: s[3]), max(training, key=lambda s: s[1])

    def point(s):
        return {"live": s[1], "free_held": s[2], "rss": s[3], "file_rss": s[4]}

    def growth(field):
        return point(at_rss)[field] - point(before)[field]

    return {"before_training": point(before), "at_rss_peak": point(at_rss), "at_live_peak": point(at_live),
            "rss_growth": growth("rss"), "live_growth": at_live[1] - before[1],
            "free_held_at_rss_peak": at_rss[2],
            "rss_growth_parts": {"live": growth("live"), "free_held": growth("free_held"),
                                 "file_rss": growth("file_rss"),
                                 "other": growth("rss") - growth("live") - growth("free_held") - growth("file_rss")},
            "samples": len(samples), "period_s": PERIOD_S}


def _write(samples: list, argv: list, out: Path) -> None:
    """Rank 0: the summary of ``samples`` beside its run's ``metrics.json``, to ``out``."""
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) != "0":
        return
    run_dir = Path(argv[argv.index("--output-dir") + 1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {"benchmark": "heap_sampler", "command": "benchmarks/heap_sampler.py " + " ".join(argv),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "libc": platform.libc_ver()},
              "rss_before_training_bytes": metrics["rss_before_training_bytes"],
              "peak_rss_training_bytes": metrics["peak_rss_training_bytes"],
              **summarize(list(samples), metrics["training_started_unix_s"], (run_dir / "metrics.csv").stat().st_mtime)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"heap_sampler: RSS growth {result['rss_growth'] / 1e9:.3f} GB, live growth {result['live_growth'] / 1e9:.3f} GB, "
          f"free memory glibc held at the RSS peak {result['free_held_at_rss_peak'] / 1e9:.3f} GB -> {out}", flush=True)


def main() -> None:
    argv = sys.argv[1:]
    if "--heap-out" not in argv or "--output-dir" not in argv:
        raise SystemExit("heap_sampler: --heap-out OUT.json and ffc-train's --output-dir are required")
    i = argv.index("--heap-out")
    out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    samples, stop = [], threading.Event()
    threading.Thread(target=_sampler, args=(samples, stop), daemon=True).start()

    def finish():
        if not stop.is_set():
            stop.set()
            _write(samples, argv, out)

    from ffc_parallel.distributed.init import before_exit
    before_exit("heap_sampler", finish)   # ffc-train leaves through exit_distributed (os._exit)
    sys.argv = ["ffc_parallel.cli.train"] + argv
    try:
        runpy.run_module("ffc_parallel.cli.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    finish()


if __name__ == "__main__":
    main()
