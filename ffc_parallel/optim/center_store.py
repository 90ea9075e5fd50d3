"""Class rows off the device: one rank's centers, their fp32 master copy and their optimizer state in
host memory or in memory-mapped files on local disk; each step only the rows it uses are on the device.

A :class:`CenterStore` holds ``num_rows`` rows of every field of ``optim/row_layout.py`` (``weight``,
``master``, the optimizer's state, ``step``):

* tier ``"host"``: one ``[num_rows, width]`` tensor per field in host memory (pinned for a GPU head);
* tier ``"disk"``: per field, segment files of :data:`SEGMENT_BYTES` (``<field>.<segment>``) in a
  directory of the rank's own under the user's ``disk:/local/nvme/dir``, memory-mapped (``MAP_SHARED``).
  Pages a step touched are unmapped again after it (``MADV_DONTNEED``: the data stays in the page
  cache and the file), so the process's resident memory stays the working set, not the store.

:class:`~ffc_parallel.optim.resident_rows.ResidentRows` is the device side (the step's rows and the
one-step-ahead prefetch).

Snapshots (checkpoints) do not copy the store: :meth:`CenterStore.snapshot` flushes and then reflinks
(copy-on-write file systems: XFS, btrfs) or hard-links every segment into the checkpoint; a hard-linked
segment is copied to a new file of its own the next time training writes it, so the checkpoint keeps
the values it was saved with while training goes on.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import socket
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import torch

from ..distributed.init import before_exit
from . import row_layout, row_sets
from .row_layout import TIERS

SEGMENT_BYTES = 32 << 20   # bytes of one segment file of the weight field (copy-on-write granule)
# Bulk writes (init, checkpoint loads, copy-on-write) go to the file a page per call. Linux (6.x: ext4, XFS)
# caches one large write as large folios, and a later 64 KiB write into a 2 MiB folio dirties, and writes
# back, the whole folio: in the 1e8 scale run the disk wrote 1.9 GB per step and rank for 132 MB of rows.
PAGE_PIECES = mmap.PAGESIZE
_FICLONE = 0x40049409      # ioctl: reflink a whole file (Linux)


def segment_rows_for(width: int, dtype: torch.dtype) -> int:
    """Rows per segment file: :data:`SEGMENT_BYTES` of the weight field (every field uses the weight's count)."""
    return max(1, SEGMENT_BYTES // (width * dtype.itemsize))


def _remove_store(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    before_exit(directory)


_OWNER = "owner"   # in a store's directory: "<host> <pid> <process start time>" of the process that made it


def _start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot) of process ``pid``, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid())}"


def remove_stale_stores(directory: Path) -> list[str]:
    """Remove the store directories in ``directory`` left by processes of this host that are gone (a
    killed run: its finalizers never ran), so that a restarted run does not need the disk twice. A
    directory without an owner file, or of another host, is left alone. Returns the removed paths."""
    removed = []
    host = socket.gethostname()
    for path in directory.glob("ffc-centers-*"):
        try:
            owner_host, pid, started = (path / _OWNER).read_text().split()
        except (OSError, ValueError):
            continue
        if owner_host != host or _start_time(int(pid)) == started:
            continue
        size = sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        warnings.warn(f"center_storage: removed {path} ({size / 1e9:.2f} GB), the store of process {pid}, which "
                      f"is gone (killed before it could remove it)", stacklevel=3)
        removed.append(str(path))
    return removed


def parse_center_storage(spec) -> tuple[str, Path | None]:
    """``"device"`` / ``"host"`` / ``"disk:/dir"`` -> ``(tier, directory or None)``."""
    text = str(spec or "device")
    tier, _, where = text.partition(":")
    if tier not in TIERS or (tier == "disk") != bool(where.strip()):
        raise ValueError(f"center_storage must be 'device', 'host' or 'disk:/local/dir' (a directory on local disk, "
                         f"ideally NVMe), got {spec!r}")
    return tier, (Path(where.strip()).expanduser() if tier == "disk" else None)


