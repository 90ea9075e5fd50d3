"""Data sources: synthetic long-tail identities, epoch permutations, identity splits, ImageFolder, RecordIO, digits."""
import struct

import numpy as np
import pytest
import torch

from ffc_parallel.data import (EpochBatches, FeistelPermutation, ImageFolder, RankLoader, RecordIOFaces,
                               RecordIOReader, RecordIOWriter, SyntheticLongTail, TensorData, build_data,
                               frequency_buckets, split_identities, write_face_recordio, zipf_image_counts)
from ffc_parallel.data import recordio


# ---------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("mode", ["image", "vector"])
def test_synthetic_items_are_pure_functions_of_seed_and_index(mode):
    a = SyntheticLongTail(500, mode=mode, seed=3)
    b = SyntheticLongTail(500, mode=mode, seed=3)
    idx = np.array([0, 17, 1234, len(a) - 1])
    xa, ya = a.batch(idx)
    xb, yb = b.batch(idx[::-1].copy())          # other order, other batch composition
    # Equal up to float rounding (batched matrix products round differently for other batch sizes).
    assert torch.allclose(xa, xb.flip(0), atol=1e-5) and torch.equal(ya, yb.flip(0))
    x1, y1 = a[1234]
    assert torch.allclose(x1, xa[2], atol=1e-5) and y1 == int(ya[2])
    assert xa.shape == (4, *a.input_shape) and torch.isfinite(xa).all()
    xc, _ = SyntheticLongTail(500, mode=mode, seed=4).batch(idx[:1])
    assert not torch.allclose(xa[:1], xc)


def test_image_counts_follow_the_power_law():
    counts = zipf_image_counts(20_000, min_images=2, max_images=200, exponent=1.0, seed=0)
    assert counts.min() == 2 and counts.max() == 200
    for c in (4, 10, 50):  # P(count >= c) = (2 / c) ** 1
        p = 2 / c
        assert abs((counts >= c).mean() - p) < 4 * np.sqrt(p * (1 - p) / len(counts))
    assert (counts == 200).mean() == pytest.approx(0.01, abs=0.003)  # the clipped mass P(count >= 200)


def test_locate_and_starts_agree():
    d = SyntheticLongTail(50, seed=1, label_noise=0.0)
    counts = d.class_counts
    n = 0
    for identity, c in enumerate(counts[:5]):
        ids, imgs = d.locate(np.arange(n, n + c))
        assert (ids == identity).all() and (imgs == np.arange(c)).all()
        n += c
    assert (d.labels_of(np.arange(len(d))) == np.repeat(np.arange(50), counts)).all()
    with pytest.raises(IndexError):
        d.locate([len(d)])


def test_label_noise_rate_and_wrong_labels():
    d = SyntheticLongTail(2000, seed=0, label_noise=0.1)
    true, _ = d.locate(np.arange(len(d)))
    noisy = d.labels_of(np.arange(len(d)))
    rate = (noisy != true).mean()
    assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(d))
    assert noisy.min() >= 0 and noisy.max() < 2000


def test_identity_is_recoverable_and_eval_images_are_new():
    """Nearest class mean on raw vectors finds the identity far above chance; held-out images differ
    from every training image of their identity; unseen identities are new latents."""
    d = SyntheticLongTail(40, mode="vector", seed=2, label_noise=0.0, min_images=20, max_images=20)
    x, y = d.batch(np.arange(len(d)))
    means = torch.stack([x[y == c].mean(0) for c in range(40)])
    held, held_y = d.heldout_seen(np.arange(40), 2)
    assert (torch.cdist(held, means).argmin(1) == held_y).float().mean() > 0.5  # chance: 0.025
    assert torch.cdist(held, x).min() > 1e-3
    unseen, ids = d.unseen(5, 3)
    assert unseen.shape == (15, 64) and ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert torch.cdist(d.latents(40 + np.arange(5)), d.latents(np.arange(40))).min() > 1e-3


def test_ten_million_identities_cost_no_per_image_memory():
    d = SyntheticLongTail(10_000_000, seed=0)
    assert d.starts.nbytes == 8 * (10_000_001) and len(d) > 50_000_000
    x, y = d.batch([0, len(d) - 1])
    assert x.shape == (2, 1, 16, 16) and d.locate([len(d) - 1])[0][0] == 9_999_999


