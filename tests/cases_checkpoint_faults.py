"""Per-rank bodies of ``tests/test_checkpoint_faults.py`` (run through ffc_parallel.testing.run_ranks):
damaged checkpoint files, a full disk, failing writes on one rank. 2 ranks, ZeRO-1, AdamW,
the drop-in route; a head of 20,000 classes x 5, so that a class shard (680 kB a rank) is larger than
DeepSpeed's files (4 kB each) and a disk can be filled to fail either."""
import json
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

import ffc_parallel as fp
from tests.cases_checkpoint import backbone_optimizer_state
from tests.cases_engine import build, ds_engine_of, full_backbone, global_batch, head_of, micro_slice

CLASSES, GLOBAL = 20000, 12
TAG = "global_step2"
SHARD1 = "ffc_shards/classifier/shard_00001.pt"
BACKBONE = "mp_rank_00_model_states.pt"
# damaged copy -> (the file it names, what the error says about it)
DAMAGES = {"truncated_backbone": (BACKBONE, "bytes, expected"), "truncated_shard": (SHARD1, "bytes, expected"),
           "changed_shard": (SHARD1, "sha256"), "missing_backbone": (BACKBONE, "missing"),
           "old_truncated_shard": (SHARD1, "not a complete torch.save file"),
           "old_unreadable_shard": (SHARD1, "could not read")}
OLD_INTACT = "old_intact"


