"""ffc-train's tasks and tricks: option checks, epoch plans, instance views, and real 2-rank runs of
the long-tail tricks with cross-batch memory, instance classification and FFC, each resumed from a
checkpoint mid-run and compared with the uninterrupted run."""
import shutil

import numpy as np
import pytest
import torch

from ffc_parallel.cli.recipe import InstanceViews, check_options
from ffc_parallel.cli.train import EpochPlan, TrainOptions, parse_options
from ffc_parallel.data import SyntheticLongTail
from ffc_parallel.evaluation.report import read_log
from ffc_parallel.testing import run_ranks


def test_option_types_and_refused_combinations():
    opts = parse_options(["--gradient-clipping", "2.5", "--drw-epoch", "1", "--reweight", "cb_ce", "--pool-size", "0.1"])
    assert opts.gradient_clipping == 2.5 and opts.drw_epoch == 1 and opts.pool_size == 0.1
    check_options(opts)
    refused = [
        (dict(head="ffc", reweight="cb_ce"), "--head ffc .* --reweight"),
        (dict(task="instance", sampler="sqrt"), "--task instance .* --sampler"),
        (dict(xbm_size=64, mixup_alpha=0.2), "--xbm-size with --mixup-alpha"),
        (dict(drw_epoch=2, reweight="focal"), "--drw-epoch .* focal has none"),
        (dict(drs_epoch=2), "--drs-epoch .* choose a re-sampler"),
        (dict(cam_epoch=1, sampler="sqrt"), "--cam-epoch brings its own"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            check_options(TrainOptions(**kwargs))


def test_epoch_plan_maps_steps_to_epochs_of_different_lengths():
    plan = EpochPlan([3, 5, 2], max_steps=None)
    assert plan.total == 10
    assert [plan.locate(s) for s in (0, 2, 3, 7, 8, 9)] == [(0, 0), (0, 2), (1, 0), (1, 4), (2, 0), (2, 1)]
    assert plan.epochs_done(4) == pytest.approx(1.2) and plan.epochs_done(10) == 3.0
    assert EpochPlan([3, 5, 2], max_steps=4).total == 4
    with pytest.raises(ValueError, match="fewer micro-batches"):
        EpochPlan([3, 0], max_steps=None)


def test_instance_views_label_each_image_by_index_and_change_every_epoch():
    data = SyntheticLongTail(20, mode="image", image_size=8, seed=0)
    views = InstanceViews(data, noise=0.1, shift=2, seed=3)
    idx = np.array([5, 0, 7])
    x0, y0 = views.batch(idx)
    assert torch.equal(y0, torch.tensor([5, 0, 7])) and x0.shape == (3,) + data.input_shape
    assert torch.equal(views.batch(idx)[0], x0)                       # deterministic
    views.epoch = 1
    assert not torch.equal(views.batch(idx)[0], x0)                    # a new view next epoch
    clean = data.batch(idx)[0]
    assert (x0 - clean).abs().mean() > 0.05                            # noise and shift applied


def _run(out, world, argv, max_steps):
    return run_ranks("tests.cases_train:train_run", world_size=world, timeout=200,
                     kwargs=dict(argv=argv + ["--max-steps", str(max_steps), "--output-dir", str(out),
                                              "--log-every", "1", "--checkpoint-every", "2"]))


def _resume_matches(tmp_path, world, argv, steps, resume_at):
    """Run ``steps`` steps; copy the run, point its ``latest`` at step ``resume_at`` and resume to
    ``steps``: the resumed steps' losses equal the uninterrupted run's."""
    first = _run(tmp_path / "a", world, argv, steps)[0]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "latest").write_text(f"step{resume_at}")
    second = _run(tmp_path / "b", world, argv + ["--resume"], steps)[0]
    a, b = read_log(tmp_path / "a" / "metrics.csv"), read_log(tmp_path / "b" / "metrics.csv")
    tail = steps - resume_at
    assert b["step"][-tail:] == a["step"][-tail:]
    np.testing.assert_allclose(b["loss"][-tail:], a["loss"][-tail:], rtol=1e-5)
    return first, second


_SMALL = ["--num-identities", "200", "--max-images", "20", "--unseen-identities", "20", "--eval-ids-per-bucket",
          "10", "--bucket-edges", "5,10", "--batch-size", "32", "--embedding-dim", "16", "--warmup-steps", "2",
          "--epochs", "3"]


def _first_epoch_steps(argv) -> int:
    """Optimizer steps of epoch 0 on 2 ranks (a plain shuffled epoch)."""
    opts = parse_options(argv)
    data = SyntheticLongTail(opts.num_identities, max_images=opts.max_images, seed=opts.seed)
    return len(data) // (opts.batch_size * 2)


def _into_epoch_1(argv) -> tuple[int, int]:
    """``(resume_at, steps)``: an even step (a --checkpoint-every 2 checkpoint) inside epoch 1, and 3 more."""
    e0 = _first_epoch_steps(argv)
    resume_at = e0 + 1 + (e0 + 1) % 2
    return resume_at, resume_at + 3


@pytest.mark.timeout(300)
def test_long_tail_tricks_and_xbm_train_and_resume_exactly(tmp_path):
    """Class-balanced weights deferred to epoch 1 (DRW), square-root re-sampling from epoch 1 (DRS),
    Partial FC and cross-batch memory on 2 ranks; resumed in epoch 1, the trajectory is unchanged."""
    argv = _SMALL + ["--reweight", "cb_ce", "--drw-epoch", "1", "--sampler", "sqrt", "--drs-epoch", "1",
                     "--sample-rate", "0.5", "--xbm-size", "64", "--xbm-warmup", "3"]
    resume_at, steps = _into_epoch_1(argv)
    first, _ = _resume_matches(tmp_path, 2, argv, steps, resume_at)
    assert 0 < first["top1_seen"] <= 1 and "acc_tail" in first


@pytest.mark.timeout(300)
def test_mixup_cam_balancing_and_sigmoid_focal_run_resumes_exactly(tmp_path):
    """Images and the small ResNet: manifold mixup switched off at epoch 1 (fine-tuning after mixup)
    when CAM-based balanced sampling starts, sigmoid focal loss; resumed across the switch."""
    argv = _SMALL + ["--synthetic-mode", "image", "--image-size", "8", "--backbone", "resnet",
                     "--mixup-alpha", "0.4", "--mixup-layers", "input,features.4", "--mixup-stop-epoch", "1",
                     "--cam-epoch", "1", "--reweight", "sigmoid_focal"]
    e0 = _first_epoch_steps(argv)
    resume_at = e0 - 1 - (e0 - 1) % 2          # a checkpoint in epoch 0, resumed across the switch
    _resume_matches(tmp_path, 2, argv, resume_at + 4, resume_at)


@pytest.mark.timeout(300)
def test_instance_classification_trains_evaluates_by_knn_and_resumes_exactly(tmp_path):
    """One class per image, the contrastive prior, hardest-class smoothing refreshed every epoch;
    resumed at an epoch boundary the trajectory is unchanged; kNN and linear probe reported."""
    argv = _SMALL + ["--task", "instance", "--smoothing-neighbours", "3", "--eval-before"]
    e0 = _first_epoch_steps(argv)
    first, _ = _resume_matches(tmp_path, 2, argv, e0 + 3, e0)
    assert first["head_classes"] == 1181 and first["task"] == "instance" and "top1_seen" not in first
    for key in ("knn_top1", "linear_probe_top1", "recall_at_1"):
        assert 0 <= first[key] <= 1 and key in first["before_training"]


@pytest.mark.timeout(300)
def test_ffc_trains_with_its_pool_resumes_exactly_and_reshards(tmp_path):
    """--head ffc on 2 ranks: dual loader, EMA gallery, slot-sharded pool; the checkpoint (probe,
    gallery, every rank's pool slots) resumes the exact trajectory, and loads on 1 rank."""
    argv = _SMALL + ["--head", "ffc", "--pool-size", "0.3", "--ffc-identities", "4"]
    first, _ = _resume_matches(tmp_path, 2, argv, 7, 4)
    assert first["head"] == "ffc" and first["pool_slots"] == 60 and "top1_seen" not in first
    assert 0 <= first["knn_top1"] <= 1
    one = _run(tmp_path / "b", 1, argv + ["--resume"], 9)[0]        # 2 -> 1 rank: the pool is resharded
    assert one["steps"] == 9 and one["world_size"] == 1
