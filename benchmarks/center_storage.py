"""Step time of the class-sharded head with its centers on the device, in host memory, or on disk.

    python -m benchmarks.center_storage --classes 1e6,1e7 [--dim 128] [--rate 0.01] [--batch 256]
        [--steps 8] [--tiers device,host,disk] [--sampling uniform,block] [--disk-dir /work/ffc-bench-store]
        [--out benchmarks/results/center_storage.json]

One process, one rank, on the CPU: a tiny backbone (one linear layer) and ``ShardedClassifier`` (fp32
centers, ArcFace, Partial FC at ``--rate``) under plain ``deepspeed.initialize`` with DeepSpeed's SGD
(momentum 0.9, so each row carries weight + momentum + step count: ``4 D + 4 D + 8`` bytes), as
``tests/cases_offload.py`` does. For each class count, negative sampling and tier: the head's
construction time (the store's init writes every row), then the median of ``--steps`` optimizer steps
(forward + backward + step, after ``--warmup`` steps), the store's bytes read and written per step, the
prefetch's hidden fraction, and the process's block-device reads per step (``/proc/self/io``
``read_bytes``; 0 while the store's files sit in the page cache). Ratios are against the device head of
the same class count and sampling in the same run. JSON to ``--out``, a table on stdout.

The 1e8-class point comes from the 2-rank ``ffc-train`` scale run (docs/benchmarks.md, "Center storage
off the device"): one process cannot hold a device head of that size here.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ffc_parallel.cli.train import status_bytes

RESULTS = Path(__file__).resolve().parent / "results"
IN_DIM = 64


def _io_read_bytes() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _init_dist() -> None:
    import importlib

    import deepspeed
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket
        s = socket.socket()
        s.bind(("", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        s.close()
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def run_one(classes: int, dim: int, rate: float, batch: int, steps: int, warmup: int, tier: str,
            sampling: str, disk_dir: str, seed: int = 0) -> dict:
    import deepspeed
    import torch

    import ffc_parallel as fp

    storage = f"disk:{disk_dir}" if tier == "disk" else tier
    if tier == "disk":
        Path(disk_dir).mkdir(parents=True, exist_ok=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.features = torch.nn.Linear(IN_DIM, dim)
            self.classifier = fp.ShardedClassifier(dim, classes, margin="arcface", scale=64.0, sample_rate=rate,
                                                   center_storage=storage, negative_sampling=sampling, seed=seed)

        def forward(self, x, labels):
            return self.classifier(self.features(x), labels)

    rss0 = status_bytes("VmRSS")
    t0 = time.perf_counter()
    net = Net()
    init_s = time.perf_counter() - t0
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "train_batch_size": batch,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}},
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 0},
              "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    head = net.classifier
    g = torch.Generator().manual_seed(1000 + seed)
    times, io = [], []
    stats0 = None
    for step in range(warmup + steps):
        x = torch.randn(batch, IN_DIM, generator=g)
        y = torch.randint(classes, (batch,), generator=g)
        if step == warmup:
            stats0 = dict(head.store_stats()) if head.offloaded else None
        r0, s = _io_read_bytes(), time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if step >= warmup:
            times.append(time.perf_counter() - s)
            io.append(_io_read_bytes() - r0)
    out = {"classes": classes, "dim": dim, "rate": rate, "batch": batch, "tier": tier, "sampling": sampling,
           "init_s": init_s, "step_s_median": statistics.median(times), "step_s_min": min(times),
           "step_s_all": times, "disk_read_bytes_per_step": statistics.mean(io),
           "rss_growth_bytes": status_bytes("VmRSS") - rss0,
           "peak_rss_bytes": status_bytes("VmHWM"), "last_loss": float(loss.item()),
           "rows_per_step": None}
    if head.offloaded:
        st = head.store_stats()
        out.update(store_bytes=st.get("store_bytes"), row_bytes=st.get("row_bytes"), rows_per_step=st.get("rows"),
                   bytes_read_per_step=(st["bytes_read"] - stats0["bytes_read"]) / steps,
                   bytes_written_per_step=(st["bytes_written"] - stats0["bytes_written"]) / steps,
                   prefetch_hidden_fraction=st.get("prefetch_hidden_fraction"),
                   prefetch_read_s=st.get("prefetch_read_s"), prefetch_wait_s=st.get("prefetch_wait_s"),
                   sync_read_s=st.get("sync_read_s"))
    del engine, net, head
    gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="1e6,1e7")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiers", default="device,host,disk")
    p.add_argument("--sampling", default="uniform,block")
    p.add_argument("--disk-dir", default="/work/ffc-bench-store")
    p.add_argument("--out", default=str(RESULTS / "center_storage.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)   # "classes,sampling,tier": one measurement, JSON on the last line
    a = p.parse_args(argv)
    import torch

    if a.one:
        c, sampling, tier = a.one.split(",")
        _init_dist()
        print(json.dumps(run_one(int(c), a.dim, a.rate, a.batch, a.steps, a.warmup, tier, sampling, a.disk_dir)))
        return 0
    rows = []
    for c in [int(float(v)) for v in a.classes.split(",")]:
        for sampling in a.sampling.split(","):
            device_s = None
            for tier in a.tiers.split(","):
                # each measurement in a process of its own: a 1e7-class device head (weight, momentum and the
                # dense gradient: 15.5 GB) is not freed for the next one by deleting the engine
                cmd = [sys.executable, "-m", "benchmarks.center_storage", "--one", f"{c},{sampling},{tier}",
                       "--dim", str(a.dim), "--rate", str(a.rate), "--batch", str(a.batch), "--steps", str(a.steps),
                       "--warmup", str(a.warmup), "--disk-dir", a.disk_dir]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    r = {"classes": c, "sampling": sampling, "tier": tier, "failed": proc.returncode}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                if tier == "device":
                    device_s = r["step_s_median"]
                r["ratio_vs_device"] = r["step_s_median"] / device_s if device_s else None
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "step_s_all"}), flush=True)
    shutil.rmtree(a.disk_dir, ignore_errors=True)
    record = {"benchmark": "center_storage", "argv": sys.argv[1:], "torch": torch.__version__,
              "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'classes':>10} {'sampling':>8} {'tier':>6} {'init s':>8} {'step s':>8} {'x device':>8} "
          f"{'MB read/step':>12} {'MB written/step':>15} {'hidden':>7}")
    for r in rows:
        if "failed" in r:
            print(f"{r['classes']:>10.0e} {r['sampling']:>8} {r['tier']:>6} failed (exit {r['failed']})")
            continue
        mb = lambda v: f"{v / 1e6:.1f}" if v is not None else "-"
        hid = r.get("prefetch_hidden_fraction")
        print(f"{r['classes']:>10.0e} {r['sampling']:>8} {r['tier']:>6} {r['init_s']:>8.2f} {r['step_s_median']:>8.3f} "
              f"{(r['ratio_vs_device'] or float('nan')):>8.2f} {mb(r.get('bytes_read_per_step')):>12} "
              f"{mb(r.get('bytes_written_per_step')):>15} {(f'{hid:.2f}' if hid is not None else '-'):>7}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
