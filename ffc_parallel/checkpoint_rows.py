"""A head's rows in a checkpoint: one shard per saved rank, in either of two formats, read at any range.

* ``shard_<rank>.pt``: ``{"range", "weight": [n, D], "optimizer": hyperparameters + per-row state}``
  (a head whose rows are on the device);
* a stored head (``center_storage`` host or disk): ``shard_<rank>.pt`` holds ``{"range", "store": segment
  layout, "optimizer": hyperparameters}`` and ``shard_<rank>.rows/`` the store's segment files, linked
  from a disk store (nothing copied) or written out from a host store.

:func:`read_rows` assembles any range of rows from either format, so loading and resharding work at any
world size, from and into any storage tier; stored heads are loaded and resharded block by block.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .checkpoint_files import CheckpointError, Writes, atomic_torch_save, describe, hash_file, no_space, rank_world
from .optim.center_store import open_snapshot, segment_rows_for, write_snapshot


def shard_name(rank: int) -> str:
    return f"shard_{rank:05d}.pt"


def read_shard(path: Path, mmap: bool = False) -> dict:
    """``torch.load`` of one class shard; a :class:`CheckpointError` naming the file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"could not read {path}: {describe(exc)}") from exc


def read_rows(part_dir: Path, entry: dict, start: int, stop: int) -> dict:
    """A head's rows ``[start, stop)`` assembled from the saved shards that overlap them:
    ``{"weight": [stop-start, D], "state": optimizer state rows, "hyper": optimizer hyperparameters}``
    (shards of a stored head are read from their segment files, memory-mapped)."""
    pieces, states, hyper = [], {}, None
    for rank, (lo, hi) in enumerate(entry["ranges"]):
        a, b = max(lo, start), min(hi, stop)
        if a >= b and (hyper is not None or rank > 0):
            continue
        path = Path(part_dir) / shard_name(rank)
        shard = read_shard(path, mmap=True)
        optimizer = shard["optimizer"]
        if hyper is None and optimizer is not None:
            hyper = {k: v for k, v in optimizer.items() if k != "state"}
        if a >= b:
            continue
        if shard.get("store") is not None:
            fields = open_snapshot(rows_dir_of(path), shard["store"])
            try:
                values = {name: f.read_range(a - lo, b - lo) for name, f in fields.items()}
            finally:
                for f in fields.values():
                    f.close()
            pieces.append(values.pop("weight"))
            for key, value in values.items():
                states.setdefault(key, []).append(value.view(-1) if key == "step" else value)
            continue
        pieces.append(shard["weight"][a - lo: b - lo].clone())
        for key, value in (optimizer or {}).get("state", {}).items():
            states.setdefault(key, []).append(value[a - lo: b - lo].clone())
    weight = torch.cat(pieces) if pieces else torch.empty(0, entry["embedding_dim"], dtype=getattr(torch, entry["dtype"]))
    return {"weight": weight, "state": {k: torch.cat(v) for k, v in states.items()}, "hyper": hyper}


def save_stored_head(head, path: Path, writes: Writes) -> None:
    """A head whose rows live in a store: its segment files linked (not copied) into ``<shard>.rows/``,
    each entered in the table, then the shard file with the range, the store's layout and the optimizer's
    hyperparameters. Training may go on writing the store: linked segments are copied before that."""
    rows_dir, store = rows_dir_of(path), head.centers.store
    layout = None
    if writes.error is None:
        try:
            snapshot = store.snapshot(rows_dir)
            layout = snapshot["layout"]
            segments = [rows_dir / name for name in snapshot["files"]]
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:   # sha256 frees the GIL
                for segment, entry in zip(segments, pool.map(hash_file, segments)):
                    writes.files[segment.relative_to(writes.tag_dir).as_posix()] = entry
            writes.bytes += store.nbytes if snapshot["how"]["copy"] else 0
        except Exception as exc:
            writes.fail(f"could not snapshot the center store of rank {rank_world()[0]} into {rows_dir}: {describe(exc)}",
                        no_space(exc, rows_dir, store.nbytes))
    optimizer = head.centers.optimizer
    hyper = {k: v for k, v in optimizer.state_dict().items() if k != "state"} if optimizer is not None else None
    state = {"range": list(head.class_range), "store": layout, "optimizer": hyper}
    writes(path, state, lambda: atomic_torch_save(state, path))


def rows_dir_of(shard_path: Path) -> Path:
    """The directory of a stored head's segment files next to its shard file."""
    return Path(shard_path).with_suffix(".rows")


def load_head(head, part_dir: Path, entry: dict, with_optimizer: bool) -> None:
    optimizer = head.centers.optimizer
    if head.offloaded:
        _load_stored_head(head, part_dir, entry, with_optimizer)
    else:
        rows = read_rows(part_dir, entry, *head.class_range)
        with torch.no_grad():
            head.weight.copy_(rows["weight"].to(head.weight.dtype))
        if optimizer is not None:
            if with_optimizer and rows["hyper"] is not None:
                optimizer.load_state_dict(dict(rows["hyper"], state=rows["state"]))
            elif "master" in optimizer.state:
                optimizer.state["master"].copy_(head.weight.detach())
    head.sample_step = int(entry["sample_step"])
    head.rows_loaded()


def _load_stored_head(head, part_dir: Path, entry: dict, with_optimizer: bool, block: int = 1 << 18) -> None:
    """Rows into a head's store, ``block`` rows at a time (never the whole shard in memory)."""
    store, optimizer = head.centers.store, head.centers.optimizer
    start, stop = head.class_range
    hyper = None
    for lo in range(start, stop, block):
        hi = min(lo + block, stop)
        rows = read_rows(part_dir, entry, lo, hi)
        hyper = rows["hyper"]
        values = {"weight": rows["weight"]}
        if with_optimizer and hyper is not None:
            values.update({k: v for k, v in rows["state"].items() if k in store.fields})
        if "master" in store.fields and "master" not in values:
            values["master"] = rows["weight"].float()
        store.write_range(lo - start, values)
    if optimizer is not None and with_optimizer and hyper is not None:
        optimizer.load_state_dict(dict(hyper, state={}))
    head.centers.resident.reset()


def reshard_stored_rows(src_dir: Path, entry: dict, lo: int, hi: int, path: Path, block: int = 1 << 18) -> dict:
    """Rows ``[lo, hi)`` of a stored head as the segment files of shard ``path``, ``block`` rows at a
    time; returns the shard file's content."""
    first = read_rows(src_dir, entry, lo, min(hi, lo + 1))
    fields = {"weight": first["weight"], **first["state"]}
    width = {k: (v.shape[1] if v.dim() == 2 else 1) for k, v in fields.items()}
    layout = {"num_rows": hi - lo, "segment_rows": segment_rows_for(width["weight"], fields["weight"].dtype),
              "fields": {k: [str(v.dtype).replace("torch.", ""), width[k]] for k, v in fields.items()}}

    def blocks():
        for a in range(lo, hi, block):
            rows = read_rows(src_dir, entry, a, min(hi, a + block))
            yield a - lo, {"weight": rows["weight"], **rows["state"]}

    write_snapshot(rows_dir_of(path), layout, blocks())
    return {"range": [lo, hi], "store": layout, "optimizer": first["hyper"]}
