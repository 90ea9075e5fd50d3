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
        "chunk_weights": 2 * 250 * 8 * 2 + 250 * 8 * 4, "class_scales": 250 * 4,   # + an fp32 tile for half rows
        "embeddings": 8 * 8 * (3 * 2 + 4) + 8 * 8 * 3,
        "sampling": 0, "comm_buffers": 2 * 2 * 8 * 2 + 3 * 8 * 4, "reserve": 0}
    # peak: the start of the backward, every item alive at once
    assert p.total == 63_992
    assert planner.plan(replace(cfg, grads_persist=True)).total == 63_992 + 4_000
    pfc = replace(cfg, sample_rate=0.5)   # Partial FC adds its rows into weight.grad: no second gradient
    assert planner.plan(replace(pfc, grads_persist=True)).total == planner.plan(pfc).total
    # input check: 8 batch fields, k, 5 soft-target fields per rank (the planner said 18 once; the head sends 14)
    assert p.comm == {"input_check": 3 * (8 + 1 + 5) * 8, "allgather_embeddings": 3 * 2 * 8 * 2, "allgather_labels": 3 * 2 * 8,
                      "allreduce_max": 48, "allreduce_sums": 96,   # ring: 2 (W-1)/W x 32 and x 64 bytes
                      "reduce_scatter_embedding_grads": 96, "backbone_allreduce": 3000}
    one = planner.plan(replace(cfg, gpus=1, num_classes=250))
    assert sum(one.comm.values()) == 0
    assert p.host_memory == {} and p.tiers["device"]["read_bytes_per_step"] == 0


