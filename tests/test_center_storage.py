"""Center storage off the device (host memory, memory-mapped files on disk): the stored head trains, saves,
loads and reshards bit for bit like the head on the device (real processes, gloo, DeepSpeed CPU)."""
import pytest
import torch

import ffc_parallel as fp
from ffc_parallel.checkpoint import reshard
from ffc_parallel.optim import row_sets
from ffc_parallel.optim.center_store import CenterStore, parse_center_storage
from ffc_parallel.testing import run_ranks

# the DeepSpeed marker (also run against the oldest supported DeepSpeed) on one training case: CI's budget
@pytest.mark.parametrize("world,storage,optimizer,gas,dtype", [
    (1, "disk", "sgd", 1, None), pytest.param(2, "disk", "adamw", 2, None, marks=pytest.mark.deepspeed),
    (2, "host-saved", "sgd", 1, "bfloat16"),
    (4, "disk", "sgd", 1, "bfloat16"), (4, "host", "adamw", 1, None)])
def test_stored_head_trains_bit_for_bit_like_the_device_head(tmp_path, world, storage, optimizer, gas, dtype):
    spec = f"disk:{tmp_path / 'store'}" if storage == "disk" else "host"
    save = str(tmp_path / "ckpt") if storage == "host-saved" else None   # the host tier writes its rows out
    out = run_ranks("tests.cases_offload:stored_equals_device", world, timeout=240,
                    kwargs=dict(storage=spec, optimizer=optimizer, gas=gas, head_dtype=dtype, save_dir=save))
    if save:
        assert (tmp_path / "ckpt" / "stored" / "global_step4" / "ffc_shards" / "classifier" / "shard_00001.rows").is_dir()
    assert all(o["losses"] == out[0]["losses"] for o in out)
    if storage == "disk":
        assert not list((tmp_path / "store").iterdir()), "a rank's store directory outlived its head"


def test_stored_checkpoint_links_the_store_loads_and_reshards_at_other_world_sizes(tmp_path):
    """Saved at 2 ranks (training goes on after the save: the linked segments are copied before they are
    written), loaded at 4, resharded offline to 3 and loaded there: every row and the training that
    follows equal the device head's, loaded from its own checkpoint."""
    common = dict(optimizer="sgd", gas=1, head_dtype="bfloat16", sampling="block")
    run_ranks("tests.cases_offload:stored_equals_device", 2, timeout=240,
              kwargs=dict(storage=f"disk:{tmp_path / 'store'}", save_dir=str(tmp_path / "ckpt"), **common))
    shard = tmp_path / "ckpt" / "stored" / "global_step4" / "ffc_shards" / "classifier"
    segments = sorted((shard / "shard_00000.rows").iterdir())
    assert [p.name.split(".")[0] for p in segments[:1]] and all(p.stat().st_nlink == 1 for p in segments), \
        "after the store's directory is gone, the checkpoint holds the only link to each segment"
    run_ranks("tests.cases_offload:load_and_continue", 4, timeout=240,
              kwargs=dict(storage=f"disk:{tmp_path / 'store4'}", save_dir=str(tmp_path / "ckpt"), **common))
    for name in ("device", "stored"):
        reshard(tmp_path / "ckpt" / name, tmp_path / "three" / name, 3, progress=False)
    assert (tmp_path / "three" / "stored" / "global_step4" / "ffc_shards" / "classifier" / "shard_00002.rows").is_dir()
    run_ranks("tests.cases_offload:load_and_continue", 3, timeout=240,
              kwargs=dict(storage="host", save_dir=str(tmp_path / "three"), **common))


def test_center_storage_option_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="center_storage must be 'device', 'host' or 'disk:/local/dir'"):
        parse_center_storage("nvme")
    with pytest.raises(ValueError, match="center_storage"):
        parse_center_storage("disk:")
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError, match=r"center_storage='disk:.*file/sub'"):
        CenterStore("disk", 10, blocked / "sub")