def clone_file(src: Path, dst: Path) -> str:
    """Put ``src``'s content at ``dst`` without copying where the file system allows: ``"reflink"``
    (copy-on-write clone), ``"link"`` (a hard link: the caller must not write ``src`` in place again),
    else ``"copy"``."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
            return "reflink"
        except OSError:
            pass
    os.unlink(dst)
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


class _Segment:
    """One memory-mapped segment file ``[rows, width]`` of a field."""

    def __init__(self, path: Path, rows: int, width: int, dtype: torch.dtype, writable: bool = True):
        self.path, self.rows, self.width, self.dtype, self.writable = path, rows, width, dtype, writable
        self.shared = False   # hard-linked into a snapshot: copy before the next write
        self.touched = False  # pages mapped since the last release()
        self._open()

    def _open(self):
        nbytes = self.rows * self.width * self.dtype.itemsize
        flags = os.O_RDWR | os.O_CREAT if self.writable else os.O_RDONLY
        fd = os.open(self.path, flags, 0o644)
        try:
            if self.writable and os.fstat(fd).st_size < nbytes:
                os.ftruncate(fd, nbytes)   # a sparse file: zeros until written
            access = mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, nbytes, access=access)
            self._map.madvise(mmap.MADV_RANDOM)   # rows are scattered: no read-ahead
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # a read-only map: torch warns it is not writable
            self.tensor = torch.frombuffer(self._map, dtype=self.dtype).view(self.rows, self.width)

    def close(self):
        self.tensor = None
        self._map.close()

    def before_write(self):
        """Copy-on-write: a segment linked into a snapshot gets a file of its own first."""
        if self.shared:
            self.close()
            tmp = self.path.with_name(self.path.name + ".cow")
            _copy_segment(self.path, tmp)
            os.replace(tmp, self.path)
            self.shared = False
            self._open()

    def willneed(self, local: torch.Tensor) -> None:
        """Start reading the pages of sorted local rows ``local`` (``MADV_WILLNEED``, one call per run of
        adjacent pages). Under ``MADV_RANDOM`` each page otherwise faults in alone: one synchronous 4 KiB
        read at a time, which on a disk of a few thousand IOPS made a step's 132 MB of blocks take seconds."""
        if local.numel() == 0:
            return
        row, page = self.width * self.dtype.itemsize, mmap.PAGESIZE
        first = torch.div(local * row, page, rounding_mode="floor")
        last = torch.div(local * row + (row - 1), page, rounding_mode="floor")
        start = torch.ones_like(first, dtype=torch.bool)
        start[1:] = first[1:] > last[:-1] + 1
        at = start.nonzero().flatten()
        ends = torch.cat([last[at[1:] - 1], last[-1:]])
        size = len(self._map)
        for a, b in zip(first[at].tolist(), ends.tolist()):
            self._map.madvise(mmap.MADV_WILLNEED, a * page, min((b + 1) * page, size) - a * page)

    def willneed_bytes(self, offset: int, nbytes: int) -> None:
        """Start reading bytes ``[offset, offset + nbytes)`` of the file (``MADV_WILLNEED`` of their pages)."""
        page = mmap.PAGESIZE
        first = offset // page * page
        self._map.madvise(mmap.MADV_WILLNEED, first, min(offset + nbytes, len(self._map)) - first)

    def release(self):
        """Unmap the pages touched since the last call from this process (the data stays in the file)."""
        if self.touched:
            self._map.madvise(mmap.MADV_DONTNEED)
            self.touched = False