def test_storage_tiers_worked_by_hand():
    # C=2000 on 2 GPUs: 1000 rows, D=256 fp32, SGD momentum: a row is weight 1024 + momentum 1024 + step 8
    # = 2056 bytes. Per-GPU batch 2 -> B=4; rate 0.5 -> n = 500 candidates, R = max(4, 500) = 500 rows.
    cfg = planner.HeadConfig(num_classes=2000, dim=256, gpus=2, batch=2, sample_rate=0.5, optimizer="sgd",
                             center_storage="disk", compute_rate=1e9)
    p = planner.plan(cfg)
    s = p.store
    assert (s["row_bytes"], s["prefetch_rows"], s["written_rows_per_step"]) == (2056, 500, 500)
    assert s["store_bytes"] == s["disk_bytes"] == 1000 * 2056
    # positives on this rank: 1000 (1 - (1 - 1/2000)^4) = 1.9985 distinct labels; half of them are not
    # among the candidates: 0.99925 rows read synchronously
    positives = 1000 * (1 - (1 - 1 / 2000) ** 4)
    assert positives == pytest.approx(1.9985, abs=1e-4)
    assert s["missing_positives"] == pytest.approx(0.99925, abs=1e-4)
    assert s["read_bytes_per_step"] == 1_030_054                  # int((500 + 0.99925) x 2056)
    assert s["read_bytes_per_step_max"] == (500 + 4) * 2056       # every one of B=4 positives missing
    assert s["written_bytes_per_step"] == 500 * 2056
    # pages: weight and momentum files are 250 pages of 4 rows; the step file 2 pages of 512 rows. A page is
    # read unless none of its rows is: 250 (1 - 0.5^4) = 234.375 per 4-row file, both step pages.
    prefetch_pages = 2 * 250 * (1 - 0.5**4) + 2
    assert s["prefetch_page_read_bytes"] == int(prefetch_pages * 4096) == 1_928_192
    assert s["page_written_bytes_per_step"] == 1_928_192          # R/C_local = 0.5 as well
    f = (500 + s["missing_positives"]) / 1000
    assert s["page_read_bytes_per_step"] == int((2 * 250 * (1 - (1 - f) ** 4) + 2 * (1 - (1 - f) ** 512)) * 4096)
    # device: the 500 used rows (weight, gradient, momentum + step) and the 500 prefetched rows of the next step
    assert {k: p.memory[k] for k in ("centers", "center_grads", "master_weights", "optimizer_state",
                                     "prefetched_rows")} == {
        "centers": 500 * 1024, "center_grads": 500 * 1024, "master_weights": 0,
        "optimizer_state": 500 * 1032, "prefetched_rows": 500 * 2056}
    assert p.host_memory == {"staging": 500 * 2056}               # pinned staging of R rows
    host = p.tiers["host"]
    assert host["host_bytes"] == 1000 * 2056 + 500 * 2056 and host["disk_bytes"] == 0
    assert host["device_bytes"] == p.tiers["disk"]["device_bytes"] < p.tiers["device"]["device_bytes"]
    # time: the prefetched pages at 3 GB/s + their rows over PCIe at 25 GB/s + the store's CPU: no row of these
    # files is a 2 KiB run, so every page goes through the mapping (5 us each) and the rows' bytes are copied
    # in host memory at 10 GB/s. The missing positives and the write-back are synchronous; the written pages
    # go to the disk (2 GB/s) in the background.
    assert s["prefetch_io_calls"] == s["io_calls_per_step"] == 0 and s["prefetch_mapped_pages"] == prefetch_pages
    t = p.tiers["disk"]
    prefetch = 1_928_192 / 3e9 + 500 * 2056 / 25e9 + prefetch_pages * 5e-6 + 500 * 2056 / 10e9
    assert t["prefetch_read_seconds"] == pytest.approx(prefetch)
    assert t["write_seconds"] == pytest.approx(prefetch_pages * 5e-6 + 500 * 2056 / 10e9 + 500 * 2056 / 25e9)
    assert t["writeback_seconds"] == pytest.approx(1_928_192 / 2e9)
    sync_pages = s["page_read_bytes_per_step"] / 4096 - prefetch_pages
    assert t["sync_read_seconds"] == pytest.approx((s["page_read_bytes_per_step"] - 1_928_192) / 3e9
                                                   + (1_030_054 - 500 * 2056) * (1 / 25e9 + 1 / 10e9)
                                                   + sync_pages * 5e-6, rel=1e-3)   # whole bytes
    # compute: 6 B R D flops plus 2 B D R for recomputing the logits (at B=4 the [t, D] buffers take the
    # whole budget share: nothing cached) at 1 GFLOP/s, plus R (4 x 2056 + 2 x 256 x 4) bytes of
    # elementwise passes at 2 TB/s; it outlasts the prefetch, which it hides (on a GPU: disk and CPU)
    assert p.cached_columns == 0 and t["head_flops_per_step"] == 8 * 4 * 500 * 256
    compute = 4_096_000 / 1e9 + 500 * (4 * 2056 + 2 * 256 * 4) / 2e12
    assert t["compute_seconds"] == pytest.approx(compute) and compute > prefetch
    assert t["prefetch_hidden_seconds"] == pytest.approx(prefetch)
    assert t["step_seconds"] == pytest.approx(compute + t["sync_read_seconds"] + t["write_seconds"])
    # host tier on a GPU: PCIe each way and the gather's copy, no pages
    assert host["prefetch_read_seconds"] == pytest.approx(500 * 2056 / 25e9 + 500 * 2056 / 10e9)
    assert host["page_read_bytes_per_step"] == 0
    # on a CPU the device is host memory: no staging; the peak RSS is the device peak (+ the host store)
    cpu = planner.plan(replace(cfg, device="cpu"))
    assert cpu.host_memory == {} and cpu.tiers["disk"]["peak_host_bytes"] == cpu.total
    assert cpu.tiers["host"]["peak_host_bytes"] == cpu.tiers["host"]["device_bytes"] + 1000 * 2056
    # no PCIe hop: the disk's pages read, and the CPU of every page through the mapping and of the copies
    # (at memory_bandwidth, 10 GB/s by default on a CPU); on a CPU only the prefetch's disk wait is hidden
    c = cpu.tiers["disk"]
    assert c["transfer_seconds"] == pytest.approx(s["page_read_bytes_per_step"] / 3e9 + s["mapped_pages_per_step"] * 5e-6
                                                  + (1_030_054 + 500 * 2056) / 10e9)
    assert c["prefetch_hidden_seconds"] == pytest.approx(1_928_192 / 3e9)