def test_store_segments_round_trip_and_copy_on_write_after_a_snapshot(tmp_path):
    store = CenterStore("disk", 1000, tmp_path / "s")
    store.add("weight", torch.bfloat16, 3)
    store.add("step", torch.int64, 1)
    values = torch.randn(1000, 3).to(torch.bfloat16)
    store.write_range(0, {"weight": values, "step": torch.arange(1000).unsqueeze(1)})
    rows = torch.tensor([0, 5, 999])
    got = store.read(rows)
    assert torch.equal(got["weight"], values[rows]) and torch.equal(got["step"].view(-1), rows)
    info = store.snapshot(tmp_path / "snap")
    assert sum(info["how"].values()) == len(info["files"]) and info["how"]["copy"] == 0
    store.write(rows, {"weight": torch.zeros(3, 3)})
    from ffc_parallel.optim.center_store import open_snapshot
    snap = open_snapshot(tmp_path / "snap", info["layout"])
    assert torch.equal(snap["weight"].read_range(0, 1000), values), "the snapshot changed with the store"
    assert torch.equal(store.read_range(0, 1000)["weight"][rows], torch.zeros(3, 3, dtype=torch.bfloat16))
    for f in snap.values():
        f.close()
    store.close()
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())


def test_a_new_store_removes_the_stores_of_killed_processes_and_keeps_live_ones(tmp_path):
    import subprocess
    import sys
    import warnings
    from ffc_parallel.optim.center_store import _OWNER, _owner
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, _, _ = _owner().split()
    stale, live, foreign = (tmp_path / f"ffc-centers-rank0-{k}" for k in ("a", "b", "c"))
    for path, owner in ((stale, f"{host} {gone.pid} 12345"), (live, _owner()), (foreign, None)):
        path.mkdir()
        (path / "weight.00000").write_bytes(b"x" * 4096)
        if owner:
            (path / _OWNER).write_text(owner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = CenterStore("disk", 10, tmp_path)
    assert not stale.exists() and live.exists() and foreign.exists()
    assert any(str(stale) in str(w.message) and "is gone" in str(w.message) for w in caught)
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])   # its own is gone


@pytest.mark.parametrize("piece", [97, row_sets.PIECE])
def test_scattered_reads_and_writes_equal_a_dense_tensor_through_runs_and_the_mapping(tmp_path, monkeypatch, piece):
    """Rows in runs of adjacent rows (by preadv/pwritev), lone rows (through the mapping) and both in one
    segment, across segment boundaries and after a snapshot (copy-on-write), into new tensors or reused
    buffers, the runs found in one piece of rows or in many: the store acts as a dense tensor."""
    from ffc_parallel.optim import center_store
    monkeypatch.setattr(center_store, "SEGMENT_BYTES", 2000 * 64 * 2)
    monkeypatch.setattr(row_sets, "PIECE", piece)
    n, seg = 5000, center_store.segment_rows_for(64, torch.bfloat16)
    assert seg < n < 3 * seg, "the rows must span segments for this test"
    store = CenterStore("disk", n, tmp_path / "s")
    store.add("weight", torch.bfloat16, 64)     # a run of 16 rows = RUN_BYTES
    store.add("step", torch.int64, 1)           # a run of 256 rows = RUN_BYTES
    dense = {"weight": torch.randn(n, 64).to(torch.bfloat16), "step": torch.arange(n).unsqueeze(1) * 7}
    store.write_range(0, dense)
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        blocks = [torch.arange(a, min(a + 300, n)) for a in torch.randint(0, n, (4,), generator=gen).tolist()]
        blocks += [torch.arange(seg - 20, seg + 20)]                    # a run across the segment boundary
        rows = torch.unique(torch.cat(blocks + [torch.randint(0, n, (40,), generator=gen)]))
        got = store.read(rows)
        assert all(torch.equal(got[k].view(-1, dense[k].shape[1]), dense[k][rows]) for k in dense), trial
        new = {"weight": torch.randn(rows.numel(), 64).to(torch.bfloat16), "step": -rows.unsqueeze(1) * trial}
        if trial == 3:
            snap = store.snapshot(tmp_path / "snap")
        store.write(rows, new)
        for k in dense:
            dense[k][rows] = new[k]
        store.release()
        assert all(torch.equal(store.read_range(0, n)[k], dense[k]) for k in dense), trial
        again = store.read(rows, into=got)     # into the last read's buffers: the same tensors, the new rows
        assert all(again[k].data_ptr() == got[k].data_ptr() and torch.equal(again[k], dense[k][rows]) for k in dense)
        fewer = store.read(rows[1:], into=got)  # another shape: new tensors, the buffers left alone
        assert all(fewer[k].data_ptr() != got[k].data_ptr() and torch.equal(got[k], dense[k][rows]) for k in dense)
    from ffc_parallel.optim.center_store import open_snapshot
    frozen = open_snapshot(tmp_path / "snap", snap["layout"])
    assert frozen["weight"].read_range(0, n).shape == (n, 64)
    for f in frozen.values():
        f.close()
    store.close()