def _engine():
    """A fresh engine of this module's model (the same initial weights every time)."""
    return build("drop_in", 1, "adamw", 1, GLOBAL // fp.get_world_size(), CLASSES)[0]


def _train(engine, first_step, steps):
    """``steps`` optimizer steps on the global batches from ``first_step`` on; their losses."""
    rank, world = fp.get_rank(), fp.get_world_size()
    losses = []
    for step in range(first_step, first_step + steps):
        x, y = global_batch(step, GLOBAL, CLASSES)
        loss = engine(micro_slice(x, 0, rank, world, GLOBAL // world), micro_slice(y, 0, rank, world, GLOBAL // world))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _state(engine, backbone_optimizer=True):
    """Centers, their optimizer rows, the full backbone, counters and (``backbone_optimizer``; DeepSpeed
    links it to the parameters only at a step after a same-world-size load) the backbone's optimizer state."""
    head = head_of(engine)
    return {"centers": head.weight.detach().clone(),
            "rows": {k: v.clone() for k, v in head.centers.optimizer.state.items()}, "backbone": full_backbone(engine), "steps": ds_engine_of(engine).global_steps,
            "sample_step": head.sample_step,
            "backbone_state": backbone_optimizer_state(engine) if backbone_optimizer else []}


def _assert_equal_states(a, b):
    assert torch.equal(a["centers"], b["centers"]), "centers differ"
    assert a["rows"].keys() == b["rows"].keys() and all(torch.equal(a["rows"][k], b["rows"][k]) for k in a["rows"])
    assert all(torch.equal(x, y) for x, y in zip(a["backbone"], b["backbone"])), "backbone differs"
    for x, y in zip(a["backbone_state"], b["backbone_state"]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), "backbone optimizer state differs"
    assert (a["steps"], a["sample_step"]) == (b["steps"], b["sample_step"])


def _assert_same_from_here(loaded, reference, step):
    """Equal right after the load, and after one more step each (the backbone's optimizer state included)."""
    _assert_equal_states(_state(loaded, False), _state(reference, False))
    assert _train(loaded, step, 1) == _train(reference, step, 1)
    _assert_equal_states(_state(loaded), _state(reference))


def _truncate(path: Path):
    """Cut ``path`` to half its size."""
    os.truncate(path, path.stat().st_size // 2)


def _drop_table(tag_dir: Path):
    """Make ``tag_dir`` look saved by an older ffc_parallel: a manifest without the file table."""
    manifest_path = tag_dir / "ffc_shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]
    manifest_path.write_text(json.dumps(manifest))


def _spoil_pickle(path: Path):
    """Overwrite the start of the pickle inside a torch.save zip (its directory stays intact)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff\xff\xff\xff")


def _damage(src: Path, dst: Path, how: str):
    """Copy checkpoint directory ``src`` to ``dst`` and damage it as :data:`DAMAGES` key ``how`` says."""
    shutil.copytree(src, dst)
    tag_dir = dst / TAG
    if how.startswith("old_"):
        _drop_table(tag_dir)
    if how == "truncated_backbone":
        _truncate(tag_dir / BACKBONE)
    elif how in ("truncated_shard", "old_truncated_shard"):
        _truncate(tag_dir / SHARD1)
    elif how == "changed_shard":
        with open(tag_dir / SHARD1, "r+b") as f:
            f.seek(tag_dir.joinpath(SHARD1).stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "missing_backbone":
        (tag_dir / BACKBONE).unlink()
    elif how == "old_unreadable_shard":
        _spoil_pickle(tag_dir / SHARD1)


def load_damaged_copies(ckpt, work):
    """Train 2 steps and save; rank 0 makes one damaged copy per :data:`DAMAGES` (and an intact one without
    the table); every copy is loaded on every rank into a fresh engine: the error (None for the intact
    copy), whether a warning came, seconds taken. The intact checkpoint then loads into that same engine
    to the saved state and trains on like the engine that saved it."""
    ckpt, work = Path(ckpt), Path(work)
    engine = _engine()
    _train(engine, 0, 2)
    fp.save_checkpoint(engine, ckpt)
    dist.barrier()
    if fp.get_rank() == 0:
        for how in [*DAMAGES, OLD_INTACT]:
            _damage(ckpt, work / how, how)
    dist.barrier()
    fresh, out = _engine(), {}
    for how in [*DAMAGES, OLD_INTACT]:
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fp.load_checkpoint(fresh, work / how)
                error = None
            except fp.CheckpointError as exc:
                error = str(exc)
        out[how] = {"error": error, "seconds": time.monotonic() - start,
                    "warned": any("no table of file sizes and checksums" in str(w.message) for w in caught)}
    fp.load_checkpoint(fresh, ckpt)
    _assert_same_from_here(fresh, engine, 2)
    return out


def _fill(mount: Path, leave: int):
    """Grow ``mount/filler`` until ``leave`` bytes are free on the file system."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "ab") as f:
        f.write(b"\0" * max(free - leave, 0))


def _failed_save(engine, ckpt: Path, what: str) -> str:
    """The message of a save that must fail, after checking it left ``ckpt`` as it was."""
    try:
        fp.save_checkpoint(engine, ckpt)
    except fp.CheckpointError as exc:
        assert not list(ckpt.glob(".staging-*")), f"{what}: the staging directory stayed"
        assert (ckpt / "latest").read_text() == "global_step1", f"{what}: latest moved"
        assert sorted(p.name for p in ckpt.iterdir()) == ["global_step1", "latest"], f"{what}: {list(ckpt.iterdir())}"
        return str(exc)
    raise AssertionError(f"{what}: the save returned")


def disk_full_then_train_on(mount, roomy):
    """On a small tmpfs ``mount``: save step 1; fill the disk so that DeepSpeed's files fit but the class
    shards do not, train, save (fails); fill it completely, train, save (fails in DeepSpeed's first
    write); free the space and save again there; train, save into ``roomy``. A run that never saw the
    fault trains the same 4 steps: same losses, and ``roomy`` loads back to its state exactly."""
    mount, roomy = Path(mount), Path(roomy)
    ckpt = mount / "ckpt"
    engine = _engine()
    losses = _train(engine, 0, 1)
    fp.save_checkpoint(engine, ckpt)
    table = json.loads((ckpt / "global_step1" / "ffc_shards" / "manifest.json").read_text())["files"]
    deepspeed_pages = sum(-(-e["size"] // 4096) * 4096 for p, e in table.items() if not p.startswith("ffc_shards/"))
    errors = {}
    for what, leave in (("shards", deepspeed_pages + 32 * 1024), ("deepspeed", 0)):
        dist.barrier()
        if fp.get_rank() == 0:
            _fill(mount, leave)
        dist.barrier()
        losses += _train(engine, len(losses), 1)
        errors[what] = _failed_save(engine, ckpt, what)
    dist.barrier()
    if fp.get_rank() == 0:
        (mount / "filler").unlink()
    dist.barrier()
    fp.save_checkpoint(engine, ckpt)       # the space is back: the same directory takes a save again
    assert (ckpt / "latest").read_text() == "global_step3"
    losses += _train(engine, 3, 1)
    fp.save_checkpoint(engine, roomy)
    never_faulted = _engine()
    assert _train(never_faulted, 0, 4) == losses, "the failed saves changed the training trajectory"
    loaded = _engine()
    fp.load_checkpoint(loaded, roomy)
    _assert_same_from_here(loaded, never_faulted, 4)
    return {"errors": errors, "saved_bytes": sum(e["size"] for e in table.values())}


def one_rank_write_fails(ckpt):
    """Faults injected on one rank only: rank 1's DeepSpeed file write raises ENOSPC after writing half a
    file; rank 0's write of ``latest`` raises ENOSPC. Each save raises on every rank; the next one succeeds."""
    import errno

    import ffc_parallel.checkpoint as ck

    ckpt = Path(ckpt)
    engine = _engine()
    _train(engine, 0, 1)
    fp.save_checkpoint(engine, ckpt)
    files = ds_engine_of(engine).checkpoint_engine
    errors = {}
    if fp.get_rank() == 1:
        def half_then_enospc(state_dict, path):
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        files.save = half_then_enospc
    _train(engine, 1, 1)
    errors["deepspeed_rank1"] = _failed_save(engine, ckpt, "rank 1's DeepSpeed write")
    if fp.get_rank() == 1:
        del files.save
    write = ck.atomic_write_bytes
    if fp.get_rank() == 0:
        def latest_enospc(path, body):
            if Path(path).name == "latest":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return write(path, body)
        ck.atomic_write_bytes = latest_enospc
    try:
        fp.save_checkpoint(engine, ckpt)
        raise AssertionError("the save whose latest could not be written returned")
    except fp.CheckpointError as exc:
        errors["latest_rank0"] = str(exc)
    finally:
        ck.atomic_write_bytes = write
    assert (ckpt / "latest").read_text() == "global_step1" and not list(ckpt.glob(".staging-*"))
    fp.save_checkpoint(engine, ckpt, tag="again")
    assert (ckpt / "latest").read_text() == "again"
    return errors