def test_block_sampling_reads_whole_pages():
    # the config above at rate 0.504 with blocks of 8 rows: n = 504 rows in 63 blocks; a block is
    # 8 x 1024 bytes = 2 pages of weight and of momentum, and 64 bytes = 1 page of the step file
    cfg = planner.HeadConfig(num_classes=2000, dim=256, gpus=2, batch=2, sample_rate=0.504, optimizer="sgd",
                             center_storage="disk", negative_sampling="block", sample_block=8)
    s = planner.plan(cfg).store
    assert planner.sampled_classes(cfg) == s["prefetch_rows"] == 504
    assert s["prefetch_page_read_bytes"] == (63 * 2 + 63 * 2 + 2) * 4096   # the step file has 2 pages only
    missing = 1000 * (1 - (1 - 1 / 2000) ** 4) * (1 - 504 / 1000)
    assert s["read_bytes_per_step"] == int((504 + missing) * 2056)
    assert s["page_read_bytes_per_step"] == int((254 + 3 * missing) * 4096)  # a missing positive: a page per file
    # the CPU's view: a block of weight or momentum is 8 KiB, one preadv each (2 x 63 calls); the step file's
    # 64-byte blocks and every missing positive (1 KiB rows) go through the mapping; writes mirror the reads
    assert s["prefetch_io_calls"] == 126 and s["prefetch_mapped_pages"] == 2
    assert s["read_io_calls"] == s["write_io_calls"] == 126
    assert s["read_mapped_pages"] == pytest.approx(2 + 3 * missing) and s["mapped_pages_per_step"] == pytest.approx(4 + 6 * missing)
    uniform = planner.plan(replace(cfg, negative_sampling="uniform")).store
    assert s["page_read_bytes_per_step"] < 0.6 * uniform["page_read_bytes_per_step"]


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
    host = next(s for s in p.suggestions if s["change"].startswith("--center-storage host"))
    assert host["fits"] and host["total_bytes"] == planner.plan(replace(cfg, center_storage="host")).total
    assert planner.plan(replace(cfg, num_classes=best)).suggestions == []
    # the host tier: 15,625,000 rows of 1024 + 2048 + 2048 + 8 = 5128 bytes in host memory
    assert p.proposal["flag"] == "--center-storage host"
    assert p.proposal["store_bytes"] == 15_625_000 * 5128 and p.proposal["fits"]
    # too little host memory for the store: the disk tier
    small = planner.plan(replace(cfg, host_memory=planner.parse_bytes("50GB")))
    assert small.proposal["flag"] == "--center-storage disk" and small.proposal["disk_bytes"] == 15_625_000 * 5128
    assert planner.plan(replace(cfg, center_storage="disk")).fits


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
    assert report["fits"] is False and report["proposal"]["flag"] == "--center-storage host"
    assert "proposed: --center-storage host" in text
    # an explicit tier: its figures are the report's top-level fields
    assert plan_main(args + ["--center-storage", "disk:/local/nvme/ffc", "--compute-rate", "200T", "--json"]) == 0
    disk = json.loads(capsys.readouterr().out)
    assert disk["config"]["center_storage"] == "disk" and disk["fits"] is True and disk["proposal"] is None
    for key in ("store_bytes", "disk_bytes", "read_bytes_per_step", "written_bytes_per_step",
                "page_read_bytes_per_step", "page_written_bytes_per_step", "transfer_seconds",
                "prefetch_hidden_seconds", "step_seconds", "peak_host_bytes"):
        assert disk[key] == disk["tiers"]["disk"][key] and disk[key] > 0, key
    with pytest.raises(SystemExit):
        plan_main(args + ["--offload"])
    assert "--offload was removed" in (err := capsys.readouterr().err) and "--center-storage host" in err
    with pytest.raises(SystemExit):
        plan_main(["--num-classes", "10", "--dim", "8", "--center-storage", "nvme"])
    assert "--center-storage must be device, host, disk" in capsys.readouterr().err
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