def test_row_sets_by_pieces_equal_the_whole_tensor_formulas(monkeypatch):
    """Runs, their positions, lookups and sorted copies made a piece of ids at a time (no ``[R]``
    temporaries) equal the one-expression formulas on the whole set, with pieces that cut runs apart."""
    monkeypatch.setattr(row_sets, "PIECE", 7)
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        blocks = [torch.arange(a, a + int(torch.randint(1, 40, (1,), generator=gen)))
                  for a in torch.randint(0, 2000, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist()]
        rows = torch.unique(torch.cat(blocks + [torch.randint(0, 2000, (n,), generator=gen)]))
        boundary = int(torch.randint(1, 64, (1,), generator=gen))
        seg = torch.div(rows, boundary, rounding_mode="floor")
        start = torch.ones(rows.numel(), dtype=torch.bool)
        start[1:] = (rows[1:] != rows[:-1] + 1) | (seg[1:] != seg[:-1])
        firsts, lengths = row_sets.runs(rows, boundary)
        assert torch.equal(firsts, start.nonzero().flatten()), trial
        assert torch.equal(lengths, torch.diff(firsts, append=torch.tensor([rows.numel()])))
        short = lengths < 3
        assert torch.equal(row_sets.run_positions(firsts[short], lengths[short]),
                           torch.repeat_interleave(short, lengths).nonzero().flatten())
        ids = torch.unique(torch.randint(0, 2000, (n,), generator=gen))
        found = torch.zeros(ids.numel(), dtype=torch.bool)
        for a, pos, hit in row_sets.lookup(rows, ids):
            assert torch.equal(rows[pos[hit]], ids[a:a + pos.numel()][hit])
            found[a:a + pos.numel()] = hit
        assert torch.equal(found, torch.isin(ids, rows))
        assert torch.equal(row_sets.isin_small(ids, rows[:5]), torch.isin(ids, rows[:5]).nonzero().flatten())
        shuffled = rows[torch.randperm(rows.numel(), generator=gen)]
        assert torch.equal(row_sets.sorted_copy(shuffled), rows) and shuffled.numel() == rows.numel()
    assert row_sets.runs(torch.empty(0, dtype=torch.long), 4)[0].numel() == 0


def test_resident_rows_take_read_ahead_and_late_rows_and_refresh_what_a_step_wrote(tmp_path, monkeypatch):
    """The step's rows come from the rows read ahead where there and from the store where not (lone
    positives); the rows read ahead that the step wrote back are refreshed: each step's resident rows
    equal a dense tensor trained alongside, with lookups cut into pieces."""
    from ffc_parallel.optim.resident_rows import ResidentRows
    monkeypatch.setattr(row_sets, "PIECE", 5)
    n, d = 300, 4
    store = CenterStore("disk", n, tmp_path / "s")
    store.add("weight", torch.float32, d)
    dense = torch.randn(n, d)
    store.write_range(0, {"weight": dense})
    weight = torch.nn.Parameter(torch.empty(0, d))
    resident = ResidentRows(store, weight)
    gen = torch.Generator().manual_seed(0)
    rows = torch.unique(torch.randint(0, n, (60,), generator=gen))
    for step in range(6):
        positions = resident.activate(rows, keep=False)
        assert torch.equal(positions, torch.arange(rows.numel())) and torch.equal(weight.data, dense[rows]), step
        ahead = torch.unique(torch.cat([rows[::3], torch.randint(0, n, (50,), generator=gen)]))  # some rows of this step
        resident.prefetch(ahead)
        weight.data.add_(step + 1.0)
        dense[rows] += step + 1.0
        resident.write_back({})
        rows = torch.unique(torch.cat([ahead[::2], torch.randint(0, n, (4,), generator=gen)]))   # + late rows
    assert resident.stats["prefetched_rows_used"] > 0
    resident.close()
    store.close()


def test_a_stored_head_refuses_training_without_an_engine_and_features_needing_every_row(tmp_path):
    head = fp.ShardedClassifier(8, 50, sample_rate=0.5, center_storage=f"disk:{tmp_path}")
    x, y = torch.randn(4, 8, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="trains only inside a DeepSpeed engine"):
        head(x, y)
    with pytest.raises(ValueError, match="HardestClassSmoothing needs this head's rows on the device"):
        fp.HardestClassSmoothing(head, k=2)
    head.eval()
    q = torch.randn(3, 8)
    device = fp.ShardedClassifier(8, 50, sample_rate=0.5).eval()   # the same seed: the same rows
    stored_top, device_top = head.predict(q, k=2), device.predict(q, k=2)   # evaluation streams the store
    assert torch.equal(stored_top[0], device_top[0]) and torch.equal(stored_top[1], device_top[1])


def test_ffc_train_with_a_disk_store_resumes_into_a_host_store(tmp_path):
    """ffc-train on 2 ranks with --center-storage disk and block negatives, stopped at step 4 and resumed to
    step 6 with the rows in host memory: metrics.json reports the store's traffic and the glibc mode auto chose;
    --task instance is refused."""
    from ffc_parallel.cli.recipe import check_options
    from ffc_parallel.cli.train import TrainOptions

    out = str(tmp_path / "run")
    argv = ["--num-identities", "400", "--sample-rate", "0.2", "--negative-sampling", "block", "--sample-block", "4",
            "--unseen-identities", "20", "--eval-ids-per-bucket", "10", "--batch-size", "16", "--embedding-dim", "16",
            "--log-every", "2", "--checkpoint-every", "2", "--warmup-steps", "2", "--output-dir", out]
    first = run_ranks("tests.cases_train:train_run", 2, timeout=200,
                      kwargs=dict(argv=argv + ["--max-steps", "4", "--center-storage", f"disk:{tmp_path / 'store'}"]))
    stats = first[0]["center_storage"]
    glibc = __import__("platform").libc_ver()[0] == "glibc"
    assert first[0]["host_allocator"] == ("mapped" if glibc else "default")   # --host-allocator auto, a CPU store
    assert stats["tier"] == "disk" and stats["bytes_read_per_step"] > 0 and stats["store_bytes"] == 200 * 16 * 4 * 2 + 200 * 8
    second = run_ranks("tests.cases_train:train_run", 2, timeout=200,
                       kwargs=dict(argv=argv + ["--max-steps", "6", "--center-storage", "host", "--resume"]))
    assert second[0]["steps"] == 6 and second[0]["center_storage"]["tier"] == "host"
    with pytest.raises(ValueError, match="--center-storage host keeps the class rows off the device, but --task instance"):
        check_options(TrainOptions(center_storage="host", task="instance"))
