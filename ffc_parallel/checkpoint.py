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
        ffc_shards/manifest.json    every part: kind, sizes, dtype, per-rank ranges; world size; steps
        ffc_shards/<name>/shard_00003.pt   rank 3's rows of part <name>

A save writes everything into ``save_dir/.staging-<tag>/<tag>``, fsyncs it, renames it to
``save_dir/<tag>`` and only then points ``latest`` at it: a crash at any moment leaves the previous
checkpoint complete and ``latest`` pointing at it. A load at another world size reads, for the
classes (slots) a rank now owns, the overlapping rows of the saved shards, so ``4 -> 2``, ``2 -> 3``
or ``1 -> 4`` give bit-identical reassembled centers and optimizer state; DeepSpeed's ZeRO state
goes through its universal checkpoint (``deepspeed_bridge.checkpoints.load_engine``).

Why not ``torch.distributed.checkpoint``: it reshards DTensors, whose ``Shard(0)`` layout puts
``ceil(C / W)`` rows on the first ranks (``torch.chunk``), not DESIGN.md's contiguous
``C // W + (rank < C % W)`` blocks; describing our blocks needs the deprecated ``ShardedTensor``
or a planner of our own, for what ``read_rows`` (memory-mapped reads of the overlapping rows) does
in a few lines. See ``docs/deepspeed.md``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from . import deepspeed_bridge as bridge
from .deepspeed_bridge import checkpoints as ds_files

SHARDS_DIR, MANIFEST = "ffc_shards", "manifest.json"
FORMAT = 2


def shard_name(rank: int) -> str:
    return f"shard_{rank:05d}.pt"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_ok(ok: bool, what: str) -> None:
    """Raise on every rank if ``ok`` is False on any rank (no rank is left waiting)."""
    flag = torch.tensor([0 if ok else 1])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise RuntimeError(f"ffc_parallel checkpoint: {what} failed on at least one rank (see its log)")


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
    from .heads.sharded import ShardedClassifier

    return {name or "model": m for name, m in module.named_modules() if isinstance(m, (ShardedClassifier, ClassPool))}


def _is_head(part) -> bool:
    from .heads.sharded import ShardedClassifier
    return isinstance(part, ShardedClassifier)


def _part_entry(part, ranges) -> dict:
    if _is_head(part):
        optimizer = part.centers.optimizer
        return {"kind": "head", "num_classes": part.num_classes, "embedding_dim": part.embedding_dim,
                "dtype": str(part.weight.dtype).replace("torch.", ""), "ranges": ranges,
                "optimizer": optimizer.kind if optimizer is not None else None, "sample_step": int(part.sample_step)}
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
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def read_rows(part_dir: Path, entry: dict, start: int, stop: int) -> dict:
    """A head's rows ``[start, stop)`` assembled from the saved shards that overlap them:
    ``{"weight": [stop-start, D], "state": optimizer state rows, "hyper": optimizer hyperparameters}``."""
    pieces, states, hyper = [], {}, None
    for rank, (lo, hi) in enumerate(entry["ranges"]):
        a, b = max(lo, start), min(hi, stop)
        if a >= b and (hyper is not None or rank > 0):
            continue
        shard = torch.load(Path(part_dir) / shard_name(rank), map_location="cpu", mmap=True, weights_only=True)
        optimizer = shard["optimizer"]
        if hyper is None and optimizer is not None:
            hyper = {k: v for k, v in optimizer.items() if k != "state"}
        if a < b:
            pieces.append(shard["weight"][a - lo: b - lo].clone())
            for key, value in (optimizer or {}).get("state", {}).items():
                states.setdefault(key, []).append(value[a - lo: b - lo].clone())
    weight = torch.cat(pieces) if pieces else torch.empty(0, entry["embedding_dim"], dtype=getattr(torch, entry["dtype"]))
    return {"weight": weight, "state": {k: torch.cat(v) for k, v in states.items()}, "hyper": hyper}


def _pool_shards(part_dir: Path, entry: dict, rank: int | None = None) -> dict:
    """A pool's saved slots: shard ``rank`` alone, or (``rank=None``) the whole pool concatenated."""
    if rank is not None:
        return torch.load(Path(part_dir) / shard_name(rank), map_location="cpu", weights_only=True)
    shards = [torch.load(Path(part_dir) / shard_name(r), map_location="cpu", weights_only=True)
              for r in range(len(entry["ranges"]))]
    return {"features": torch.cat([s["features"] for s in shards]), "ids": torch.cat([s["ids"] for s in shards]),
            "stamps": torch.cat([s["stamps"] for s in shards]), "clock": shards[0]["clock"]}