def _transfer(call, fd: int, path: Path, buffer, offset: int, piece: int | None = None) -> None:
    """``os.preadv`` / ``os.pwritev`` all of ``buffer`` at ``offset`` of the open file ``fd`` (``path``), in
    calls that do not cross a multiple of ``piece`` bytes when given (see :data:`PAGE_PIECES`)."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        size = len(view) - done
        if piece:
            size = min(size, piece - (offset + done) % piece)
        n = call(fd, [view[done:done + size]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: short {'read' if call is os.preadv else 'write'} at byte {offset + done}")
        done += n


def _transfer_file(call, path: Path, buffer, offset: int, piece: int | None = None) -> None:
    """:func:`_transfer` on the file ``path``, opened for this call only."""
    fd = os.open(path, os.O_RDONLY if call is os.preadv else os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _transfer(call, fd, path, buffer, offset, piece)
    finally:
        os.close(fd)


def _copy_segment(src: Path, dst: Path) -> None:
    """Copy a segment file in page-sized writes (:data:`PAGE_PIECES`) to the new file ``dst``."""
    data = bytearray(os.path.getsize(src))
    _transfer_file(os.preadv, src, data, 0)
    _transfer_file(os.pwritev, dst, data, 0, PAGE_PIECES)


class _DiskField:
    """A field ``[num_rows, width]`` as segment files ``<dir>/<name>.<k>`` of ``segment_rows`` rows."""

    def __init__(self, directory: Path, name: str, num_rows: int, width: int, dtype: torch.dtype,
                 segment_rows: int, writable: bool = True):
        self.name, self.num_rows, self.width, self.dtype, self.segment_rows = name, num_rows, width, dtype, segment_rows
        self.segments = [_Segment(directory / f"{name}.{k:05d}", min(segment_rows, num_rows - k * segment_rows),
                                  width, dtype, writable)
                         for k in range(-(-num_rows // segment_rows))]

    def _split(self, rows: torch.Tensor):
        """``(segment, slice of rows, local rows)`` for sorted ``rows``."""
        if rows.numel() == 0:
            return
        seg = torch.div(rows, self.segment_rows, rounding_mode="floor")
        first, last = int(seg[0]), int(seg[-1])
        bounds = torch.searchsorted(seg, torch.arange(first, last + 2)).tolist()
        for k, (a, b) in zip(range(first, last + 1), zip(bounds, bounds[1:])):
            if a < b:
                yield self.segments[k], slice(a, b), rows[a:b] - k * self.segment_rows

    def runs(self, rows: torch.Tensor, spans=None) -> tuple[list[tuple[int, int, int, int]], torch.Tensor | None]:
        """Sorted unique ``rows`` -> ``(runs, rest)``: ``runs`` are ``(segment, first, stop, byte offset)``
        of the runs of adjacent rows within a segment of at least ``row_layout.RUN_BYTES`` (positions
        ``first:stop`` of ``rows``); ``rest`` the positions of the other rows (None if there are none).
        ``spans``: ``row_sets.runs(rows, segment_rows)`` where the caller has it (a store's fields share it)."""
        row, size = self.width * self.dtype.itemsize, self.segment_rows
        firsts, lengths = spans if spans is not None else row_sets.runs(rows, size)
        long = lengths * row >= row_layout.RUN_BYTES
        short = ~long
        rest = row_sets.run_positions(firsts[short], lengths[short]) if bool(short.any()) else None
        firsts, lengths = firsts[long], lengths[long]
        starts = rows.index_select(0, firsts)
        seg = torch.div(starts, size, rounding_mode="floor")
        runs = list(zip(seg.tolist(), firsts.tolist(), (firsts + lengths).tolist(),
                        ((starts - seg * size) * row).tolist()))
        return runs, rest

    def _move(self, call, runs, raw) -> None:
        """``preadv``/``pwritev`` each run ``(segment, first, stop, offset)`` of ``raw`` (rows ``[n, row bytes]``)."""
        fd, at = None, None   # one open file per segment: the runs come sorted
        try:
            for k, a, b, offset in runs:
                if k != at:
                    if fd is not None:
                        os.close(fd)
                    fd, at = os.open(self.segments[k].path, os.O_RDONLY if call is os.preadv else os.O_WRONLY), k
                _transfer(call, fd, self.segments[k].path, raw[a:b], offset)
        finally:
            if fd is not None:
                os.close(fd)

    def read(self, rows: torch.Tensor, out: torch.Tensor, spans=None) -> None:
        """``out[i] = field[rows[i]]`` for sorted unique ``rows``: runs of adjacent rows (block sampling's
        blocks) by ``preadv`` straight into ``out``, the other rows through the mapping (``index_select``).
        ``spans``: see :meth:`runs`."""
        if rows.numel() == 0:
            return
        runs, rest = self.runs(rows, spans)
        row = self.width * self.dtype.itemsize
        for k, a, b, offset in runs:   # every read in flight before the first copy waits
            self.segments[k].willneed_bytes(offset, (b - a) * row)
        parts = list(self._split(rows if not runs else rows[rest])) if rest is not None else []
        for segment, part, local in parts:
            segment.willneed(local)
        self._move(os.preadv, runs, out.view(torch.uint8).numpy())
        for segment, part, local in parts:
            segment.touched = True
            if runs:
                out[rest[part]] = segment.tensor.index_select(0, local)
            else:
                torch.index_select(segment.tensor, 0, local, out=out[part])

    def write(self, rows: torch.Tensor, values: torch.Tensor, spans=None) -> None:
        """``field[rows[i]] = values[i]``: runs by ``pwritev``, the other rows through the mapping."""
        if rows.numel() == 0:
            return
        values = values.contiguous()
        runs, rest = self.runs(rows, spans)
        for k in sorted({k for k, *_ in runs}):
            self.segments[k].before_write()
        self._move(os.pwritev, runs, values.view(torch.uint8).numpy())
        if rest is not None:
            for segment, part, local in self._split(rows if not runs else rows[rest]):
                segment.before_write()
                segment.touched = True
                segment.tensor.index_copy_(0, local, values[rest[part]] if runs else values[part])

    def _ranges(self, start: int, stop: int):
        """``(segment, first local row, rows)`` of the segments holding rows ``[start, stop)``."""
        for k in range(start // self.segment_rows, -(-stop // self.segment_rows)):
            segment, lo = self.segments[k], k * self.segment_rows
            a, b = max(start, lo), min(stop, lo + segment.rows)
            yield segment, a - lo, a - start, b - a

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` by ``preadv`` (whole runs of pages, no page faults of the mapping)."""
        out = torch.empty(stop - start, self.width, dtype=self.dtype)
        raw, row = out.view(-1).view(torch.uint8).numpy(), self.width * self.dtype.itemsize
        for segment, local, at, n in self._ranges(start, stop):
            _transfer_file(os.preadv, segment.path, raw[at * row:(at + n) * row], local * row)
        return out

    def write_range(self, start: int, values: torch.Tensor, piece: int | None = PAGE_PIECES) -> None:
        """Rows ``[start, start + len(values))`` by ``pwritev`` (after copy-on-write of linked segments), a
        page per call unless ``piece`` is None (files training will not write again: snapshots)."""
        values = values.contiguous()
        raw, row = values.view(-1).view(torch.uint8).numpy(), self.width * self.dtype.itemsize
        for segment, local, at, n in self._ranges(start, start + values.shape[0]):
            segment.before_write()
            _transfer_file(os.pwritev, segment.path, raw[at * row:(at + n) * row], local * row, piece)

    def release(self):
        for segment in self.segments:
            segment.release()

    def close(self):
        for segment in self.segments:
            segment.close()


class _HostField:
    """A field ``[num_rows, width]`` as one host tensor."""

    def __init__(self, num_rows: int, width: int, dtype: torch.dtype, pin: bool):
        self.tensor = torch.zeros(num_rows, width, dtype=dtype, pin_memory=pin)
        self.width, self.dtype = width, dtype

    def read(self, rows, out, spans=None):   # spans: unused, a host field indexes its rows directly
        torch.index_select(self.tensor, 0, rows, out=out)

    def write(self, rows, values, spans=None):
        self.tensor.index_copy_(0, rows, values)

    def read_range(self, start, stop):
        return self.tensor[start:stop].clone()

    def write_range(self, start, values):
        self.tensor[start: start + values.shape[0]] = values

    def release(self):
        pass

    def close(self):
        self.tensor = None


def reusable_buffer(buffers: dict | None, name: str, shape: tuple, dtype: torch.dtype,
                    pinned: bool = False) -> torch.Tensor | None:
    """``buffers[name]`` when it is a contiguous CPU tensor of ``shape`` and ``dtype`` (and pinned, if
    ``pinned``), else None."""
    t = (buffers or {}).get(name)
    if t is None or t.device.type != "cpu" or tuple(t.shape) != shape or t.dtype != dtype:
        return None
    return t if t.is_contiguous() and (not pinned or t.is_pinned()) else None


class CenterStore:
    """``num_rows`` rows of named fields (``optim/row_layout.py``) on tier ``"host"`` or ``"disk"``.

    ``read(rows)`` / ``write(rows, values)`` move the rows (sorted unique int64 ids, CPU) of every field
    at once; ``bytes_read`` / ``bytes_written`` count them. ``directory``: for the disk tier, the user's
    directory; this store makes (and removes when closed) a directory of its own inside it.
    """

    def __init__(self, tier: str, num_rows: int, directory: Path | None = None, pin: bool = False,
                 label: str = "rank0"):
        if tier not in ("host", "disk"):
            raise ValueError(f"a CenterStore is for the host or disk tier, not {tier!r}")
        self.tier, self.num_rows, self.pin = tier, int(num_rows), pin
        self.fields: dict[str, object] = {}
        self.bytes_read = self.bytes_written = 0
        self.lock = threading.Lock()   # the prefetch thread reads while the step may release pages
        self.directory = None
        if tier == "disk":
            try:
                directory.mkdir(parents=True, exist_ok=True)
                remove_stale_stores(directory)
                self.directory = Path(tempfile.mkdtemp(prefix=f"ffc-centers-{label}-", dir=directory))
                (self.directory / _OWNER).write_text(_owner())
            except OSError as exc:
                raise OSError(f"center_storage='disk:{directory}': cannot create the store's directory there "
                              f"({exc}); give a writable directory on local disk") from exc
            self._cleanup = weakref.finalize(self, _remove_store, str(self.directory))
            before_exit(str(self.directory), self._cleanup)

    def add(self, name: str, dtype: torch.dtype, width: int) -> None:
        """A new field of zeros (sparse files on disk: they cost no space until written)."""
        if name in self.fields:
            return
        if self.tier == "host":
            self.fields[name] = _HostField(self.num_rows, width, dtype, self.pin)
        else:
            weight = self.fields.get("weight")
            segment_rows = weight.segment_rows if weight is not None else segment_rows_for(width, dtype)
            self.fields[name] = _DiskField(self.directory, name, self.num_rows, width, dtype, segment_rows)

    @property
    def nbytes(self) -> int:
        """Bytes of every field of every row (the store's size)."""
        return sum(self.num_rows * f.width * f.dtype.itemsize for f in self.fields.values())

    @property
    def row_bytes(self) -> int:
        return sum(f.width * f.dtype.itemsize for f in self.fields.values())

    def read(self, rows: torch.Tensor, names=None, into: dict | None = None) -> dict[str, torch.Tensor]:
        """``{field: [R, width]}`` (CPU, pinned for a GPU head) of ``rows``; a field's rows go into
        ``into[field]`` where that is a CPU tensor of this shape and dtype (a buffer reused: its pages
        are mapped already), else into a new tensor."""
        out, spans = {}, self._spans(rows)
        with self.lock:
            for name in names or self.fields:
                f = self.fields[name]
                buffer = reusable_buffer(into, name, (rows.numel(), f.width), f.dtype, self.pin)
                out[name] = buffer if buffer is not None else \
                    torch.empty(rows.numel(), f.width, dtype=f.dtype, pin_memory=self.pin)
                f.read(rows, out[name], spans)
                self.bytes_read += out[name].nbytes
        return out

    def write(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        spans = self._spans(rows)
        with self.lock:
            for name, value in values.items():
                self.fields[name].write(rows, value.to(device="cpu", dtype=self.fields[name].dtype).reshape(rows.numel(), -1),
                                        spans)
                self.bytes_written += value.nbytes

    def _spans(self, rows: torch.Tensor):
        """The runs of ``rows`` within the disk tier's segments, computed once for every field (their
        segments hold the same rows); None where a field splits them itself."""
        sizes = {getattr(f, "segment_rows", None) for f in self.fields.values()}
        if len(sizes) != 1 or None in sizes or rows.numel() == 0:
            return None
        return row_sets.runs(rows, sizes.pop())

    def read_range(self, start: int, stop: int, names=None) -> dict[str, torch.Tensor]:
        """``{field: rows [start, stop)}`` of the fields ``names`` (default: every field)."""
        with self.lock:
            return self.read_range_unlocked(start, stop, names)

    def write_range(self, start: int, values: dict[str, torch.Tensor]) -> None:
        with self.lock:
            for name, value in values.items():
                self.fields[name].write_range(start, value.to(self.fields[name].dtype).reshape(value.shape[0], -1))

    def release(self) -> None:
        """Unmap what the last reads and writes touched (disk tier; the data stays in the files)."""
        with self.lock:
            for f in self.fields.values():
                f.release()

    def snapshot(self, dest: Path) -> dict:
        """Every field as segment files in ``dest`` (created): for the disk tier the store's own segments,
        flushed, then reflinked or hard-linked (copied only where neither works); for the host tier
        written out. ``{"layout": ..., "files": [names], "how": {"reflink"/"link"/"copy": files}}``."""
        dest.mkdir(parents=True, exist_ok=True)
        layout = self.layout()
        if self.tier == "host":
            step = layout["segment_rows"]
            with self.lock:
                blocks = ((lo, self.read_range_unlocked(lo, min(lo + step, self.num_rows)))
                          for lo in range(0, self.num_rows, step))
                files = write_snapshot(dest, layout, blocks)
            return {"layout": layout, "files": files, "how": {"reflink": 0, "link": 0, "copy": len(files)}}
        how, files = {"reflink": 0, "link": 0, "copy": 0}, []
        with self.lock:
            for f in self.fields.values():
                for segment in f.segments:
                    segment._map.flush()
                    kind = clone_file(segment.path, dest / segment.path.name)
                    segment.shared = segment.shared or kind == "link"
                    how[kind] += 1
                    files.append(segment.path.name)
        return {"layout": layout, "files": files, "how": how}

    def read_range_unlocked(self, start: int, stop: int, names=None) -> dict[str, torch.Tensor]:
        return {name: self.fields[name].read_range(start, stop) for name in names or self.fields}

    def layout(self) -> dict:
        """What a reader needs to open a snapshot: rows, rows per segment, and each field's dtype and width."""
        weight = self.fields["weight"]
        segment_rows = getattr(weight, "segment_rows", segment_rows_for(weight.width, weight.dtype))
        return {"num_rows": self.num_rows, "segment_rows": segment_rows,
                "fields": {n: [str(f.dtype).replace("torch.", ""), f.width] for n, f in self.fields.items()}}

    def close(self) -> None:
        for f in self.fields.values():
            f.close()
        self.fields = {}
        if self.directory is not None:
            self._cleanup()


def open_snapshot(directory: Path, layout: dict) -> dict[str, _DiskField]:
    """The fields of a snapshot written by :meth:`CenterStore.snapshot`, memory-mapped read-only."""
    return {name: _DiskField(Path(directory), name, layout["num_rows"], width, getattr(torch, dtype),
                             layout["segment_rows"], writable=False)
            for name, (dtype, width) in layout["fields"].items()}


def write_snapshot(directory: Path, layout: dict, blocks) -> list[str]:
    """Write a snapshot from ``blocks`` (an iterable of ``(start, {field: rows})``) in ``layout``; returns
    the file names (for offline resharding)."""
    directory.mkdir(parents=True, exist_ok=True)
    fields = {name: _DiskField(directory, name, layout["num_rows"], width, getattr(torch, dtype), layout["segment_rows"])
              for name, (dtype, width) in layout["fields"].items()}
    try:
        for start, values in blocks:
            for name, value in values.items():
                fields[name].write_range(start, value.to(fields[name].dtype).reshape(value.shape[0], -1),
                                         piece=None)
        return [s.path.name for f in fields.values() for s in f.segments]
    finally:
        for f in fields.values():
            for s in f.segments:
                s._map.flush()
            f.close()
