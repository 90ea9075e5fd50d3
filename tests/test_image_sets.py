"""Real image files end to end: the packaged sets, the decode cache, --eval-data-path, the cnn presets."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ffc_parallel.data import ImageFolder, RankLoader, build_data
from ffc_parallel.data.augment import BatchFlip, RandomFlip, random_flip
from ffc_parallel.data.decoded import DecodedImages
from ffc_parallel.data.packaged import TEST_FONT, write_digits, write_glyphs
from ffc_parallel.testing import run_ranks


def _folder(root: Path, classes, per_class: int, seed: int = 0, size: int = 7) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_decode_cache_gives_the_decoded_pixels_and_is_rebuilt_when_a_file_changes(tmp_path):
    _folder(tmp_path / "train", ["a", "b", "c"], 4)
    files = ImageFolder(tmp_path / "train", image_size=5, channels=1)   # a resize too
    cached = DecodedImages(files, tmp_path / "cache", workers=2)
    for i in range(len(files)):
        assert torch.equal(cached[i][0], files[i][0]) and cached[i][1] == files[i][1]
    x, y = cached.batch([7, 2, 7, 0])
    assert torch.equal(x, torch.stack([files[i][0] for i in (7, 2, 7, 0)])) and y.tolist() == [1, 0, 1, 0]
    # flips of a batch are the flips of the items, epoch by epoch
    flips = random_flip(cached, seed=3)
    assert isinstance(flips, BatchFlip) and type(random_flip(files, 3)) is RandomFlip
    for epoch in (0, 1):
        flips.epoch = epoch
        assert torch.equal(flips.batch(np.arange(12))[0], torch.stack([flips[i][0] for i in range(12)]))
    # the same files map the same array; a changed file gets a new one
    assert DecodedImages(files, tmp_path / "cache").path == cached.path
    os.utime(files.paths[0], ns=(1, 1))
    assert DecodedImages(ImageFolder(tmp_path / "train", 5, 1), tmp_path / "cache").path != cached.path
    # DataLoader workers map the file themselves: the loader gives the same batches with and without them
    loader = [RankLoader(files, 4, 0, 1, num_workers=w) for w in (0, 1)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*loader))


def test_decode_cache_fails_naming_an_unreadable_file_or_skips_it(tmp_path):
    from ffc_parallel.data import UnreadableImage
    _folder(tmp_path / "train", ["a", "b"], 3)
    bad = tmp_path / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(UnreadableImage, match=f"unreadable image {bad}"):
        DecodedImages(ImageFolder(tmp_path / "train", 7, 3), tmp_path / "cache", workers=2)
    assert not list((tmp_path / "cache").glob("*.npy*"))         # no half-written array is left behind
    files = ImageFolder(tmp_path / "train", 7, 3, on_bad_image="skip")
    cached = DecodedImages(files, tmp_path / "cache", workers=2)
    assert files.bad_images.skipped == 1 and torch.equal(cached[4][0], files[5][0])   # the next image of "b"


def test_eval_data_path_matches_classes_by_name_and_drops_held_out_classes(tmp_path):
    _folder(tmp_path / "train", ["cat", "dog", "emu", "fox", "gnu"], 3)
    _folder(tmp_path / "test", ["fox", "cat"], 2, seed=1)
    for cache in (None, tmp_path / "cache"):
        b = build_data("imagefolder", path=str(tmp_path / "train"), eval_path=str(tmp_path / "test"), image_size=7,
                       channels=3, unseen_fraction=0.2, decode_cache=cache, seed=0)
        test = ImageFolder(tmp_path / "test", 7, 3)
        names = [n for n in ("cat", "dog", "emu", "fox", "gnu") if n not in _held_out(b)]   # training classes
        keep = [i for i in range(len(test)) if test.classes[test.labels[i]] in names]
        assert b.test[1].tolist() == [names.index(test.classes[test.labels[i]]) for i in keep]
        assert torch.equal(b.test[0], torch.stack([test[i][0] for i in keep]))
    _folder(tmp_path / "bad", ["cat", "owl"], 1)
    with pytest.raises(ValueError, match=r"--eval-data-path .*bad: 1 class\(es\) not in the training data, e.g. owl"):
        build_data("imagefolder", path=str(tmp_path / "train"), eval_path=str(tmp_path / "bad"), image_size=7)


def _held_out(bundle) -> set:
    """The class held out of training by build_data's split (0.2 of 5 classes), by its images' pixels."""
    files = ImageFolder(Path(bundle.description.split()[1].rstrip(":")), 7, 3)
    train_pixels = {bundle.train[i][0].numpy().tobytes() for i in range(len(bundle.train))}
    seen_pixels = {x.numpy().tobytes() for x in bundle.seen[0]}
    return {files.classes[files.labels[i]] for i in range(len(files))
            if files[i][0].numpy().tobytes() not in train_pixels | seen_pixels}


def test_packaged_sets_are_image_folders_with_the_same_classes_in_both_splits(tmp_path):
    assert write_glyphs(tmp_path / "g", size=16, classes=6, train_per_class=3, test_per_class=1) == 6
    train, test = ImageFolder(tmp_path / "g" / "train", 16, 1), ImageFolder(tmp_path / "g" / "test", 16, 1)
    assert train.classes == test.classes and len(train) == 18 and len(test) == 6
    assert len({train[i][0].numpy().tobytes() for i in range(18)}) == 18      # every image is another render
    assert all(float(train[i][0].max()) > -0.5 for i in range(18))            # and shows its character
    assert TEST_FONT == "DejaVuSerif.ttf"
    assert write_digits(tmp_path / "d", size=16, train_per_class=2, test_per_class=1) == 10
    d_train, d_test = ImageFolder(tmp_path / "d" / "train", 16, 1), ImageFolder(tmp_path / "d" / "test", 16, 1)
    assert d_train.classes == d_test.classes == [f"digit{i}" for i in range(10)]
    assert np.bincount(d_train.labels).tolist() == [2] * 10 and len(d_test) == 10


def test_cnn_presets_cost_what_their_docstring_says():
    from torch.utils.flop_counter import FlopCounterMode

    from ffc_parallel.models import build_backbone
    flops = {}
    for name in ("cnn", "cnn-wide", "resnet"):
        model = build_backbone(name, (1, 32, 32), 128).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, 32, 32))
        flops[name] = counter.get_total_flops() / 1e6
    assert 19 < flops["cnn"] < 22 and 92 < flops["resnet"] < 100
    assert flops["cnn"] < flops["cnn-wide"] < flops["resnet"]
    for size in (8, 16, 64):
        assert build_backbone("cnn", (3, size, size), 16)(torch.randn(2, 3, size, size)).shape == (2, 16)
    with pytest.raises(ValueError, match="at least 8 x 8"):
        build_backbone("cnn", (1, 4, 4), 16)


@pytest.mark.timeout(200)
def test_two_ranks_train_on_image_files_through_the_decode_cache_and_report_the_test_set(tmp_path):
    """2 ranks share one decode cache (one decodes, the other waits) and classify the test digits."""
    write_digits(tmp_path / "d", size=16, train_per_class=40, test_per_class=10)
    out = tmp_path / "run"
    argv = ["--data", "imagefolder", "--data-path", str(tmp_path / "d" / "train"), "--eval-data-path",
            str(tmp_path / "d" / "test"), "--image-size", "16", "--backbone", "cnn", "--no-flip",
            "--unseen-fraction", "0.2", "--batch-size", "16", "--epochs", "9", "--max-steps", "80", "--margin", "cosface",
            "--scale", "16", "--lr", "0.1", "--warmup-steps", "5", "--embedding-dim", "32", "--output-dir", str(out)]
    metrics = run_ranks("tests.cases_train:train_run", world_size=2, timeout=180, kwargs=dict(argv=argv))[0]
    assert metrics["test_images"] == 80 and metrics["top1_test"] > 0.6   # 8 training digits: chance is 0.125
    assert len(list((out / "decoded").glob("*.npy"))) == 2               # training and test files, decoded once
    assert json.loads((out / "metrics.json").read_text())["top5_test"] >= metrics["top1_test"]
