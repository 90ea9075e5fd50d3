"""Checkpoints of a DeepSpeed-trained model whose class shards differ on every rank: atomic, and
loadable at any world size.

    fp.save_checkpoint(engine, save_dir, tag=None, client_state=None)   # in place of engine.save_checkpoint
    fp.load_checkpoint(engine, load_dir, tag=None)                      # in place of engine.load_checkpoint

``engine`` is the engine of plain ``deepspeed.initialize`` or an :class:`~ffc_parallel.HybridEngine`
(whose ``save_checkpoint`` / ``load_checkpoint`` call these). Keywords and return values are
DeepSpeed's. The sharded parts of the model are every :class:`~ffc_parallel.ShardedClassifier`
(centers, their optimizer rows, Partial FC's sampling step) and every FFC class pool, named by
their module path. Layout of ``save_dir``::

    latest                          the tag of the newest complete checkpoint (replaced atomically)
    <tag>/                          one complete checkpoint, renamed into place only once fully written
        ...                         DeepSpeed's own files (module, ZeRO partitions, scheduler, client state)
        ffc_shards/manifest.json    every part: kind, sizes, dtype, per-rank ranges; world size; steps;
                                    the size and sha256 of every other file of <tag> (written last)
        ffc_shards/<name>/shard_00003.pt   rank 3's rows of part <name>

A save writes everything into ``save_dir/.staging-<tag>/<tag>``, fsyncs it, renames it to
``save_dir/<tag>`` and only then points ``latest`` at it: a crash at any moment leaves the previous
checkpoint complete and ``latest`` pointing at it. A failure on any rank (a full disk, a failing write
of DeepSpeed's) is a :class:`~ffc_parallel.checkpoint_files.CheckpointError` on every rank, naming the
file; loading, resharding and exporting verify every file first (``checkpoint_files``). A load at
another world size reads, for the classes (slots) a rank now owns, the overlapping rows of the saved
shards, so ``4 -> 2``, ``2 -> 3`` or ``1 -> 4`` give bit-identical reassembled centers and optimizer
state; DeepSpeed's ZeRO state goes through its universal checkpoint
(``deepspeed_bridge.load_engine``).

Why not ``torch.distributed.checkpoint``: it reshards DTensors, whose ``Shard(0)`` layout puts
``ceil(C / W)`` rows on the first ranks (``torch.chunk``), not DESIGN.md's contiguous
``C // W + (rank < C % W)`` blocks; describing our blocks needs the deprecated ``ShardedTensor``
or a planner of our own, for what ``read_rows`` (memory-mapped reads of the overlapping rows) does
in a few lines. See ``docs/deepspeed.md``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from . import deepspeed_bridge as bridge
from .checkpoint_rows import load_head, read_rows, read_shard, reshard_stored_rows, save_stored_head, shard_name
from .checkpoint_files import (MANIFEST, SHARDS_DIR, TABLE, CheckpointError, Writes, atomic_torch_save,
                               atomic_write_bytes, by_rank, describe, fsync_path, gather, hash_file, list_files,
                               no_space, no_space_message, rank_world, save_failure, verify_checkpoint)


FORMAT = 2


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _ds_engine(engine):
    """The DeepSpeed engine behind ``engine`` (an HybridEngine or DeepSpeed's own)."""
    inner = engine.__dict__.get("deepspeed", engine)
    if not bridge.is_engine(inner):
        raise TypeError(f"expected a DeepSpeed engine (from deepspeed.initialize or ffc_parallel.initialize), "
                        f"got {type(engine).__name__}")
    return inner


# ---------------------------------------------------------------------- the sharded parts of a model
def sharded_parts(module: torch.nn.Module) -> dict:
    """``{module path: module}`` of every ShardedClassifier and FFC ClassPool inside ``module``."""
    from .algorithms.ffc import ClassPool
    from .heads.classifier import ShardedClassifier

    return {name or "model": m for name, m in module.named_modules() if isinstance(m, (ShardedClassifier, ClassPool))}


def _is_head(part) -> bool:
    from .heads.classifier import ShardedClassifier
    return isinstance(part, ShardedClassifier)


def _part_entry(part, ranges) -> dict:
    if _is_head(part):
        optimizer = part.centers.optimizer
        return {"kind": "head", "num_classes": part.num_classes, "embedding_dim": part.embedding_dim,
                "dtype": str(part.weight.dtype).replace("torch.", ""), "ranges": ranges,
                "optimizer": optimizer.kind if optimizer is not None else None, "sample_step": int(part.sample_step),
                "storage": part.storage}
    return {"kind": "pool", "pool_size": part.pool_size, "embedding_dim": part.embedding_dim, "ranges": ranges}


def _part_state(part) -> dict:
    """This rank's rows of a part (cpu): a head's centers ``[n, D]`` and optimizer rows, or a pool's slots."""
    if _is_head(part):
        optimizer = part.centers.optimizer
        return {"range": list(part.class_range), "weight": part.weight.detach().cpu().clone(),
                "optimizer": _cpu(optimizer.state_dict()) if optimizer is not None else None}
    return {"range": list(part.slot_range), **{k: v.detach().cpu().clone() for k, v in part.state_dict().items()}}


def _cpu(sd):
    return {k: ({kk: vv.cpu() for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in sd.items()}


def _own_range(part):
    return part.class_range if _is_head(part) else part.slot_range


def _describe(entry: dict) -> str:
    if entry["kind"] == "head":
        return f"a head of {entry['num_classes']} classes x {entry['embedding_dim']}"
    return f"a class pool of {entry['pool_size']} slots x {entry['embedding_dim']}"


def read_manifest(tag_dir: Path) -> dict:
    path = Path(tag_dir) / SHARDS_DIR / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {tag_dir} holds no class shards (a DeepSpeed checkpoint saved with "
            "engine.save_checkpoint keeps one rank's view of the model at most); save with "
            "ffc_parallel.save_checkpoint(engine, dir)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a complete manifest ({exc}; truncated?)") from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def _pool_shards(part_dir: Path, entry: dict, rank: int | None = None) -> dict:
    """A pool's saved slots: shard ``rank`` alone, or (``rank=None``) the whole pool concatenated."""
    if rank is not None:
        return read_shard(Path(part_dir) / shard_name(rank))
    shards = [read_shard(Path(part_dir) / shard_name(r)) for r in range(len(entry["ranges"]))]
    return {"features": torch.cat([s["features"] for s in shards]), "ids": torch.cat([s["ids"] for s in shards]),
            "stamps": torch.cat([s["stamps"] for s in shards]), "clock": shards[0]["clock"]}


# ---------------------------------------------------------------------- save
def save_checkpoint(engine, save_dir, tag=None, client_state=None, save_latest=True,
                    exclude_frozen_parameters=False) -> bool:
    """DeepSpeed's files plus every rank's class shards and the table of every file's size and sha256,
    staged and published atomically (collective); returns True like DeepSpeed. A failure on any rank (a
    full disk included) raises the same :class:`CheckpointError` on every rank once rank 0 has removed
    the staging directory; the model, its optimizers and ``latest`` are left as they were."""
    ds = _ds_engine(engine)
    bridge.attach(ds)   # the centers' optimizers exist before the first step too
    parts = sharded_parts(ds.module)
    rank, world = rank_world()
    save_dir = Path(save_dir)
    tag = str(tag if tag is not None else f"global_step{ds.global_steps}")
    if "/" in tag or tag.startswith("."):
        raise ValueError(f"checkpoint tag {tag!r} must be a plain name (no '/', not starting with '.')")
    ranges = {name: gather(list(_own_range(part))) for name, part in parts.items()}
    staging_root = save_dir / f".staging-{tag}"
    staged = staging_root / tag
    writes = Writes(staged)
    if rank == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging_root, ignore_errors=True)
            for name in parts:
                (staged / SHARDS_DIR / name).mkdir(parents=True)
            (staged / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            writes.fail(f"could not create {staged}: {exc}")
    _settle(writes, save_dir, staging_root, tag)
    try:
        bridge.save_engine(ds, staging_root, tag, client_state or {}, exclude_frozen_parameters, writes=writes)
    except Exception as exc:   # DeepSpeed itself raised (its file writes cannot: ``writes`` records them)
        writes.fail(f"DeepSpeed's save_checkpoint raised {describe(exc)}")
    for name, part in parts.items():
        path = staged / SHARDS_DIR / name / shard_name(rank)
        if _is_head(part) and part.offloaded:
            save_stored_head(part, path, writes)
            continue
        try:
            state = _part_state(part)
        except Exception as exc:   # e.g. out of memory for the cpu copy: the other ranks must learn of it too
            writes.fail(f"could not copy this rank's rows of {name!r}: {describe(exc)}")
            continue
        writes(path, state, lambda: atomic_torch_save(state, path))
    reports = _settle(writes, save_dir, staging_root, tag)
    published = Writes(staged)
    if rank == 0:
        published.bytes = sum(r["bytes"] for r in reports)
        try:
            manifest = {"format": FORMAT, "world_size": world, "backbone_world_size": int(ds.dp_world_size),
                        "global_steps": int(ds.global_steps),
                        "parts": {name: _part_entry(part, ranges[name]) for name, part in parts.items()},
                        TABLE: _full_table(staged, reports)}
            atomic_write_bytes(staged / SHARDS_DIR / MANIFEST,
                               lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            _publish(save_dir, staging_root, tag, save_latest)
        except Exception as exc:
            published.fail(f"could not publish {save_dir / tag}: {describe(exc)}",
                           no_space(exc, save_dir / tag, published.bytes))
    _settle(published, save_dir, staging_root, tag)
    return True


def _settle(writes: Writes, save_dir: Path, staging_root: Path, tag: str) -> list:
    """Every rank's :meth:`Writes.report` (collective); if any rank failed, rank 0 removes the staging
    directory and every rank raises the same :class:`CheckpointError`."""
    reports = gather(writes.report())
    message = save_failure(reports, save_dir, tag)
    if message:
        if rank_world()[0] == 0:
            shutil.rmtree(staging_root, ignore_errors=True)
        _barrier()
        raise CheckpointError(f"{message}; {staging_root} was removed, {save_dir / 'latest'} is unchanged")
    return reports


def _full_table(staged: Path, reports: list) -> dict:
    """The table of every file in ``staged``: the entries the ranks made as they wrote, and (rank 0) any
    file no rank reported; raises if rank 0 cannot see a file another rank wrote."""
    table = {path: entry for report in reports for path, entry in report["files"].items()}
    on_disk = set(list_files(staged))
    unseen = sorted(set(table) - on_disk)
    if unseen:
        raise CheckpointError(f"{', '.join(unseen)} written by other ranks are not in {staged} on rank 0: "
                              "the save directory must be on a file system every rank sees")
    table.update({path: hash_file(staged / path) for path in sorted(on_disk - set(table))})
    return dict(sorted(table.items()))


def _publish(save_dir: Path, staging_root: Path, tag: str, save_latest: bool = True) -> None:
    """fsync the staged checkpoint, rename it into place, then point ``latest`` at it; nothing raises
    once ``latest`` is replaced."""
    staged = staging_root / tag
    for root, _, files in os.walk(staged):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    final, trash = save_dir / tag, save_dir / f".trash-{tag}"
    if final.exists():          # re-saving a tag: keep the old one until the new one is in place
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(staged, final)
    fsync_path(save_dir)
    if save_latest:
        atomic_write_bytes(save_dir / "latest", lambda f: f.write(tag.encode()))
        with contextlib.suppress(OSError):   # lost in a power cut at worst: latest then names the previous one
            fsync_path(save_dir)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging_root, ignore_errors=True)


def resolve_tag(load_dir, tag=None) -> tuple[str, Path]:
    """The tag to load (``latest`` by default) and its directory, recovering from a crash during a
    re-save of the same tag (the previous copy is then still under ``.trash-<tag>``)."""
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"{latest} not found: no complete checkpoint in {load_dir}")
        tag = latest.read_text().strip()
    tag_dir = load_dir / tag
    if not tag_dir.exists() and (load_dir / f".trash-{tag}").exists():
        tag_dir = load_dir / f".trash-{tag}"
    if not tag_dir.exists():
        raise FileNotFoundError(f"checkpoint {tag_dir} not found")
    return tag, tag_dir


# ---------------------------------------------------------------------- load
def _check_parts(tag_dir: Path, manifest: dict, parts: dict) -> None:
    """Raise (the same error on every rank: all read the same manifest) unless the checkpoint's
    parts are the model's, with the same sizes."""
    saved = manifest["parts"]
    problems = []
    for name in sorted(set(saved) | set(parts)):
        if name not in parts:
            problems.append(f"the checkpoint has {_describe(saved[name])} at {name!r}, the model has none there")
        elif name not in saved:
            problems.append(f"the model has a sharded part at {name!r} that the checkpoint does not hold")
        else:
            mine = _part_entry(parts[name], [])
            keys = ("kind", "num_classes", "embedding_dim") if mine["kind"] == "head" else ("kind", "pool_size", "embedding_dim")
            if any(saved[name].get(k) != mine.get(k) for k in keys):
                problems.append(f"{name!r} is {_describe(saved[name])} in the checkpoint but {_describe(mine)} in the model")
    if problems:
        raise ValueError(f"checkpoint {tag_dir} does not fit this model: " + "; ".join(problems))


def load_checkpoint(engine, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    """Load a checkpoint saved by :func:`save_checkpoint` at any world size; returns
    ``(path, client_state)`` like DeepSpeed (collective). Every file is first verified against the
    manifest's table; a damaged file, or any failure while reading, raises the same
    :class:`CheckpointError` on every rank, naming the file (the model may then be partly loaded)."""
    ds = _ds_engine(engine)
    bridge.attach(ds)
    tag, tag_dir = resolve_tag(load_dir, tag)
    manifest = read_manifest(tag_dir)
    parts = sharded_parts(ds.module)
    _check_parts(tag_dir, manifest, parts)
    verify_checkpoint(tag_dir, manifest)
    pools = {name for name, part in parts.items() if not _is_head(part)}
    if pools:   # every rank's pool differs in size: DeepSpeed must not load rank 0's into the others
        if custom_load_fn is not None:
            raise ValueError("custom_load_fn is not supported for a model with an FFC class pool")
        custom_load_fn = _load_all_but(tuple(f"{name}." for name in pools), tag_dir)
    rank, world = rank_world()
    error = None
    try:
        path, client_state = bridge.load_engine(
            ds, tag_dir, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn)
        with_optimizer = load_optimizer_states and not load_module_only
        for name, part in parts.items():
            entry, part_dir = manifest["parts"][name], tag_dir / SHARDS_DIR / name
            if _is_head(part):
                load_head(part, part_dir, entry, with_optimizer)
            elif len(entry["ranges"]) == world:
                part.load_state_dict({k: v for k, v in _pool_shards(part_dir, entry, rank).items() if k != "range"})
            else:
                part.load_full_state(_pool_shards(part_dir, entry))
    except Exception as exc:
        error = exc
    # every rank learns of any rank's failure; no rank moves on (and perhaps deletes or re-saves
    # checkpoints) while another still reads
    failures = gather(None if error is None else
                      str(error) if isinstance(error, CheckpointError) else describe(error))
    if any(failures):
        raise CheckpointError(f"loading checkpoint {tag_dir} failed ({by_rank(failures)})") from error
    return path, client_state


def _load_all_but(prefixes: tuple, tag_dir: Path):
    def load(src, dst):
        missing, unexpected = dst.load_state_dict({k: v for k, v in src.items() if not k.startswith(prefixes)},
                                                  strict=False)
        if unexpected or any(not k.startswith(prefixes) for k in missing):
            raise RuntimeError(f"checkpoint {tag_dir}: model keys differ (missing {missing}, unexpected {unexpected})")
    return load


# ---------------------------------------------------------------------- offline
def reshard(src, dst, world_size: int, tag=None, progress: bool = True) -> Path:
    """Offline: rewrite checkpoint ``src`` (latest tag) to ``dst`` with every head's centers and their
    optimizer state, and every pool's slots, in ``world_size`` shards. DeepSpeed's files are copied
    unchanged (loading converts its ZeRO state at the new world size). Every source file is verified
    first and the output gets its own table; on any failure the staging directory is removed and a
    :class:`CheckpointError` names the file (or, for a full disk, the space needed)."""
    from .heads.classifier import shard_range

    tag, tag_dir = resolve_tag(src, tag)
    manifest = read_manifest(tag_dir)
    verify_checkpoint(tag_dir, manifest, collective=False)
    needed = sum((tag_dir / path).stat().st_size for path in list_files(tag_dir))
    dst = Path(dst)
    created = not dst.exists()
    staging_root = dst / f".staging-{tag}"
    staged = staging_root / tag
    bar = _progress(len(manifest["parts"]) * world_size, f"resharding to {world_size}", progress)
    try:
        shutil.rmtree(staging_root, ignore_errors=True)
        shutil.copytree(tag_dir, staged, ignore=shutil.ignore_patterns(SHARDS_DIR))
        (staged / SHARDS_DIR).mkdir()
        parts = {}
        for name, entry in manifest["parts"].items():
            size = entry["num_classes"] if entry["kind"] == "head" else entry["pool_size"]
            ranges = [list(shard_range(size, world_size, r)) for r in range(world_size)]
            parts[name] = dict(entry, ranges=ranges)
            src_dir, out = tag_dir / SHARDS_DIR / name, staged / SHARDS_DIR / name
            out.mkdir(parents=True)
            pool = _pool_shards(src_dir, entry) if entry["kind"] == "pool" else None
            for rank, (lo, hi) in enumerate(ranges):
                if pool is None and entry.get("storage", "device") != "device":
                    state = reshard_stored_rows(src_dir, entry, lo, hi, out / shard_name(rank))
                elif pool is None:
                    rows = read_rows(src_dir, entry, lo, hi)
                    optimizer = dict(rows["hyper"], state=rows["state"]) if rows["hyper"] is not None else None
                    state = {"range": [lo, hi], "weight": rows["weight"], "optimizer": optimizer}
                else:
                    state = {"range": [lo, hi], "clock": pool["clock"],
                             **{k: pool[k][lo:hi] for k in ("features", "ids", "stamps")}}
                atomic_torch_save(state, out / shard_name(rank))
                bar.update(1)
        new_manifest = dict(manifest, world_size=world_size, parts=parts, **{TABLE: _copy_table(staged, manifest)})
        atomic_write_bytes(staged / SHARDS_DIR / MANIFEST,
                           lambda f: f.write(json.dumps(new_manifest, indent=1).encode()))
        _publish(dst, staging_root, tag)
    except Exception as exc:
        full = not isinstance(exc, CheckpointError) and no_space(exc, staged, needed)
        shutil.rmtree(staging_root, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                dst.rmdir()    # only if nothing else appeared there
        if full:
            raise CheckpointError(no_space_message(dst, needed, f"checkpoint {tag!r} resharded",
                                                   describe(exc)) + f"; {staging_root} was removed") from exc
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"resharding {tag_dir} into {dst} failed: {describe(exc)}; "
                              f"{staging_root} was removed") from exc
    finally:
        bar.close()
    return dst / tag


def _copy_table(staged: Path, source: dict) -> dict:
    """The table of every file in ``staged``; raises if a copied DeepSpeed file differs from the source's entry."""
    table = {path: hash_file(staged / path) for path in list_files(staged)}
    before = source.get(TABLE) or {}
    changed = [path for path, entry in table.items()
               if not path.startswith(f"{SHARDS_DIR}/") and path in before and before[path] != entry]
    if changed:
        raise CheckpointError(f"copying into {staged} changed {', '.join(changed)} (sizes or sha256 differ "
                              "from the source's table)")
    return table


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="shard")
        except ImportError:
            pass
    return _NoBar()
