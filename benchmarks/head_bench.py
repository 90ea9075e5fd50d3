"""Step time and peak memory of the class-sharded head vs a full-logits baseline and the GEMM floor.

    python -m benchmarks.head_bench --quick            # from the repository root
    python -m benchmarks.head_bench --full --out benchmarks/results/cpu_full.json

For every configuration (classes per rank, global batch, dim, sample rate, ranks) three methods are
measured, each in FRESH processes (one per rank, gloo, ``ffc_parallel.testing.run_ranks``):

* ``ffc_head``: ``fp.ShardedClassifier`` (ArcFace), forward + backward;
* ``full_logits``: :class:`benchmarks.full_logits.FullLogitsHead`, the Partial FC v2 way;
* ``gemm_floor``: the three matrix products alone (``x @ W.T``, ``G @ W``, ``G.T @ x``) over the
  same sampled classes, chunked into preallocated 64 MiB buffers.

One warm-up step, then ``--steps`` timed steps; a step's time is the slowest rank's, the median over
steps is reported. Memory: CPU peak RSS of each rank's process (``ru_maxrss``; the growth over the
RSS it had after imports and process-group start is reported too); GPU ``max_memory_allocated``.
Cases predicted not to fit ``--memory-limit`` are skipped with the reason; results go to JSON after
every case, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

METHODS = ("ffc_head", "full_logits", "gemm_floor")
SCHEMA = "ffc_parallel.bench/1"
PROCESS_OVERHEAD = 400 * 2**20   # python + torch + gloo per process, for the fit prediction
FLOOR_BUFFER = 64 * 2**20        # bytes of the GEMM floor's [B, chunk] buffer


@dataclass(frozen=True)
class Case:
    """One configuration. ``batch`` is the GLOBAL batch (``batch / ranks`` per rank)."""

    classes_per_rank: int
    batch: int
    dim: int
    sample_rate: float
    ranks: int
    dtype: str = "fp32"

    @property
    def name(self) -> str:
        return (f"C/rank={self.classes_per_rank:.0e} B={self.batch} D={self.dim} "
                f"sr={self.sample_rate} ranks={self.ranks} {self.dtype}")

    def gemm_flops(self) -> int:
        """FLOPs of the three products on one rank: ``3 * 2 * B * D * columns``."""
        return 6 * self.batch * self.dim * columns(self)


def columns(case: Case) -> int:
    """Classes computed per rank and step (Partial FC: ``int(rate * C_local)``, at least B)."""
    if case.sample_rate >= 1.0:
        return case.classes_per_rank
    return max(min(case.batch, case.classes_per_rank), int(case.sample_rate * case.classes_per_rank))


def grid(full: bool, quick: bool) -> list[Case]:
    """The issue's grid (``full``), a tiny smoke grid (``quick``), or the headline subset (neither),
    most important first: the headline case, then by growing cost."""
    if quick:
        return [Case(20_000, 64, 32, rate, ranks) for ranks in (1, 2) for rate in (1.0, 0.5)]
    headline = Case(1_000_000, 256, 128, 1.0, 1)
    if not full:
        return [headline, Case(1_000_000, 256, 128, 0.1, 1), Case(1_000_000, 256, 128, 1.0, 2),
                Case(100_000, 256, 128, 1.0, 1), Case(1_000_000, 1024, 128, 1.0, 1)]
    cases = [Case(c, b, d, r, w) for c, b, d, r, w in itertools.product(
        (100_000, 1_000_000, 4_000_000), (256, 1024), (128, 512), (1.0, 0.1), (1, 2))]
    rest = sorted((c for c in cases if c != headline), key=lambda c: (c.gemm_flops() * c.ranks, c.ranks))
    return [headline] + rest


# ----------------------------------------------------------------------------- memory prediction
def predicted_bytes(method: str, case: Case, device: str = "cpu") -> int:
    """Peak bytes of one rank's process (a fit check, not a result; see docs/benchmarks.md)."""
    from ffc_parallel.planner import DTYPE_BYTES, HeadConfig, plan

    e, n, d, big_b = DTYPE_BYTES[case.dtype], case.classes_per_rank, case.dim, case.batch
    cols = columns(case)
    if method == "ffc_head":
        cfg = HeadConfig(num_classes=n * case.ranks, dim=d, gpus=case.ranks, batch=big_b // case.ranks,
                         dtype=case.dtype, sample_rate=case.sample_rate, optimizer="none",
                         device="cpu" if device == "cpu" else "cuda")
        body = plan(cfg).total
    elif method == "full_logits":
        weights = 2 * n * d * e                                # weight + grad
        copies = 2 * cols * d * e * (2 if cols < n else 1)    # normalised (sampled) weight + grads
        body = weights + copies + 5 * big_b * cols * 4
    else:
        body = 2 * n * d * e + FLOOR_BUFFER
    return body + PROCESS_OVERHEAD


