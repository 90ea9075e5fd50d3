"""The files of a checkpoint: atomic writes, the table of every file's size and sha256 that the manifest
carries, its verification, and the rule that a fault on one rank is an error on every rank: each rank
reports what it wrote or failed to write, one small collective (:func:`gather`) tells every rank, and
every rank raises the same :class:`CheckpointError`, naming the file, the rank and, for a full disk,
the space the checkpoint needs.

sha256 and not a faster checksum: on the development machine (AMD EPYC with SHA extensions, one core,
a 1 GiB file in the page cache, 8 MiB reads) sha256 runs at 0.9 GB/s and zlib's crc32 at 1.3 GB/s, so a
weaker checksum would save little. A save hashes each file on the rank that wrote it, right after
writing it; a load shares the files out over the ranks by size. A 680 MB 2-rank checkpoint: 0.45 s of
hashing in a 2.7 s save, 0.67 s of verification in a 4.0 s load (``docs/reliability.md``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

SHARDS_DIR, MANIFEST = "ffc_shards", "manifest.json"
MANIFEST_PATH = f"{SHARDS_DIR}/{MANIFEST}"      # relative to a tag directory; the one file not in the table
TABLE = "files"                                  # manifest key: {relative path: {"size": bytes, "sha256": hex}}
_CHUNK = 8 << 20
_HEADERS = 3000                                  # bytes of metadata in a torch.save file
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; raised with the same message on every rank."""


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``, ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj) -> list:
    """Every rank's ``obj`` (small, picklable) in rank order: one ``all_gather_object``, or ``[obj]``
    without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of ``exc``, then of the exceptions it was raised during or from (torch's
    ``unexpected pos`` hides the ``No space left on device`` or ``iostream error`` behind it); each
    message on one line, cut at 200 characters."""
    parts, seen, link = [], set(), exc
    while link is not None and id(link) not in seen and len(parts) < 3:
        seen.add(id(link))
        text = " ".join(str(link).split())
        parts.append(f"{type(link).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}")
        link = link.__cause__ or link.__context__
    return " <- ".join(parts)


def by_rank(messages: list) -> str:
    """``"rank 1: ...; ranks 0, 2: ..."`` for the ranks whose entry of ``messages`` is not None."""
    grouped = {}
    for rank, message in enumerate(messages):
        if message:
            grouped.setdefault(message, []).append(str(rank))
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {message}"
                     for message, ranks in grouped.items())


# ---------------------------------------------------------------------- writing
def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Remove the file ``path`` if it can be removed."""
    with contextlib.suppress(OSError):
        Path(path).unlink()


def atomic_write_bytes(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, fsync, then rename over ``path``; on any failure ``path.tmp``
    is removed and ``path`` left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write_bytes`."""
    atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))