# ---------------------------------------------------------------------- save
def save_checkpoint(engine, save_dir, tag=None, client_state=None, save_latest=True,
                    exclude_frozen_parameters=False) -> bool:
    """DeepSpeed's files plus every rank's class shards, staged and published atomically
    (collective); returns True like DeepSpeed."""
    ds = _ds_engine(engine)
    bridge.attach(ds)   # the centers' optimizers exist before the first step too
    parts = sharded_parts(ds.module)
    rank, world = _rank_world()
    save_dir = Path(save_dir)
    tag = str(tag if tag is not None else f"global_step{ds.global_steps}")
    if "/" in tag or tag.startswith("."):
        raise ValueError(f"checkpoint tag {tag!r} must be a plain name (no '/', not starting with '.')")
    ranges = {}
    for name, part in parts.items():
        gathered = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, list(_own_range(part)))
        else:
            gathered = [list(_own_range(part))]
        ranges[name] = gathered
    staging_root = save_dir / f".staging-{tag}"
    staged = staging_root / tag
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging_root, ignore_errors=True)
        for name in parts:
            (staged / SHARDS_DIR / name).mkdir(parents=True)
        (staged / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    _barrier()
    ds_files.save_engine(ds, staging_root, tag, client_state or {}, exclude_frozen_parameters)
    ok = True
    try:
        for name, part in parts.items():
            atomic_torch_save(_part_state(part), staged / SHARDS_DIR / name / shard_name(rank))
    except OSError as exc:
        ok = False
        print(f"ffc_parallel: rank {rank} could not write its class shards: {exc}", flush=True)
    _all_ok(ok, "writing the class shards")
    if rank == 0:
        manifest = {"format": FORMAT, "world_size": world, "backbone_world_size": int(ds.dp_world_size),
                    "global_steps": int(ds.global_steps),
                    "parts": {name: _part_entry(part, ranges[name]) for name, part in parts.items()}}
        atomic_write_bytes(staged / SHARDS_DIR / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        _publish(save_dir, staging_root, tag, save_latest)
    _barrier()
    return True


def _publish(save_dir: Path, staging_root: Path, tag: str, save_latest: bool = True) -> None:
    """fsync the staged checkpoint, rename it into place, then point ``latest`` at it."""
    staged = staging_root / tag
    for root, _, files in os.walk(staged):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))
    final, trash = save_dir / tag, save_dir / f".trash-{tag}"
    if final.exists():          # re-saving a tag: keep the old one until the new one is in place
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(staged, final)
    _fsync_path(save_dir)
    if save_latest:
        atomic_write_bytes(save_dir / "latest", lambda f: f.write(tag.encode()))
        _fsync_path(save_dir)
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
    ``(path, client_state)`` like DeepSpeed (collective)."""
    ds = _ds_engine(engine)
    bridge.attach(ds)
    tag, tag_dir = resolve_tag(load_dir, tag)
    manifest = read_manifest(tag_dir)
    parts = sharded_parts(ds.module)
    _check_parts(tag_dir, manifest, parts)
    pools = {name for name, part in parts.items() if not _is_head(part)}
    if pools:   # every rank's pool differs in size: DeepSpeed must not load rank 0's into the others
        if custom_load_fn is not None:
            raise ValueError("custom_load_fn is not supported for a model with an FFC class pool")
        custom_load_fn = _load_all_but(tuple(f"{name}." for name in pools), tag_dir)
    path, client_state = ds_files.load_engine(
        ds, tag_dir, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
        custom_load_fn=custom_load_fn)
    rank, world = _rank_world()
    with_optimizer = load_optimizer_states and not load_module_only
    for name, part in parts.items():
        entry, part_dir = manifest["parts"][name], tag_dir / SHARDS_DIR / name
        if _is_head(part):
            _load_head(part, part_dir, entry, with_optimizer)
        elif len(entry["ranges"]) == world:
            part.load_state_dict({k: v for k, v in _pool_shards(part_dir, entry, rank).items() if k != "range"})
        else:
            part.load_full_state(_pool_shards(part_dir, entry))
    _barrier()  # no rank moves on (and perhaps deletes or re-saves checkpoints) while another still reads
    return path, client_state


def _load_head(head, part_dir: Path, entry: dict, with_optimizer: bool) -> None:
    rows = read_rows(part_dir, entry, *head.class_range)
    with torch.no_grad():
        head.weight.copy_(rows["weight"].to(head.weight.dtype))
    optimizer = head.centers.optimizer
    if optimizer is not None:
        if with_optimizer and rows["hyper"] is not None:
            optimizer.load_state_dict(dict(rows["hyper"], state=rows["state"]))
        elif "master" in optimizer.state:
            optimizer.state["master"].copy_(head.weight.detach())
    head.sample_step = int(entry["sample_step"])
    head.rows_loaded()


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
    unchanged (loading converts its ZeRO state at the new world size)."""
    from .heads.sharded import shard_range

    tag, tag_dir = resolve_tag(src, tag)
    manifest = read_manifest(tag_dir)
    dst = Path(dst)
    staging_root = dst / f".staging-{tag}"
    shutil.rmtree(staging_root, ignore_errors=True)
    staged = staging_root / tag
    shutil.copytree(tag_dir, staged, ignore=shutil.ignore_patterns(SHARDS_DIR))
    (staged / SHARDS_DIR).mkdir()
    parts = {}
    bar = _progress(len(manifest["parts"]) * world_size, f"resharding to {world_size}", progress)
    for name, entry in manifest["parts"].items():
        size = entry["num_classes"] if entry["kind"] == "head" else entry["pool_size"]
        ranges = [list(shard_range(size, world_size, r)) for r in range(world_size)]
        parts[name] = dict(entry, ranges=ranges)
        src_dir, out = tag_dir / SHARDS_DIR / name, staged / SHARDS_DIR / name
        out.mkdir(parents=True)
        pool = _pool_shards(src_dir, entry) if entry["kind"] == "pool" else None
        for rank, (lo, hi) in enumerate(ranges):
            if pool is None:
                rows = read_rows(src_dir, entry, lo, hi)
                optimizer = dict(rows["hyper"], state=rows["state"]) if rows["hyper"] is not None else None
                state = {"range": [lo, hi], "weight": rows["weight"], "optimizer": optimizer}
            else:
                state = {"range": [lo, hi], "clock": pool["clock"],
                         **{k: pool[k][lo:hi] for k in ("features", "ids", "stamps")}}
            atomic_torch_save(state, out / shard_name(rank))
            bar.update(1)
    bar.close()
    new_manifest = dict(manifest, world_size=world_size, parts=parts)
    atomic_write_bytes(staged / SHARDS_DIR / MANIFEST, lambda f: f.write(json.dumps(new_manifest, indent=1).encode()))
    _publish(dst, staging_root, tag)
    return dst / tag


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