def memory_limit_default() -> int:
    """80% of the memory available now (other jobs share the machine)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * 0.8)
    except OSError:
        pass
    return 16 * 2**30


# ----------------------------------------------------------------------------- one rank's measurement
def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _floor_step(x, weight, rows, chunk):
    """The three GEMMs of one step over ``weight`` (rows ``rows`` or all), outputs preallocated."""
    import torch

    cols = weight.shape[0] if rows is None else rows.numel()
    grad_x = torch.zeros_like(x)
    grad_w = torch.empty((cols, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    buf = torch.empty((x.shape[0], chunk), dtype=x.dtype, device=x.device)
    for start in range(0, cols, chunk):
        stop = min(start + chunk, cols)
        w_c = weight[start:stop] if rows is None else weight.index_select(0, rows[start:stop])
        logits = buf[:, : stop - start] if stop - start == chunk else torch.empty(
            (x.shape[0], stop - start), dtype=x.dtype, device=x.device)
        torch.mm(x, w_c.t(), out=logits)
        grad_x.addmm_(logits, w_c)
        torch.mm(logits.t(), x, out=grad_w[start:stop])
    return grad_x, grad_w


def measure(method: str, classes_per_rank: int, batch: int, dim: int, sample_rate: float,
            dtype: str = "fp32", steps: int = 3, warmup: int = 1, device: str = "cpu",
            memory_budget_mb: float | None = None, chunk_size: int | None = None) -> dict:
    """Run on every rank (under ``run_ranks``): build ``method``, time its steps, report memory."""
    import torch
    import torch.distributed as dist

    import ffc_parallel as fp
    from benchmarks.full_logits import FullLogitsHead

    base_rss = _rss_bytes()
    rank, world = fp.get_rank(), fp.get_world_size()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    num_classes, local_batch = classes_per_rank * world, batch // world
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(local_batch, dim, generator=gen).to(dev, torch_dtype).requires_grad_()
    labels = torch.randint(num_classes, (local_batch,), generator=gen).to(dev)
    extra = {}
    if method == "ffc_head":
        kwargs = {} if memory_budget_mb is None else {"memory_budget_mb": memory_budget_mb}
        model = fp.ShardedClassifier(dim, num_classes, margin="arcface", sample_rate=sample_rate,
                                     chunk_size=chunk_size, dtype=torch_dtype, device=dev, **kwargs)
        chunk_plan = model._plan(batch, columns(Case(classes_per_rank, batch, dim, sample_rate, world)))
        extra["chunk_plan"] = {**asdict(chunk_plan), "tile": chunk_plan.tile(batch, 4, dev.type)}
    elif method == "full_logits":
        model = FullLogitsHead(dim, num_classes, sample_rate=sample_rate).to(dev, torch_dtype)
    elif method == "gemm_floor":
        model = None
        weight = torch.randn(classes_per_rank, dim, generator=gen).to(dev, torch_dtype)
        n_cols = columns(Case(classes_per_rank, batch, dim, sample_rate, world))
        rows = None if n_cols == classes_per_rank else torch.randperm(classes_per_rank, generator=gen)[:n_cols].sort().values
        xg = torch.randn(batch, dim, generator=gen).to(dev, torch_dtype)
        chunk = max(1, FLOOR_BUFFER // (batch * xg.element_size()))
        extra["chunk"] = chunk
    else:
        raise ValueError(f"unknown method {method!r}: one of {METHODS}")

    def step():
        if model is None:
            _floor_step(xg, weight, rows, chunk)
            return None
        model.weight.grad, x.grad = None, None
        loss = model(x, labels)
        loss.backward()
        return float(loss)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    times, cpu_times, loss = [], [], None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_rss = _rss_bytes()
    for i in range(warmup + steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    result = {"rank": rank, "times_s": times, "cpu_times_s": cpu_times, "loss": loss, "base_rss_bytes": base_rss,
              "setup_rss_bytes": setup_rss,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "threads": torch.get_num_threads(), **extra}
    if dev.type == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ----------------------------------------------------------------------------- orchestration
def run_method(method: str, case: Case, args) -> dict:
    """Measure one method on one case in fresh processes; never raises."""
    from ffc_parallel.testing import RankFailure, run_ranks

    need = predicted_bytes(method, case, args.device) * case.ranks
    if need > args.memory_limit:
        return {"status": "skipped", "reason": f"predicted peak {need / 2**30:.1f} GiB for {case.ranks} "
                                               f"rank(s) > memory limit {args.memory_limit / 2**30:.1f} GiB"}
    threads = max(1, args.threads // case.ranks)
    kwargs = dict(method=method, classes_per_rank=case.classes_per_rank, batch=case.batch, dim=case.dim,
                  sample_rate=case.sample_rate, dtype=case.dtype, steps=args.steps, warmup=args.warmup,
                  device=args.device, memory_budget_mb=args.memory_budget_mb, chunk_size=args.chunk_size)
    try:
        ranks = run_ranks("benchmarks.head_bench:measure", case.ranks, timeout=args.case_timeout,
                          kwargs=kwargs, env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    except RankFailure as exc:
        text = str(exc)
        return {"status": "failed", "reason": text.splitlines()[0], "log_tail": text[-2000:]}
    step_times = [max(r["times_s"][i] for r in ranks) for i in range(len(ranks[0]["times_s"]))]
    cpu_times = [max(r["cpu_times_s"][i] for r in ranks) for i in range(len(ranks[0]["cpu_times_s"]))]
    out = {"status": "ok", "step_time_s": statistics.median(step_times), "step_times_s": step_times,
           "step_cpu_time_s": statistics.median(cpu_times), "step_cpu_times_s": cpu_times,
           "loss": ranks[0]["loss"], "threads_per_rank": ranks[0]["threads"],
           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
           "peak_rss_growth_bytes": max(r["peak_rss_bytes"] - r["base_rss_bytes"] for r in ranks),
           "base_rss_bytes": max(r["base_rss_bytes"] for r in ranks),
           "predicted_peak_bytes": predicted_bytes(method, case, args.device),
           "gflops_per_s": case.gemm_flops() / statistics.median(step_times) / 1e9}
    if "max_memory_allocated_bytes" in ranks[0]:
        out["max_memory_allocated_bytes"] = max(r["max_memory_allocated_bytes"] for r in ranks)
    for key in ("chunk_plan", "chunk"):
        if key in ranks[0]:
            out[key] = ranks[0][key]
    return out


def ratios(case: Case, results: dict) -> dict:
    """Head vs floor and baseline vs head (time), and the head's memory against its goal."""
    from ffc_parallel.planner import DTYPE_BYTES

    head, base, floor = (results.get(m, {}) for m in METHODS)
    out = {}
    if head.get("status") == "ok" and floor.get("status") == "ok":
        out["head_time_over_floor"] = head["step_time_s"] / floor["step_time_s"]
        out["head_cpu_time_over_floor"] = head["step_cpu_time_s"] / floor["step_cpu_time_s"]
    if head.get("status") == "ok" and base.get("status") == "ok":
        out["baseline_time_over_head"] = base["step_time_s"] / head["step_time_s"]
        out["baseline_cpu_time_over_head"] = base["step_cpu_time_s"] / head["step_cpu_time_s"]
        out["baseline_peak_over_head_peak"] = base["peak_rss_growth_bytes"] / head["peak_rss_growth_bytes"]
    if head.get("status") == "ok":
        params = 2 * case.classes_per_rank * case.dim * DTYPE_BYTES[case.dtype]   # weights + grads
        out["head_growth_minus_weights_and_grads_bytes"] = head["peak_rss_growth_bytes"] - params
    return out


def machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "memory_bytes": mem, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def source_state() -> dict:
    """The commit measured, and a digest of the head's files as they were (they may be uncommitted)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "ffc_parallel" / "heads").glob("*.py")) + sorted(
        (root / "ffc_parallel" / "distributed").glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "ffc_parallel/heads", "ffc_parallel/distributed")
    commit = git("rev-parse", "HEAD")
    return {"commit": commit.strip() if commit else None, "head_files_sha256": digest,
            "head_files_uncommitted": sorted(line[3:] for line in dirty.splitlines()) if dirty else []}


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def run(cases: list[Case], args, command: str) -> dict:
    """Measure every case, writing the JSON after each; returns the report."""
    from tqdm import tqdm

    methods = [m for m in METHODS if m in args.methods]
    report = {"schema": SCHEMA, "command": command, "machine": machine(), "source": source_state(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": {"steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                           "device": args.device, "memory_limit_bytes": args.memory_limit,
                           "memory_budget_mb": args.memory_budget_mb, "chunk_size": args.chunk_size,
                           "margin": "arcface (s=64, m=0.5)", "time_budget_min": args.time_budget},
              "cases": []}
    deadline = time.monotonic() + 60 * args.time_budget if args.time_budget is not None else None
    bar = tqdm(total=len(cases) * len(methods), unit="run", file=sys.stderr, dynamic_ncols=True)
    for case in cases:
        entry = {"config": asdict(case), "name": case.name, "results": {}}
        for method in methods:
            bar.set_description(f"{case.name} {method}")
            if deadline is not None and time.monotonic() > deadline:
                result = {"status": "skipped", "reason": f"time budget of {args.time_budget} min used up"}
            else:
                result = run_method(method, case, args)
            entry["results"][method] = result
            bar.update()
            tail = (f"{result['step_time_s']:.3f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
                    if result["status"] == "ok" else f"{result['status']}: {result['reason']}")
            bar.write(f"{case.name:<52} {method:<12} {tail}")
        entry["ratios"] = ratios(case, entry["results"])
        report["cases"].append(entry)
        report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write(Path(args.out), report)
    bar.close()
    return report


def _status_or(result: dict, text: str) -> str:
    return text if result.get("status") == "ok" else result.get("status", "-")


def table(report: dict) -> str:
    """A Markdown table of a report: median step times (wall / CPU), ratios, peak RSS growth."""
    header = ["C/rank", "B", "D", "sr", "ranks", "head s", "baseline s", "floor s", "baseline/head",
              "head/floor", "head peak GiB", "baseline peak GiB", "head extra MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in report["cases"]:
        c, res, rat = entry["config"], entry["results"], entry["ratios"]
        head, base, floor = (res.get(m, {}) for m in METHODS)
        extra = rat.get("head_growth_minus_weights_and_grads_bytes")
        cells = [f"{c['classes_per_rank']:.0e}", str(c["batch"]), str(c["dim"]), str(c["sample_rate"]),
                 str(c["ranks"])]
        cells += [_status_or(r, f"{r.get('step_time_s', 0):.2f} / {r.get('step_cpu_time_s', 0):.2f}")
                  for r in (head, base, floor)]
        for wall, cpu in (("baseline_time_over_head", "baseline_cpu_time_over_head"),
                          ("head_time_over_floor", "head_cpu_time_over_floor")):
            cells.append(f"{rat[wall]:.2f}x / {rat[cpu]:.2f}x" if wall in rat else "-")
        cells += [_status_or(r, f"{r.get('peak_rss_growth_bytes', 0) / 2**30:.2f}") for r in (head, base)]
        cells.append(f"{extra / 2**20:.0f}" if extra is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny smoke grid (seconds)")
    size.add_argument("--full", action="store_true", help="the issue's whole grid (hours on 2 CPU cores)")
    p.add_argument("--case", action="append", default=[], metavar="C,B,D,SR,RANKS",
                   help="run only these cases, e.g. --case 1e6,256,128,1.0,1 (repeatable)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads in all; each of R ranks gets threads // R")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GiB the processes of one case may use (default: 80%% of MemAvailable)")
    p.add_argument("--memory-budget-mb", type=float, default=None, help="the head's memory_budget_mb")
    p.add_argument("--chunk-size", type=int, default=None, help="the head's chunk_size")
    p.add_argument("--case-timeout", type=float, default=3600, help="seconds before a case is killed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes; cases not started by then are recorded as skipped")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<grid>_<time>.json)")
    p.add_argument("--table", metavar="JSON", default=None, help="print the table of an existing report and exit")
    args = p.parse_args(argv)
    args.memory_limit = int(args.memory_limit * 2**30) if args.memory_limit else memory_limit_default()
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        kind = "quick" if args.quick else "full" if args.full else "headline"
        args.out = str(Path(__file__).resolve().parent / "results" / f"{args.device}_{kind}_{stamp}.json")
    return args


def _parse_case(text: str) -> Case:
    try:
        c, b, d, sr, w = text.split(",")
        return Case(int(float(c)), int(b), int(d), float(sr), int(w))
    except ValueError:
        raise SystemExit(f"--case {text!r}: expected C_PER_RANK,BATCH,DIM,SAMPLE_RATE,RANKS, e.g. 1e6,256,128,1.0,1")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    cases = [_parse_case(t) for t in args.case] or grid(args.full, args.quick)
    for case in cases:
        if case.batch % case.ranks:
            raise SystemExit(f"{case.name}: the global batch must divide evenly over the ranks")
    command = "python -m benchmarks.head_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(cases, args, command)
    print(table(report))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