def saved_bytes(obj) -> int:
    """About the bytes ``torch.save(obj)`` writes: every tensor storage inside ``obj`` (nested dicts,
    lists, tuples) once, plus 3 kB of pickle and zip headers (a 2-rank ZeRO-1 checkpoint of this format:
    estimate 18.0 kB for 18.1 kB written, 977 kB for 977 kB)."""
    seen, total, stack = set(), _HEADERS, [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def no_space(exc: BaseException, path: Path, nbytes: int) -> bool:
    """Whether writing ``nbytes`` to ``path`` failed for want of space: ENOSPC or EDQUOT in the
    exception's chain, or, when the chain holds no errno at all (torch's ``unexpected pos`` and
    ``basic_ios::clear: iostream error``), less space left on its file system than the write needed
    (so: checked before the partial file is removed)."""
    seen, link = set(), exc
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno is not None:
            return link.errno in _NO_SPACE
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < max(nbytes, 1)
    except OSError:
        return False


def no_space_message(where: Path, nbytes: int, what: str, detail: str) -> str:
    """``"no space left on WHERE, needed about N MB for WHAT (DETAIL)"``, N rounded up to 0.1 MB (10^5 bytes)."""
    return f"no space left on {where}, needed about {math.ceil(nbytes / 1e5) / 10:,.1f} MB for {what} ({detail})"


class Writes:
    """One rank's file writes of a save: ``writes(path, state, write)`` runs ``write()`` (which writes
    ``state`` to ``path``) unless an earlier write of this rank failed, then records the file's table
    entry; a failure is recorded, never raised, and its partial file removed, so every rank reaches the
    collective that follows. The bytes of every ``state`` are counted, written or not."""

    def __init__(self, tag_dir: Path):
        self.tag_dir, self.bytes, self.files = Path(tag_dir), 0, {}
        self.error, self.no_space = None, False

    def __call__(self, path: Path, state, write) -> None:
        path, nbytes = Path(path), saved_bytes(state)
        self.bytes += nbytes
        if self.error is not None:
            return
        try:
            write()
            self.files[path.relative_to(self.tag_dir).as_posix()] = hash_file(path)
        except Exception as exc:
            self.fail(f"could not write {path}: {describe(exc)}", no_space(exc, path, nbytes))
            remove_quietly(path)

    def fail(self, message: str, no_space_left: bool = False) -> None:
        """Record this rank's first failure (later ones add nothing)."""
        if self.error is None:
            self.error, self.no_space = message, no_space_left

    def report(self) -> dict:
        """What :func:`gather` sends: the failure, whether it was a full disk, the bytes, the table entries."""
        return {"error": self.error, "no_space": self.no_space, "bytes": self.bytes, "files": self.files}


def save_failure(reports: list, save_dir: Path, tag: str) -> str | None:
    """The message of a failed save from every rank's :meth:`Writes.report` (None: nothing failed)."""
    detail = by_rank([r["error"] for r in reports])
    if not detail:
        return None
    if any(r["no_space"] for r in reports):
        return no_space_message(save_dir, sum(r["bytes"] for r in reports), f"checkpoint {tag!r}", detail)
    return f"saving checkpoint {tag!r} into {save_dir} failed ({detail})"


# ---------------------------------------------------------------------- the table and its verification
def hash_file(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex digest}`` of the file at ``path``."""
    digest, size, buf = hashlib.sha256(), 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return {"size": size, "sha256": digest.hexdigest()}


def list_files(tag_dir: Path) -> list:
    """Every file under ``tag_dir`` but the manifest, as sorted relative posix paths."""
    tag_dir = Path(tag_dir)
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.relative_to(tag_dir).as_posix() != MANIFEST_PATH)


def check_file(path: Path, expected: dict | None) -> str | None:
    """What is wrong with ``path`` (None: nothing): against its table entry, or, with no entry (a
    checkpoint from before the table), whether a torch.save zip file still ends in its directory."""
    try:
        if expected is None:
            with open(path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            if zipped:
                zipfile.ZipFile(path).close()
            return None
        size = path.stat().st_size
        if size != expected["size"]:
            how = "truncated" if size < expected["size"] else "longer than saved"
            return f"{path}: {size} bytes, expected {expected['size']} ({how})"
        found = hash_file(path)["sha256"]
        if found != expected["sha256"]:
            return f"{path}: sha256 {found}, expected {expected['sha256']} (same size, contents changed)"
    except FileNotFoundError:
        return f"{path}: missing" + (f" (expected {expected['size']} bytes)" if expected else "")
    except zipfile.BadZipFile as exc:
        return f"{path}: not a complete torch.save file ({exc}; truncated?)"
    except OSError as exc:
        return f"{path}: unreadable ({exc})"
    return None


def _share(sizes: dict, rank: int, world: int) -> list:
    """This rank's files of ``{path: size}``: largest first, each to the least-loaded rank."""
    loads, mine = [0] * world, []
    for path, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        owner = loads.index(min(loads))
        loads[owner] += max(size, 1)
        if owner == rank:
            mine.append(path)
    return mine


def verify_checkpoint(tag_dir: Path, manifest: dict, collective: bool = True) -> None:
    """Check every file of ``tag_dir`` against the manifest's table (size, then sha256), the files shared
    out over the ranks by size; raise :class:`CheckpointError` naming every bad file on every rank
    (``collective``: one all_gather; otherwise this process checks every file). A checkpoint saved before
    the table is verified only for truncated torch.save files, with a warning."""
    tag_dir = Path(tag_dir)
    rank, world = rank_world() if collective else (0, 1)
    table = manifest.get(TABLE)
    if table is None:
        warnings.warn(f"{tag_dir / MANIFEST_PATH} has no table of file sizes and checksums (saved by an older "
                      "ffc_parallel): only truncated torch.save files are detected; save it again to add one")
        table = dict.fromkeys(list_files(tag_dir))
    sizes = {path: (entry or {}).get("size", 1) for path, entry in table.items()}
    problems = [p for path in _share(sizes, rank, world) if (p := check_file(tag_dir / path, table[path]))]
    problems = sorted(sum(gather(problems) if collective else [problems], []))
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged ({len(problems)} bad file"
                              f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems))
