"""fp.planner / ffc-plan: formulas worked by hand, capacity search, suggestions, and the memory model
against the peak RSS of real head training steps in fresh processes (within 10%)."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from ffc_parallel import planner
from ffc_parallel.cli.plan import main as plan_main
from ffc_parallel.testing import run_ranks

MiB = 2**20


def _status(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux >= 4.0): a peak reached before, e.g. while
    importing, must not count as the head's."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_training_steps(num_classes, dim, batch, sample_rate, steps=2, grads_persist=False):
    """Per rank: peak RSS growth over the process's RSS before the head exists, for ``steps`` steps
    of forward + backward + an SGD-momentum update holding the state the planner models (a momentum
    buffer and an int64 step count per row)."""
    import torch

    import ffc_parallel as fp

    _reset_peak_rss()
    base = _status("VmRSS")
    rank = fp.get_rank()
    head = fp.ShardedClassifier(dim, num_classes, sample_rate=sample_rate)
    momentum = torch.zeros_like(head.weight)
    row_steps = torch.zeros(head.num_local, dtype=torch.long)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, dim, generator=g, requires_grad=True)
    y = torch.randint(num_classes, (batch,), generator=g)
    for _ in range(steps):
        if grads_persist and head.weight.grad is not None:
            head.weight.grad.zero_()
        else:
            head.weight.grad = None
        head(x, y).backward()
        with torch.no_grad():
            momentum.mul_(0.9).add_(head.weight.grad)
            head.weight.add_(momentum, alpha=-0.1)
            row_steps += 1
    return {"growth": _status("VmHWM") - base}


def test_memory_and_communication_worked_by_hand():
    # C=1000 on 4 GPUs: n=250 rows, D=8, fp16 (e=2), per-GPU batch 2 -> B=8, 1 MiB budget:
    # chunk = min(250, 2**20 // (12 * 4 * 8)) = 250, cached = min((2**20 - 3*4*8*250) // (4*8*250), 1) = 1;
    # on a GPU the tile is the chunk: work = 8*250*(4+2) logits + 2*250*8*2 rows + 250*4 scales = 21,000
    # bytes <= the 3*4*8*250 = 24,000 set aside, so the whole chunk (8,000 bytes) is cached.
    cfg = planner.HeadConfig(num_classes=1000, dim=8, gpus=4, batch=2, dtype="fp16", optimizer="sgd",
                             memory_budget_mb=1, backbone_params=1000)
    p = planner.plan(cfg)
    assert (p.chunk, p.cached_chunks, p.sampled_classes, p.tile, p.cached_columns) == (250, 1, 250, 250, 250)
    assert p.memory == {
        "centers": 250 * 8 * 2, "center_grads": 250 * 8 * 2,
        "master_weights": 250 * 8 * 4,                      # fp32 copy of half centers
        "optimizer_state": 250 * 8 * 4 + 250 * 8,           # fp32 momentum + int64 step per row
        "logits_work": 8 * 250 * (4 + 2), "logits_cache": 8 * 250 * 4,
        "chunk_weights": 2 * 250 * 8 * 2, "class_scales": 250 * 4,
        "embeddings": 8 * 8 * (3 * 2 + 4) + 8 * 8 * 3,
        "sampling": 0, "comm_buffers": 2 * 2 * 8 * 2 + 3 * 8 * 4, "reserve": 0}
    # peak: the start of the backward, every item alive at once
    assert p.total == 55_992
    assert planner.plan(replace(cfg, grads_persist=True)).total == 55_992 + 4_000
    pfc = replace(cfg, sample_rate=0.5)   # Partial FC adds its rows into weight.grad: no second gradient
    assert planner.plan(replace(pfc, grads_persist=True)).total == planner.plan(pfc).total
    # input check: 8 batch fields, k, 5 soft-target fields per rank (the planner said 18 once; the head sends 14)
    assert p.comm == {"input_check": 3 * (8 + 1 + 5) * 8, "allgather_embeddings": 3 * 2 * 8 * 2, "allgather_labels": 3 * 2 * 8,
                      "allreduce_max": 48, "allreduce_sums": 96,   # ring: 2 (W-1)/W x 32 and x 64 bytes
                      "reduce_scatter_embedding_grads": 96, "backbone_allreduce": 3000}
    one = planner.plan(replace(cfg, gpus=1, num_classes=250))
    assert sum(one.comm.values()) == 0
    off = planner.plan(replace(cfg, offload=True))
    assert off.memory["master_weights"] == off.memory["optimizer_state"] == 0
    assert off.host_memory == {"master_weights": 8000, "optimizer_state": 10000}


def test_partial_fc_columns_and_no_momentum():
    cfg = planner.HeadConfig(num_classes=10**6, dim=64, gpus=2, batch=128, sample_rate=0.1, optimizer="sgd",
                             momentum=False)
    p = planner.plan(cfg)
    assert p.sampled_classes == 50_000                       # int(0.1 * 500,000) > B = 256 positives
    assert p.memory["optimizer_state"] == 500_000 * 8         # step counts only
    assert p.memory["sampling"] > 0
    assert planner.sampled_classes(replace(cfg, sample_rate=1e-4)) == 256   # at least the positives


def test_capacity_and_suggestions_are_consistent():
    cfg = planner.HeadConfig(num_classes=10**9, dim=512, gpus=64, batch=512, dtype="fp16", sample_rate=0.1,
                             optimizer="sgd", device_memory=planner.parse_bytes("80GB"),
                             reserve=planner.parse_bytes("1GiB"))
    p = planner.plan(cfg)
    assert not p.fits and p.total > cfg.device_memory
    best = p.max_classes
    assert planner.plan(replace(cfg, num_classes=best)).fits
    assert not planner.plan(replace(cfg, num_classes=best + 1)).fits
    assert any(s["fits"] for s in p.suggestions)
    gpus = int(p.suggestions[0]["change"].split()[0])
    assert planner.plan(replace(cfg, gpus=gpus)).fits
    assert not planner.plan(replace(cfg, gpus=gpus - 1)).fits
    offload = next(s for s in p.suggestions if s["change"].startswith("offload"))
    assert offload["fits"] and offload["total_bytes"] == planner.plan(replace(cfg, offload=True)).total
    assert planner.plan(replace(cfg, num_classes=best)).suggestions == []


def test_ffc_plan_cli_table_json_and_errors(capsys):
    args = ["--num-classes", "1e9", "--dim", "512", "--gpus", "64", "--gpu-memory", "80GB", "--dtype", "fp16",
            "--sample-rate", "0.1", "--optimizer", "sgd", "--batch", "512"]
    assert plan_main(args) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "largest class count that fits" in text and "to make it fit" in text
    assert plan_main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["global_batch"] == 32768 and report["num_local"] == 15_625_000
    assert report["memory_peak_bytes"] == planner.plan(planner.HeadConfig(
        num_classes=10**9, dim=512, gpus=64, batch=512, dtype="fp16", sample_rate=0.1, optimizer="sgd",
        device_memory=80 * 10**9, reserve=2**30)).total
    with pytest.raises(SystemExit):
        plan_main(["--num-classes", "lots", "--dim", "8"])
    assert "cannot read a count" in capsys.readouterr().err
    assert plan_main(["--num-classes", "10", "--dim", "8", "--sample-rate", "2"]) == 2
    assert "sample_rate must be in (0, 1]" in capsys.readouterr().err


def test_size_parsing():
    assert planner.parse_bytes("80GB") == 80 * 10**9 and planner.parse_bytes("24GiB") == 24 * 2**30
    assert planner.parse_bytes("512MB") == 512 * 10**6 and planner.parse_bytes(1000) == 1000
    assert planner.parse_count("1e9") == 10**9 and planner.parse_count("25.6M") == 25_600_000
    assert planner.parse_count("100k") == 100_000
    with pytest.raises(ValueError, match="memory size"):
        planner.parse_bytes("80 parsecs")


@pytest.mark.parametrize("world,sample_rate,grads_persist", [(1, 1.0, False), (2, 0.5, True)])
def test_peak_memory_matches_measured_rss_within_10_percent(world, sample_rate, grads_persist):
    num_classes, dim, batch = 400_000 * world, 128, 128 // world
    # The planner models live tensors (the CPU analogue of torch.cuda.max_memory_allocated). With
    # glibc's dynamic mmap threshold, freed [B, chunk] buffers under 32 MiB stay in the heap and RSS
    # keeps them; a fixed threshold returns every freed buffer of 1 MiB or more, so RSS follows
    # the live tensors.
    measured = run_ranks("tests.test_planner:measure_training_steps", world, timeout=240,
                         env={"MALLOC_MMAP_THRESHOLD_": str(MiB)},
                         kwargs=dict(num_classes=num_classes, dim=dim, batch=batch, sample_rate=sample_rate,
                                     grads_persist=grads_persist))
    cfg = planner.HeadConfig(num_classes=num_classes, dim=dim, gpus=world, batch=batch, dtype="fp32",
                             sample_rate=sample_rate, optimizer="sgd", grads_persist=grads_persist, device="cpu")
    predicted = planner.plan(cfg).total
    assert predicted > 600 * MiB   # a scale where the model's terms matter, not the interpreter's
    for rank, m in enumerate(measured):
        assert abs(m["growth"] - predicted) <= 0.10 * predicted, (rank, m["growth"] / MiB, predicted / MiB)


def test_cpu_layout_tiles_and_borrowed_gradient_buffer():
    # 1M classes, B=256, D=128, fp32 on CPU: 4 MiB tiles of 4096 classes; tile j's cache entry (256 x 4096)
    # sits at offset j * 256 * 4096 of the 1M x 128 gradient buffer, past the gradient rows of the tiles
    # before it, so 10**6 * 128 // (256 * 4096) = 122 tiles fit; the budget's own cache takes 188 MiB more.
    cfg = planner.HeadConfig(num_classes=10**6, dim=128, batch=256, optimizer="none", device="cpu")
    p = planner.plan(cfg)
    assert (p.chunk, p.cached_chunks, p.tile, p.borrowed_columns) == (21_845, 9, 4096, 122 * 4096)
    own = p.memory["logits_cache"] // (256 * 4)
    assert own == 47 * 4096 and p.cached_columns == 122 * 4096 + own
    extra = p.total - p.memory["centers"] - p.memory["center_grads"]
    assert extra <= 256 * MiB, "the memory goal: weights + gradients + 256 MB"
    on_gpu = planner.plan(replace(cfg, device="cuda"))
    assert on_gpu.tile == 21_845 and on_gpu.borrowed_columns == 0
    # kept gradients (or Partial FC, or fp16) leave the gradient buffer alone
    assert planner.plan(replace(cfg, grads_persist=True)).borrowed_columns == 0
    assert planner.plan(replace(cfg, sample_rate=0.5)).borrowed_columns == 0
