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
= its image keys. Files without record 0's ranges are read by scanning every record's label.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from .imagefolder import decode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


def pack(label, payload: bytes, record_id: int = 0) -> bytes:
    """MXNet ``recordio.pack``: header + payload; ``label`` a number or a sequence of numbers."""
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), record_id, 0) + payload
    values = np.asarray(label, dtype="<f4")
    return _HEADER.pack(len(values), 0.0, record_id, 0) + values.tobytes() + payload


def unpack(record: bytes) -> tuple[np.ndarray, bytes]:
    """``(label as float32 array [flag or 1], payload)`` of one packed record."""
    flag, label, _, _ = _HEADER.unpack_from(record)
    body = record[_HEADER.size:]
    if flag > 0:
        return np.frombuffer(body[: 4 * flag], dtype="<f4").copy(), body[4 * flag:]
    return np.array([label], dtype=np.float32), body


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
    """Write encoded ``images`` with identity ``labels`` in insightface's layout (record 0 with
    identity ranges, images grouped by identity, one record per identity)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    identities = np.unique(labels)
    first_id_key = len(images) + 1
    with RecordIOWriter(rec_path) as w:
        w.write(0, pack([first_id_key, first_id_key + len(identities)], b""))
        for key, i in enumerate(order, start=1):
            w.write(key, pack(float(labels[i]), images[i], key))
        sorted_labels = labels[order]
        for n, identity in enumerate(identities):
            lo = int(np.searchsorted(sorted_labels, identity, side="left")) + 1
            hi = int(np.searchsorted(sorted_labels, identity, side="right")) + 1
            w.write(first_id_key + n, pack([lo, hi], b""))


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``; ``read(key) -> bytes``."""

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file {p} not found (need train.rec and train.idx side by side)")
        keys, offsets = [], []
        with open(self.idx_path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    parts = line.split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{self.idx_path}:{n}: expected 'key<TAB>offset', got {line.strip()!r}")
                    keys.append(int(parts[0]))
                    offsets.append(int(parts[1]))
        self.offsets = dict(zip(keys, offsets))
        self.keys = sorted(self.offsets)
        self._file, self._pid = None, None

    def _handle(self):
        if self._file is None or self._pid != os.getpid():  # one handle per DataLoader worker
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._file

    def read(self, key: int) -> bytes:
        f = self._handle()
        f.seek(self.offsets[key])
        parts = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.rec_path}: truncated record at key {key}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"{self.rec_path}: bad magic {magic:#x} at key {key} (wrong .idx for this .rec?)")
            flag, length = lrec >> 29, lrec & _LEN_MASK
            parts.append(f.read(length))
            f.seek(-length % 4, 1)
            if flag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}


class RecordIOFaces(torch.utils.data.Dataset):
    """Face images of an insightface ``train.rec``: ``dataset[i] = (image[channels, size, size], label)``."""

    def __init__(self, rec_path, image_size: int = 112, channels: int = 3):
        rec_path = Path(rec_path)
        if rec_path.is_dir():
            rec_path = rec_path / "train.rec"
        self.reader = RecordIOReader(rec_path)
        self.image_size, self.channels = image_size, channels
        self.image_keys, self.labels = self._index()

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.reader
        if 0 in r.offsets:
            head, _ = unpack(r.read(0))
            if len(head) >= 2 and head[0] > 0:
                first_id, end_id = int(head[0]), int(head[1])
                keys = np.arange(1, first_id, dtype=np.int64)
                labels = np.full(len(keys), -1, dtype=np.int64)
                for identity, id_key in enumerate(range(first_id, end_id)):
                    lo, hi = (int(v) for v in unpack(r.read(id_key))[0][:2])
                    labels[lo - 1: hi - 1] = identity
                if (labels >= 0).all():
                    return keys, labels
                raise ValueError(f"{r.rec_path}: identity records do not cover every image record")
        keys = np.array([k for k in r.keys if k != 0], dtype=np.int64)
        return keys, np.array([int(unpack(r.read(int(k)))[0][0]) for k in keys], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, i: int):
        _, payload = unpack(self.reader.read(int(self.image_keys[i])))
        return decode_image(payload, self.image_size, self.channels), int(self.labels[i])
