"""insightface-style MXNet RecordIO face data (``train.rec`` + ``train.idx``: MS1MV2, Glint360K, WebFace),
read and written without mxnet.

Container (dmlc-core RecordIO): each record is ``uint32 magic 0xced7230a``, ``uint32 lrec`` (top 3 bits:
continuation flag, low 29 bits: length), the payload, zero padding to 4 bytes. A payload that contains
the magic word at a 4-byte-aligned offset is split there into parts (flags 1 = first, 2 = middle,
3 = last) and the magic word is re-inserted between parts on reading. ``train.idx`` holds
``key<TAB>byte offset`` lines.

Payload (MXNet ``recordio.pack``): a 24-byte header ``struct 'IfQQ'`` = (flag, label, id, id2); when
``flag > 0`` the label is instead ``flag`` float32 values following the header; then the encoded image.

insightface layout: record 0 has ``flag = 2`` and label ``(a, b)``; records ``1 .. a-1`` are images whose
label (first value) is the identity; records ``a .. b-1`` are one per identity, label ``(first, end)``
= its image keys. Files without record 0's ranges are read by scanning every image record's label.
Record 0's counts are checked against the file when it is opened: no record past the identity records,
identity records without images, every image in exactly one identity range, the first record of each range
an image, and no two ranges starting with images of the same label (one read per identity); a mismatch is
refused naming the file and the record.

Exact integers: float32 holds every integer below 2^24 = 16,777,216 exactly and no longer tells larger
ones from their neighbours (16,777,216 and 16,777,217 are the same float32). :func:`pack` writes an
integer label value of 2^24 or more as NaN and keeps the exact value in the header's uint64 fields:
the first label value in ``id2``, the second in ``id``. Readers that only know the float32 label
(insightface, MXNet) cannot use a NaN label: ``int(header.label[0])`` raises instead of merging
identities, and :func:`write_face_recordio` makes record 0's label NaN whenever any value of the file
needs the exact fields, so such readers refuse the whole file when they open it. Our reader takes a
NaN value from its exact field and refuses a float32 value of 2^24 or more without one (an old file
whose identities or keys float32 cannot hold), naming the file and the record.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from .imagefolder import BadImages, decode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1
FLOAT32_EXACT = 1 << 24  # float32 holds every integer of smaller magnitude exactly


class AmbiguousLabel(ValueError):
    """A float32 label value of 2^24 or more without its exact copy: it may stand for a neighbour."""


def pack(label, payload: bytes, record_id: int = 0, *, nan_labels: bool = False) -> bytes:
    """MXNet ``recordio.pack``: header + payload; ``label`` a number or a sequence of numbers.

    An integer value of 2^24 or more (and with ``nan_labels`` every value) is written as a NaN label
    with the exact value in ``id2`` (first value) or ``id`` (second value); see the module docstring.
    """
    values = [label] if np.ndim(label) == 0 else list(label)
    floats, exact = [], [0, record_id]   # exact = (id2, id)
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"label value {v} (position {i}) is not finite: a NaN label marks an exact value")
        integral = isinstance(v, (int, np.integer)) or float(v).is_integer()
        if integral and (nan_labels or abs(v) >= FLOAT32_EXACT):
            if i > 1 or v < 0 or (i == 1 and record_id):
                raise ValueError(f"label value {v} (position {i}) needs an exact uint64 field: only the first two "
                                 f"non-negative values have one, and the second takes the place of record_id")
            floats.append(math.nan)
            exact[i] = int(v)
        else:
            floats.append(float(v))
    if np.ndim(label) == 0:
        return _HEADER.pack(0, floats[0], exact[1], exact[0]) + payload
    return _HEADER.pack(len(floats), 0.0, exact[1], exact[0]) + np.asarray(floats, dtype="<f4").tobytes() + payload


def unpack(record: bytes) -> tuple[np.ndarray, bytes]:
    """``(label as float32 array [flag or 1], payload)`` of one packed record (MXNet's view: NaN where
    :func:`pack` stored an exact value)."""
    flag, label, _, _ = _HEADER.unpack_from(record)
    body = record[_HEADER.size:]
    if flag > 0:
        return np.frombuffer(body[: 4 * flag], dtype="<f4").copy(), body[4 * flag:]
    return np.array([label], dtype=np.float32), body


def unpack_ints(record: bytes) -> tuple[list[int], bytes]:
    """``(first two label values (or one) as exact integers, payload)`` of one packed record.

    Raises :class:`AmbiguousLabel` for a float32 value of 2^24 or more (float32 cannot tell it from its
    neighbours) and ``ValueError`` for a value that is no integer."""
    _, _, id1, id2 = _HEADER.unpack_from(record)
    floats, payload = unpack(record)
    values = []
    for i, v in enumerate(floats[:2].tolist()):
        if math.isnan(v):
            values.append((id2, id1)[i])
        elif not math.isfinite(v) or not v.is_integer():
            raise ValueError(f"label value {v} is not an integer identity or key")
        elif abs(v) >= FLOAT32_EXACT:
            raise AmbiguousLabel(f"float32 label value {v:.0f} is ambiguous: float32 holds integers exactly "
                                 f"only below 2^24 = {FLOAT32_EXACT:,}, so neighbouring identities or keys share "
                                 f"it (the file was written without exact labels: write it again from the original "
                                 f"labels with ffc_parallel.data.write_face_recordio or recordio.pack, which keep "
                                 f"them)")
        else:
            values.append(int(v))
    return values, payload


def _encode_parts(data: bytes) -> bytes:
    """The container bytes of one record, split where the magic word sits at an aligned offset."""
    out, start = [], 0
    for pos in range(0, len(data) - 3, 4):
        if data[pos: pos + 4] == _MAGIC_BYTES:
            out += [_MAGIC_BYTES, struct.pack("<I", ((1 if start == 0 else 2) << 29) | (pos - start)),
                    data[start:pos]]
            start = pos + 4
    tail = len(data) - start
    out += [_MAGIC_BYTES, struct.pack("<I", ((3 if start else 0) << 29) | tail), data[start:],
            b"\0" * (-tail % 4)]
    return b"".join(out)


class RecordIOWriter:
    """Write ``.rec`` + ``.idx`` files: ``write(key, packed_record)`` (see :func:`pack`), then ``close()``."""

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self._rec, self._idx = open(self.rec_path, "wb"), open(self.idx_path, "w")

    def write(self, key: int, record: bytes) -> None:
        if len(record) > _LEN_MASK:
            raise ValueError(f"record of {len(record)} bytes exceeds the RecordIO limit of {_LEN_MASK}")
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(_encode_parts(record))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_face_recordio(rec_path, images: list[bytes], labels) -> None:
    """Write encoded ``images`` with integer identity ``labels`` in insightface's layout (record 0 with
    identity ranges, images grouped by identity, one record per identity); every identity and key is
    stored exactly (see the module docstring), record 0's label is NaN when one of them is 2^24 or more."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    identities = np.unique(labels)
    first_id_key = len(images) + 1
    end_key = first_id_key + len(identities)
    big = end_key > FLOAT32_EXACT or (len(labels) and np.abs(labels).max() >= FLOAT32_EXACT)
    with RecordIOWriter(rec_path) as w:
        w.write(0, pack([first_id_key, end_key], b"", nan_labels=bool(big)))
        for key, i in enumerate(order, start=1):
            w.write(key, pack(int(labels[i]), images[i], key))
        sorted_labels = labels[order]
        for n, identity in enumerate(identities):
            lo = int(np.searchsorted(sorted_labels, identity, side="left")) + 1
            hi = int(np.searchsorted(sorted_labels, identity, side="right")) + 1
            w.write(first_id_key + n, pack([lo, hi], b""))


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``; ``read(key) -> bytes``.

    Opening checks the index against the file: duplicate keys, and offsets or a last record that lie past
    the end of the ``.rec`` (truncated copy, or the ``.idx`` of another file), are refused naming the record.
    """

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file {p} not found (need train.rec and train.idx side by side)")
        self.offsets = {}
        with open(self.idx_path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    parts = line.split("\t")
                    try:
                        key, offset = int(parts[0]), int(parts[1])
                        if len(parts) != 2 or offset < 0:
                            raise ValueError
                    except (ValueError, IndexError):
                        raise ValueError(f"{self.idx_path}:{n}: expected 'key<TAB>offset', got {line.strip()!r}") \
                            from None
                    if self.offsets.setdefault(key, offset) != offset:
                        raise ValueError(f"{self.idx_path}:{n}: key {key} appears twice (offsets "
                                         f"{self.offsets[key]} and {offset})")
        self.keys = sorted(self.offsets)
        self._file, self._pid = None, None
        self._check_extent()

    def _check_extent(self) -> None:
        if not self.offsets:
            return
        size = self.rec_path.stat().st_size
        last = max(self.offsets, key=self.offsets.get)
        if self.offsets[last] + 8 > size:
            raise ValueError(f"{self.rec_path}: record {last} starts at byte {self.offsets[last]:,}, past the end of "
                             f"the file ({size:,} bytes): the .rec is truncated or {self.idx_path.name} belongs to "
                             f"another file")
        self.read(last)   # the last record must end inside the file too

    def _handle(self):
        if self._file is None or self._pid != os.getpid():  # one handle per DataLoader worker
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._file

    def read(self, key: int) -> bytes:
        if key not in self.offsets:
            raise KeyError(f"{self.rec_path}: record {key} is not in {self.idx_path}")
        f = self._handle()
        f.seek(self.offsets[key])
        parts = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.rec_path}: record {key} ends past the end of the file (truncated .rec?)")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"{self.rec_path}: bad magic {magic:#x} at record {key} (wrong .idx for this .rec?)")
            flag, length = lrec >> 29, lrec & _LEN_MASK
            parts.append(f.read(length))
            if len(parts[-1]) < length:
                raise ValueError(f"{self.rec_path}: record {key} ends past the end of the file (truncated .rec?)")
            f.seek(-length % 4, 1)
            if flag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def _read_head(self, key: int, limit: int = 256) -> tuple[bytes, int]:
        """``(the first bytes of record key, its length)``, reading no more than ``limit`` bytes of a
        record stored in one part."""
        f = self._handle()
        f.seek(self.offsets[key])
        magic, lrec = struct.unpack("<II", f.read(8).ljust(8, b"\0"))
        if magic == MAGIC and lrec >> 29 == 0:
            return f.read(min(lrec & _LEN_MASK, limit)), lrec & _LEN_MASK
        record = self.read(key)   # several parts, or the errors of a broken record
        return record, len(record)

    def labels(self, key: int, images_only: bool = False) -> tuple[list[int], int]:
        """``(the exact label values of record key (see unpack_ints), its payload size in bytes)``, read
        from the record's head (``images_only``: ``([], 0)`` for a record without payload, its labels
        unread); errors name the file and the record."""
        try:
            head, length = self._read_head(key)
            flag = _HEADER.unpack_from(head)[0]
            size = length - _HEADER.size - 4 * flag
            if size < 0:
                raise ValueError(f"its header announces {flag} label values, more than its {length} bytes hold")
            if images_only and size == 0:
                return [], 0
            if _HEADER.size + 4 * flag > len(head):
                head = self.read(key)
            return unpack_ints(head)[0], size
        except (ValueError, struct.error) as exc:
            kind = AmbiguousLabel if isinstance(exc, AmbiguousLabel) else ValueError
            raise kind(f"{self.rec_path}: record {key}: {exc}") from None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_file", None) is not None:   # None also when __init__ raised before opening
            self._file.close()


class RecordIOFaces(torch.utils.data.Dataset):
    """Face images of an insightface ``train.rec``: ``dataset[i] = (image[channels, size, size], label)``.

    ``on_bad_image``: ``"fail"`` raises naming the record of an image that does not decode, ``"skip"``
    decodes another image of the same identity instead (see :class:`~ffc_parallel.data.imagefolder.BadImages`).
    """

    def __init__(self, rec_path, image_size: int = 112, channels: int = 3, on_bad_image: str = "fail"):
        rec_path = Path(rec_path)
        if rec_path.is_dir():
            rec_path = rec_path / "train.rec"
        self.reader = RecordIOReader(rec_path)
        self.image_size, self.channels = image_size, channels
        self.image_keys, self.labels = self._index()
        self.bad_images = BadImages(on_bad_image, self.labels)

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.reader
        if 0 in r.offsets:
            try:
                head, payload_size = r.labels(0)
                if len(head) >= 2 and head[0] > 0 and not payload_size:
                    return self._from_identity_records(head[0], head[1])
            except AmbiguousLabel as exc:
                warnings.warn(f"{exc}; reading every image record's own label instead", stacklevel=3)
        return self._scan()

    def _from_identity_records(self, first_id: int, end_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Images ``1 .. first_id-1`` labelled by the identity records ``first_id .. end_id-1``."""
        r = self.reader
        if not 1 <= first_id < end_id <= r.keys[-1] + 1:
            raise ValueError(f"{r.rec_path}: record 0 gives image keys 1..{first_id - 1} and identity keys "
                             f"{first_id}..{end_id - 1}, outside the keys of {r.idx_path.name} (0..{r.keys[-1]})")
        missing = np.setdiff1d(np.arange(1, end_id), np.fromiter(r.offsets, np.int64, len(r.offsets)))
        if len(missing):
            raise ValueError(f"{r.rec_path}: record 0 promises records 1..{end_id - 1}, but {r.idx_path.name} "
                             f"lacks {len(missing)} of them (the first: record {missing[0]})")
        counts = (f"record 0 counts {first_id - 1} images (records 1..{first_id - 1}) and {end_id - first_id} "
                  f"identities (records {first_id}..{end_id - 1})")
        extra = [k for k in r.keys if k >= end_id]
        if extra:
            raise ValueError(f"{r.rec_path}: {counts}, but {r.idx_path.name} holds {len(extra)} more records (the "
                             f"first: record {extra[0]}): a header that does not match the file")
        ranges, sizes = zip(*(r.labels(k) for k in range(first_id, end_id)))
        with_image = [n for n, size in enumerate(sizes) if size]
        if with_image:
            raise ValueError(f"{r.rec_path}: {counts}, but identity record {first_id + with_image[0]} holds an image "
                             f"of {sizes[with_image[0]]} bytes: a header that does not match the file")
        short = [n for n, v in enumerate(ranges) if len(v) < 2]
        if short:
            raise ValueError(f"{r.rec_path}: identity record {first_id + short[0]} holds no (first, end) image keys")
        lo, hi = np.array(ranges, dtype=np.int64).T
        bad = np.nonzero((lo < 1) | (hi < lo) | (hi > first_id))[0]
        if len(bad):
            raise ValueError(f"{r.rec_path}: identity record {first_id + bad[0]} gives image keys {lo[bad[0]]}.."
                             f"{hi[bad[0]] - 1}, outside the image keys 1..{first_id - 1}")
        edges = np.zeros(first_id + 1, dtype=np.int64)
        np.add.at(edges, lo, 1)
        np.add.at(edges, hi, -1)
        cover = np.cumsum(edges)[1:first_id]
        if (cover != 1).any():
            k = int(np.nonzero(cover != 1)[0][0]) + 1
            raise ValueError(f"{r.rec_path}: image record {k} lies in {cover[k - 1]} identity ranges (records "
                             f"{first_id}..{end_id - 1}); every image needs exactly one")
        self._check_first_images(lo, hi, first_id, counts)
        order = np.argsort(lo, kind="stable")
        return np.arange(1, first_id, dtype=np.int64), np.repeat(order, (hi - lo)[order]).astype(np.int64)

    def _check_first_images(self, lo: np.ndarray, hi: np.ndarray, first_id: int, counts: str) -> None:
        """The first record of every non-empty identity range holds an image, and no two of them share their
        own label (one read per identity: ranges shifted against the images show up as a label that repeats)."""
        r, seen = self.reader, {}
        for n in np.nonzero(hi > lo)[0].tolist():
            key = int(lo[n])
            values, size = r.labels(key)
            if not size:
                raise ValueError(f"{r.rec_path}: {counts}, but image record {key} (the first of identity record "
                                 f"{first_id + n}) holds no image: a header that does not match the file")
            other = seen.setdefault(values[0], n)
            if other != n:
                raise ValueError(f"{r.rec_path}: identity records {first_id + other} and {first_id + n} both start "
                                 f"with an image labelled {values[0]} (records {lo[other]} and {key}): their image "
                                 f"ranges do not match the images' own labels")

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """Every record with an image (a non-empty payload) labelled by its own first label value."""
        keys, labels = [], []
        for k in self.reader.keys:
            values, payload_size = self.reader.labels(k, images_only=True)
            if payload_size > 0:
                keys.append(k)
                labels.append(values[0])
        return np.asarray(keys, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_keys)

    def _decode(self, i: int) -> torch.Tensor:
        _, payload = unpack(self.reader.read(int(self.image_keys[i])))
        return decode_image(payload, self.image_size, self.channels)

    def __getitem__(self, i: int):
        image = self.bad_images.load(i, self._decode,
                                     lambda j: f"{self.reader.rec_path} record {int(self.image_keys[j])}")
        return image, int(self.labels[i])
