"""insightface's verification sets (.bin) and protocol: 10-fold accuracy, the flip, reading and writing."""
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from ffc_parallel.evaluation import tar_at_far
from ffc_parallel.evaluation.verification import (THRESHOLDS, VerificationSet, embed_pairs, load_verification_bin,
                                                  pairs_from_folder, ten_fold_accuracy, verification_metrics,
                                                  write_verification_bin)


def test_ten_fold_accuracy_by_hand():
    """20 pairs, 10 folds of 2 (fold k = pairs 2k, 2k+1), thresholds 1, 2, 3; same when distance < threshold.

    Folds 1..9: a same pair at distance 0.5 and a different one at 2.5. Fold 0: the same pair is at 1.5.
    * Judging fold 0, the other nine folds are all right at thresholds 1 and 2 (18/18) and half right at 3:
      the first best, 1, is chosen; on fold 0 it calls 1.5 different (wrong) and 2.5 different (right): 1/2.
    * Judging fold k >= 1, the training folds hold fold 0: threshold 1 gets 17/18, 2 gets 18/18, 3 gets 9/18;
      2 is chosen and fold k is all right: 1.
    Mean (0.5 + 9) / 10 = 0.95; std sqrt((0.45^2 + 9 * 0.05^2) / 10) = 0.15.
    """
    d = np.tile([0.5, 2.5], 10)
    d[0] = 1.5
    same = np.tile([True, False], 10)
    out = ten_fold_accuracy(d, same, thresholds=[1.0, 2.0, 3.0])
    assert out["fold_threshold"] == [1.0] + [2.0] * 9
    assert out["fold_accuracy"] == [0.5] + [1.0] * 9
    assert out["accuracy"] == pytest.approx(0.95) and out["accuracy_std"] == pytest.approx(0.15)


def _insightface_accuracy(dist, issame):
    """insightface's verification.calculate_roc (accuracy part), as written there with sklearn's KFold."""
    from sklearn.model_selection import KFold
    thresholds = np.arange(0, 4, 0.01)
    accuracy = []
    for train_set, test_set in KFold(n_splits=10, shuffle=False).split(np.arange(len(dist))):
        acc_train = [np.mean(np.less(dist[train_set], t) == issame[train_set]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accuracy.append(np.mean(np.less(dist[test_set], best) == issame[test_set]))
    return np.mean(accuracy), np.std(accuracy)


def test_ten_fold_accuracy_matches_insightface_on_uneven_folds():
    rng = np.random.default_rng(0)
    same = rng.random(123) < 0.5                       # 123 pairs: folds of 13 x 3 and 12 x 7
    dist = np.where(same, rng.normal(1.0, 0.4, 123), rng.normal(1.8, 0.4, 123)).clip(0, 4)
    out = ten_fold_accuracy(dist, same)
    mean, std = _insightface_accuracy(dist, same)
    assert out["accuracy"] == pytest.approx(mean, abs=1e-12) and out["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert 0.6 < out["accuracy"] < 1.0 and len(THRESHOLDS) == 400


def _images(n, channels=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(channels, size, size, generator=g) * 2 - 1) for _ in range(n)]


def test_bin_round_trip_and_a_python2_pickle(tmp_path):
    imgs = _images(8)
    path = tmp_path / "mine.bin"
    assert write_verification_bin(path, [(imgs[2 * i], imgs[2 * i + 1], i % 2 == 0) for i in range(4)]) == 4
    vset = load_verification_bin(path)
    assert vset.name == "mine" and vset.num_pairs == 4 and vset.issame.tolist() == [True, False, True, False]
    decoded = vset.images(0, 8, 12, 3)
    assert decoded.shape == (8, 3, 12, 12)
    assert (decoded - torch.stack(imgs)).abs().max() <= 0.5 / 127.5 + 1e-6   # PNG: 8-bit rounding only
    assert vset.images(1, 2, 6, 1).shape == (1, 1, 6, 6)                      # resized, one grey channel

    # What Python 2 / mxnet wrote: str items (opcode BINSTRING), read back as bytes with encoding="bytes".
    raw = b"\x80\x02]q\x00(" + b"".join(b"T" + struct.pack("<i", len(b)) + b for b in vset.bins) + b"e]q\x01(" \
        + b"\x88\x89\x88\x89" + b"e\x86q\x02."
    with pytest.raises(UnicodeDecodeError):
        pickle.load(io.BytesIO(raw))                  # the default ASCII decoding fails on JPEG/PNG bytes
    (tmp_path / "py2.bin").write_bytes(raw)
    old = load_verification_bin(tmp_path / "py2.bin")
    assert old.bins == vset.bins and old.issame.tolist() == vset.issame.tolist()
    as_numpy = tmp_path / "np.bin"                    # numpy uint8 arrays of the encoded bytes
    as_numpy.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in vset.bins], np.array(vset.issame))))
    assert load_verification_bin(as_numpy).bins == vset.bins

    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_verification_bin(tmp_path / "nope.bin")
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.bin: not an insightface .bin"):
        load_verification_bin(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        VerificationSet(vset.bins[:3], [True, False])


def test_pairs_from_an_image_folder(tmp_path):
    from PIL import Image
    for ident in range(3):
        (tmp_path / f"id{ident}").mkdir()
        for k in range(2):
            Image.new("RGB", (10, 10), (40 * ident, 20 * k, 0)).save(tmp_path / f"id{ident}" / f"{k}.png")
    pairs = pairs_from_folder(tmp_path, 6, seed=1)
    assert pairs == pairs_from_folder(tmp_path, 6, seed=1)
    for a, b, same in pairs:
        assert a != b and (a.parent == b.parent) == same
    write_verification_bin(tmp_path / "folder.bin", pairs)
    vset = load_verification_bin(tmp_path / "folder.bin")
    assert vset.bins[0] == pairs[0][0].read_bytes() and vset.num_pairs == 6


class _LeftHalf(torch.nn.Module):
    """Not flip-invariant: the embedding is the mean of each row's left half ([n, 3, S, S] -> [n, S])."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[..., : x.shape[-1] // 2].mean(dim=(1, 3)) + self.dummy


def test_the_embedding_is_the_sum_of_the_image_and_its_mirror(tmp_path):
    imgs = _images(20, seed=3)
    write_verification_bin(tmp_path / "f.bin", [(imgs[2 * i], imgs[2 * i + 1], i % 2 == 0) for i in range(10)])
    vset = load_verification_bin(tmp_path / "f.bin")
    net, x = _LeftHalf(), vset.images(0, 20, 12, 3)
    emb = embed_pairs(net, vset, (3, 12, 12), batch_size=7)
    with torch.no_grad():
        expected = x[..., :6].mean(dim=(1, 3)) + x[..., 6:].mean(dim=(1, 3))   # the mirror's left = the right half
    assert torch.allclose(emb, expected, atol=1e-6)
    assert not torch.allclose(emb, embed_pairs(net, vset, (3, 12, 12), flip=False), atol=1e-3)
    metrics = verification_metrics(emb, vset.issame)
    unit = torch.nn.functional.normalize(expected.double(), dim=1)
    cos = (unit[0::2] * unit[1::2]).sum(1).numpy()
    assert metrics["accuracy"] == ten_fold_accuracy(2 - 2 * cos, vset.issame)["accuracy"]
    assert metrics["tar_at_far_1e-3"] == tar_at_far(cos, vset.issame, 1e-3)[0] and metrics["pairs"] == 10