# ---------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12_345])
def test_feistel_permutation_is_a_bijection(n):
    perm = FeistelPermutation(n, key=11)(np.arange(n))
    assert np.array_equal(np.sort(perm), np.arange(n))
    if n > 100:
        assert not np.array_equal(perm, FeistelPermutation(n, key=12)(np.arange(n)))
        assert np.abs(perm - np.arange(n)).mean() > n / 5  # actually shuffled


def test_epoch_batches_partition_the_epoch_across_ranks():
    n, b, w = 1003, 10, 3
    ranks = [list(EpochBatches(n, b, r, w, seed=5, epoch=2)) for r in range(w)]
    assert all(len(r) == n // (b * w) for r in ranks)
    items = np.concatenate([np.concatenate(r) for r in ranks])
    assert len(items) == len(set(items.tolist())) == (n // (b * w)) * b * w
    again = list(EpochBatches(n, b, 1, w, seed=5, epoch=2))
    assert all(np.array_equal(p, q) for p, q in zip(again, ranks[1]))
    other = list(EpochBatches(n, b, 1, w, seed=5, epoch=3))
    assert not np.array_equal(other[0], ranks[1][0])
    resumed = list(EpochBatches(n, b, 1, w, seed=5, epoch=2, start_step=30))
    assert len(resumed) == 3 and np.array_equal(resumed[0], ranks[1][30])
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        EpochBatches(10, 4, 0, 3)


def test_rank_loader_vectorised_and_dataloader_paths_agree():
    x, y = torch.arange(60.0).view(30, 2), torch.arange(30) % 4
    data = TensorData(x, y)

    class ItemOnly(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return x[i], int(y[i])

    fast = list(RankLoader(data, 4, 1, 2, seed=1))
    slow = list(RankLoader(ItemOnly(), 4, 1, 2, seed=1))
    assert len(fast) == len(slow) == 3
    for (xa, ya), (xb, yb) in zip(fast, slow):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa[:, 0] / 2 % 4, ya.float())


# ---------------------------------------------------------------------------- splits and sources
def test_split_identities_by_hand():
    labels = np.array([5, 5, 5, 7, 7, 9, 9, 9, 9, 3, 11])
    s = split_identities(labels, unseen_fraction=0.2, heldout_per_class=2, min_train_per_class=2, seed=0)
    assert len(s.unseen) + len(s.train) + len(s.seen) == len(labels)
    assert len(set(s.train) | set(s.seen) | set(s.unseen)) == len(labels)
    unseen_classes = set(labels[s.unseen])
    assert len(unseen_classes) == 1  # round(0.2 * 5)
    assert s.num_classes == 4 and list(s.original_classes) == sorted(set(labels) - unseen_classes)
    assert (s.original_classes[s.train_labels] == labels[s.train]).all()
    assert (s.original_classes[s.seen_labels] == labels[s.seen]).all()
    held = np.bincount(labels[s.seen], minlength=12)
    expected = {5: 1, 7: 0, 9: 2, 3: 0, 11: 0}  # keep 2 for training, hold out up to 2 of the rest
    assert all(held[c] == k for c, k in expected.items() if c not in unseen_classes)
    assert sorted(s.class_counts.tolist()) == sorted(np.bincount(s.train_labels).tolist())


def test_frequency_buckets_edges():
    assert frequency_buckets([1, 19, 20, 100, 101, 500]).tolist() == [0, 0, 1, 1, 2, 2]


def test_build_data_sources_and_errors():
    digits = build_data("digits")
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 8
    assert len(digits.train) + len(digits.seen[0]) + len(digits.unseen[0]) == 1797
    syn = build_data("synthetic", num_identities=3000, eval_ids_per_bucket=5)
    labels = syn.seen[1].numpy()
    assert sorted(set(frequency_buckets(syn.class_counts)[labels].tolist())) == [0, 1, 2]
    with pytest.raises(ValueError, match="needs a path"):
        build_data("imagefolder")
    with pytest.raises(ValueError, match="unknown data source"):
        build_data("cifar")


# ---------------------------------------------------------------------------- image files
def _png(value: int, size: int = 6) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_reads_classes_and_pixels(tmp_path):
    for name, value in (("alice", 0), ("bob", 255)):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(_png(value))
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    d = ImageFolder(tmp_path, image_size=6, channels=3)
    assert d.classes == ["alice", "bob"] and len(d) == 6 and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x0, y0 = d[0]
    x5, y5 = d[5]
    assert x0.shape == (3, 6, 6) and (x0 == -1).all() and (x5 == 1).all() and (y0, y5) == (0, 1)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "alice")


def test_recordio_container_bytes_by_hand(tmp_path):
    magic = struct.pack("<I", 0xCED7230A)
    # A payload of 7 bytes starting with the magic word splits into an empty first part and "xyz".
    encoded = recordio._encode_parts(magic + b"xyz")
    assert encoded == (magic + struct.pack("<I", 1 << 29) + magic + struct.pack("<I", (3 << 29) | 3) + b"xyz\0")
    assert recordio._encode_parts(b"ab") == magic + struct.pack("<I", 2) + b"ab\0\0"
    packed = recordio.pack(3.0, b"img")
    assert packed == struct.pack("<IfQQ", 0, 3.0, 0, 0) + b"img"
    label, payload = recordio.unpack(recordio.pack([4, 9], b"z"))
    assert label.tolist() == [4.0, 9.0] and payload == b"z"
    payloads = [b"plain", magic + b"x", b"abcd" + magic + b"efgh" + magic, b""]
    with RecordIOWriter(tmp_path / "t.rec") as w:
        for k, p in enumerate(payloads):
            w.write(k + 10, p)
    r = RecordIOReader(tmp_path / "t.rec")
    assert r.keys == [10, 11, 12, 13] and [r.read(k) for k in r.keys] == payloads


@pytest.mark.parametrize("with_identity_records", [True, False])
def test_recordio_faces_round_trip(tmp_path, with_identity_records):
    labels = [2, 0, 1, 0, 2, 2]
    images = [_png(40 * v + 10 * i) for i, v in enumerate(labels)]
    rec = tmp_path / "train.rec"
    if with_identity_records:
        write_face_recordio(rec, images, labels)
    else:
        with RecordIOWriter(rec) as w:
            for k, (img, lab) in enumerate(zip(images, labels), start=1):
                w.write(k, recordio.pack(float(lab), img, k))
    d = RecordIOFaces(tmp_path, image_size=6, channels=1)
    assert len(d) == 6
    got = sorted((int(d.labels[i]), round(float(d[i][0][0, 0, 0]), 4)) for i in range(6))
    want = sorted((lab, round((40 * lab + 10 * i) / 127.5 - 1, 4)) for i, lab in enumerate(labels))
    assert got == want
    (tmp_path / "train.idx").write_text("1\t3\n")
    with pytest.raises(ValueError, match="bad magic"):
        RecordIOFaces(tmp_path, image_size=6)


def test_build_data_from_image_files(tmp_path):
    labels = [c for c in range(4) for _ in range(3)]
    images = [_png(20 * c + i) for i, c in enumerate(labels)]
    for i, (c, img) in enumerate(zip(labels, images)):
        (tmp_path / "folder" / f"id{c}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / f"id{c}" / f"{i}.png").write_bytes(img)
    write_face_recordio(tmp_path / "train.rec", images, labels)
    for source, path in (("imagefolder", tmp_path / "folder"), ("recordio", tmp_path)):
        b = build_data(source, path=str(path), image_size=6, channels=1, unseen_fraction=0.25, seed=1)
        assert b.num_classes == 3 and len(b.train) == 6 and b.class_counts.tolist() == [2, 2, 2]
        assert b.seen[0].shape == (3, 1, 6, 6) and sorted(b.seen[1].tolist()) == [0, 1, 2]
        assert b.unseen[0].shape == (3, 1, 6, 6) and b.unseen[1].tolist() == [0, 0, 0]
        x, y = b.train[0]
        assert x.shape == (1, 6, 6) and 0 <= y < 3
