"""Faults in the data readers: RecordIO labels float32 cannot hold, indexes past the end of the .rec,
unreadable images (unit tests here; real 2-rank ``ffc-train`` runs in ``test_data_faults_ranks.py``)."""
import io
import struct
import warnings

import numpy as np
import pytest
import torch

from ffc_parallel.data import (AmbiguousLabel, ImageFolder, RecordIOFaces, RecordIOReader, RecordIOWriter,
                               UnreadableImage, write_face_recordio)
from ffc_parallel.data import recordio

AROUND_2_24 = [2 ** 24 - 3 + i for i in range(8)]   # float32 merges 16,777,216 and 16,777,217


def _png(value: int, size: int = 4, noise: bool = False) -> bytes:
    """A PNG of one grey ``value`` (``noise``: random pixels seeded by it, so truncation cuts pixel data)."""
    from PIL import Image
    pixels = (np.random.default_rng(value).integers(0, 256, (size, size, 3)) if noise
              else np.full((size, size, 3), value)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _old_float32_record(label: float, payload: bytes, key: int) -> bytes:
    """A record as MXNet (and this package before exact labels) packs it: the label as float32 only."""
    return struct.pack("<IfQQ", 0, label, key, 0) + payload


# ---------------------------------------------------------------------------- labels of 2^24 and more
def test_identities_around_and_far_above_2_24_read_back_exactly(tmp_path):
    ids = AROUND_2_24 + [1_000_000_007, 2 ** 40 + 1]  # and a billion-class data set's identities
    images = [_png(10 * i) for i in range(len(ids))]
    with RecordIOWriter(tmp_path / "flat.rec") as w:        # a flat file: every image's own label
        for key, (identity, image) in enumerate(zip(ids, images), start=1):
            w.write(key, recordio.pack(identity, image, key))
    flat = RecordIOFaces(tmp_path / "flat.rec", image_size=4)
    assert flat.labels.tolist() == ids and flat.image_keys.tolist() == list(range(1, len(ids) + 1))

    write_face_recordio(tmp_path / "train.rec", images[::-1], ids[::-1])   # insightface's layout
    faces = RecordIOFaces(tmp_path, image_size=4)
    assert len(np.unique(faces.labels)) == len(ids)                # every identity its own class
    raw = [faces.reader.labels(int(k))[0][0] for k in faces.image_keys]  # each image record's own identity
    assert raw == sorted(ids) and faces.labels.tolist() == list(range(len(ids)))
    # What a float32-only reader (insightface: int(header.label[0]) of record 0) sees: NaN, so it refuses.
    head, _ = recordio.unpack(faces.reader.read(0))
    with pytest.raises(ValueError, match="NaN"):
        int(head[0])
    assert recordio.unpack_ints(faces.reader.read(0))[0] == [len(ids) + 1, 2 * len(ids) + 1]


def test_small_files_stay_plain_insightface_files(tmp_path):
    """Below 2^24 every label is the exact float32 a float32-only reader expects."""
    labels = [5, 3, 5, 9]
    write_face_recordio(tmp_path / "train.rec", [_png(i) for i in range(4)], labels)
    r = RecordIOReader(tmp_path / "train.rec")
    floats = [recordio.unpack(r.read(k))[0].tolist() for k in r.keys]
    assert floats == [[5.0, 8.0], [3.0], [5.0], [5.0], [9.0], [1.0, 2.0], [2.0, 4.0], [4.0, 5.0]]


def test_old_float32_labels_of_2_24_or_more_are_refused(tmp_path):
    with RecordIOWriter(tmp_path / "old.rec") as w:
        for key, identity in enumerate(AROUND_2_24, start=1):
            w.write(key, _old_float32_record(float(identity), _png(key), key))
    with pytest.raises(AmbiguousLabel, match=r"old\.rec: record 4: float32 label value 16777216 is ambiguous"):
        RecordIOFaces(tmp_path / "old.rec", image_size=4)
    with RecordIOWriter(tmp_path / "frac.rec") as w:
        w.write(1, _old_float32_record(2.5, _png(1), 1))
    with pytest.raises(ValueError, match=r"frac\.rec: record 1: label value 2.5 is not an integer"):
        RecordIOFaces(tmp_path / "frac.rec", image_size=4)


def test_old_identity_ranges_float32_cannot_hold_fall_back_to_image_labels(tmp_path, monkeypatch):
    """An old insightface file whose record 0 / identity records hold keys of 2^24 or more (Glint360K: 17M
    images) is read from its image records' own labels. Writing 2^24 records takes too long for a test,
    so the limit is lowered to 4: keys 4 and up count as ambiguous, the identities 0..2 do not."""
    labels = [0, 0, 1, 2, 2, 2]
    with RecordIOWriter(tmp_path / "train.rec") as w:
        w.write(0, recordio.pack([7.0, 10.0], b""))
        for key, label in enumerate(labels, start=1):
            w.write(key, _old_float32_record(float(label), _png(key), key))
        for n, (lo, hi) in enumerate([(1, 3), (3, 4), (4, 7)]):
            w.write(7 + n, recordio.pack([float(lo), float(hi)], b""))
    monkeypatch.setattr(recordio, "FLOAT32_EXACT", 4)
    with pytest.warns(UserWarning, match=r"record 0: float32 label value 7 is ambiguous.*reading every image"):
        d = RecordIOFaces(tmp_path, image_size=4)
    assert d.image_keys.tolist() == [1, 2, 3, 4, 5, 6] and d.labels.tolist() == labels


def test_pack_refuses_values_it_cannot_store_exactly():
    with pytest.raises(ValueError, match="record_id"):
        recordio.pack([1, 2 ** 30], b"", record_id=5)
    for label in (-(2 ** 25), [0, 1, 2 ** 25]):
        with pytest.raises(ValueError, match="exact uint64 field"):
            recordio.pack(label, b"")
    with pytest.raises(ValueError, match="not finite"):
        recordio.pack(float("nan"), b"")
    assert recordio.unpack_ints(recordio.pack([2 ** 33, 7], b"x"))[0] == [2 ** 33, 7]


# ---------------------------------------------------------------------------- index and file disagree
def test_index_past_the_end_and_broken_indexes_are_refused_at_open(tmp_path):
    write_face_recordio(tmp_path / "train.rec", [_png(i) for i in range(6)], [0, 0, 1, 1, 2, 2])
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    good = rec.read_bytes()
    rec.write_bytes(good[:-20])                      # the copy was cut off inside the last record
    with pytest.raises(ValueError, match=r"train\.rec: record 9 ends past the end of the file"):
        RecordIOFaces(tmp_path, image_size=4)
    lines = idx.read_text().splitlines()
    rec.write_bytes(good)
    idx.write_text("\n".join(lines + [f"99\t{len(good) + 64}"]) + "\n")   # an offset beyond the file
    with pytest.raises(ValueError, match=r"train\.rec: record 99 starts at byte .* past the end of the file"):
        RecordIOReader(rec)
    idx.write_text("\n".join(lines + [lines[3].replace("3\t", "2\t")]) + "\n")
    with pytest.raises(ValueError, match=r"train\.idx:11: key 2 appears twice"):
        RecordIOReader(rec)
    idx.write_text("\n".join(lines[:2] + ["2 480"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"train\.idx:3: expected 'key<TAB>offset'"):
        RecordIOReader(rec)
    idx.write_text("\n".join(line for line in lines if not line.startswith("4\t")) + "\n")
    with pytest.raises(ValueError, match=r"train\.rec: record 0 promises records 1\.\.9, but train\.idx lacks "
                                         r"1 of them \(the first: record 4\)"):
        RecordIOFaces(tmp_path, image_size=4)


def test_identity_ranges_must_cover_every_image_once(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec") as w:
        w.write(0, recordio.pack([4, 6], b""))
        for key in (1, 2, 3):
            w.write(key, recordio.pack(0, _png(key), key))
        w.write(4, recordio.pack([1, 3], b""))
        w.write(5, recordio.pack([2, 4], b""))      # overlaps image 2
    with pytest.raises(ValueError, match=r"image record 2 lies in 2 identity ranges \(records 4\.\.5\)"):
        RecordIOFaces(tmp_path, image_size=4)
    with RecordIOWriter(tmp_path / "flat.rec") as w:
        w.write(1, struct.pack("<IfQQ", 99, 0.0, 1, 0) + b"short")    # a header announcing 99 label values
    with pytest.raises(ValueError, match=r"flat\.rec: record 1: its header announces 99 label values"):
        RecordIOFaces(tmp_path / "flat.rec", image_size=4)


def _face_file(path, header, images, identities, extra=()):
    """Record 0 = ``header``, image records 1.. labelled ``images``, then identity records of (first, end)
    keys ``identities``, then ``extra`` (key, packed) records."""
    with RecordIOWriter(path) as w:
        w.write(0, recordio.pack(header, b""))
        for key, label in enumerate(images, start=1):
            w.write(key, recordio.pack(label, _png(key), key))
        for key, (lo, hi) in enumerate(identities, start=len(images) + 1):
            w.write(key, recordio.pack([lo, hi], b""))
        for key, record in extra:
            w.write(key, record)


def test_record_0s_counts_are_checked_against_the_records(tmp_path):
    rec, labels, ranges = tmp_path / "train.rec", [0, 0, 1, 1, 2, 2], [(1, 3), (3, 5), (5, 7)]
    _face_file(rec, [7, 10], labels, ranges)
    assert RecordIOFaces(tmp_path, image_size=4).labels.tolist() == labels
    _face_file(rec, [7, 10], labels, ranges, extra=[(10, recordio.pack(3, _png(10), 10))])   # appended, uncounted
    with pytest.raises(ValueError, match=r"train\.rec: record 0 counts 6 images \(records 1\.\.6\) and 3 "
                                         r"identities \(records 7\.\.9\), but train\.idx holds 1 more records "
                                         r"\(the first: record 10\)"):
        RecordIOFaces(tmp_path, image_size=4)
    # record 0 counts one image too few: the last image record reads as the first identity record
    _face_file(rec, [6, 10], labels, ranges)
    with pytest.raises(ValueError, match=r"record 0 counts 5 images .* but identity record 6 holds an image of"):
        RecordIOFaces(tmp_path, image_size=4)
    # identity ranges shifted by one against the images: two identities start with label 0
    _face_file(rec, [7, 10], labels, [(1, 2), (2, 5), (5, 7)])
    with pytest.raises(ValueError, match=r"identity records 7 and 8 both start with an image labelled 0 \(records 1 "
                                         r"and 2\)"):
        RecordIOFaces(tmp_path, image_size=4)
    # an image record without an image
    _face_file(rec, [7, 10], labels, ranges)
    with RecordIOWriter(tmp_path / "hole.rec") as w:
        reader = RecordIOReader(rec)
        for key in reader.keys:
            w.write(key, recordio.pack(1, b"", 3) if key == 3 else reader.read(key))
    with pytest.raises(ValueError, match=r"hole\.rec: record 0 counts 6 images .* but image record 3 \(the first of "
                                         r"identity record 8\) holds no image"):
        RecordIOFaces(tmp_path / "hole.rec", image_size=4)


def test_im2rec_files_keep_their_image_at_key_0(tmp_path):
    """im2rec numbers images from 0; key 0 is a header only when it holds no image."""
    with RecordIOWriter(tmp_path / "train.rec") as w:
        for key, label in enumerate([4, 4, 7]):
            w.write(key, recordio.pack(float(label), _png(key), key))
    d = RecordIOFaces(tmp_path, image_size=4)
    assert d.image_keys.tolist() == [0, 1, 2] and d.labels.tolist() == [4, 4, 7]


# ---------------------------------------------------------------------------- unreadable images
def _folder(root, truncate=()):
    for c in range(2):
        (root / f"id{c}").mkdir(parents=True)
        for i in range(3):
            data = _png(100 * c + 10 * i, size=16, noise=True)
            (root / f"id{c}" / f"{i}.png").write_bytes(data[: len(data) // 2] if (c, i) in truncate else data)


def test_unreadable_image_fails_naming_the_file(tmp_path):
    _folder(tmp_path, truncate={(1, 1)})
    d = ImageFolder(tmp_path, image_size=4)
    with pytest.raises(UnreadableImage, match=r"unreadable image .*id1/1\.png: OSError"):
        d[4]
    (tmp_path / "id0" / "2.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImage, match=r"id0/2\.png: UnidentifiedImageError"):
        d[2]
    with pytest.raises(ValueError, match="on_bad_image must be one of fail, skip"):
        ImageFolder(tmp_path, on_bad_image="ignore")


def test_skip_replaces_by_another_image_of_the_class_and_counts_across_workers(tmp_path, capfd):
    _folder(tmp_path, truncate={(1, 1), (0, 0)})
    d = ImageFolder(tmp_path, image_size=4, channels=1, on_bad_image="skip")
    x, y = d[4]
    assert y == 1 and torch.equal(x, d[5][0]) and d.bad_images.skipped == 1   # id1/2.png, the next one
    assert "skipped unreadable image" in capfd.readouterr().err
    loader = torch.utils.data.DataLoader(d, batch_size=3, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.cat(ys).tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(xs[0][0], xs[0][1])
    assert d.bad_images.skipped == 3          # 1 here + 2 in the workers
    for i in range(3):
        (tmp_path / "id0" / f"{i}.png").write_bytes(b"")
    with pytest.raises(UnreadableImage, match=r"id0/0\.png.*no other image of its class \(label 0\) decodes"):
        d[0]


def test_an_unreadable_evaluation_image_stops_the_build_on_every_rank(tmp_path):
    """The evaluation sets are decoded when the data is built (the same images on every rank)."""
    from ffc_parallel.data import build_data, split_identities
    seen = int(split_identities(np.repeat([0, 1], 3), unseen_fraction=0.5, seed=0).seen[0])
    _folder(tmp_path, truncate={(seen // 3, seen % 3)})
    with pytest.raises(UnreadableImage, match=rf"id{seen // 3}/{seen % 3}\.png"):
        build_data("imagefolder", path=str(tmp_path), image_size=4, unseen_fraction=0.5)
    bundle = build_data("imagefolder", path=str(tmp_path), image_size=4, unseen_fraction=0.5, on_bad_image="skip")
    assert bundle.skipped_images == 1


def test_recordio_unreadable_image_names_the_record(tmp_path):
    write_face_recordio(tmp_path / "train.rec", [_png(1), b"\x89PNG broken", _png(3)], [0, 0, 1])
    with pytest.raises(UnreadableImage, match=r"train\.rec record 2: UnidentifiedImageError"):
        RecordIOFaces(tmp_path, image_size=4)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = RecordIOFaces(tmp_path, image_size=4, on_bad_image="skip")
    assert torch.equal(d[1][0], d[0][0]) and d.bad_images.skipped == 1


def test_an_unseen_set_without_verification_pairs_is_refused_before_training(tmp_path):
    from ffc_parallel.cli.recipe import Recipe
    from ffc_parallel.cli.train import TrainOptions
    from ffc_parallel.data import build_data
    _folder(tmp_path)
    bundle = build_data("imagefolder", path=str(tmp_path), image_size=4, unseen_fraction=0.5)  # 1 unseen class
    with pytest.raises(ValueError, match="the evaluation split holds 1 unseen identities, 1 of them with two or more"):
        Recipe(TrainOptions(), bundle, 0, 1, torch.device("cpu"))
