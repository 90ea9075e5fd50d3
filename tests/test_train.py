"""ffc-train: options, DeepSpeed config, reports, and real 2-rank runs (DeepSpeed launcher; resume)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ffc_parallel.cli.train import (TrainOptions, check_resumable, deepspeed_config, load_config_file,
                                    parse_options)
from ffc_parallel.evaluation.report import RunLog, read_log, summary_text, write_metrics_json, write_plots
from ffc_parallel.testing import run_ranks


def test_defaults_config_file_and_flags_in_that_order(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data:\n  num_identities: 500\nmodel:\n  margin: cosface\nlr: 0.05\nbucket_edges: [5, 50]\n")
    opts = parse_options(["--config", str(yaml_file), "--lr", "0.2", "--resume"])
    assert (opts.num_identities, opts.margin, opts.lr, opts.resume) == (500, "cosface", 0.2, True)
    assert opts.bucket_edges == [5, 50] and opts.epochs == TrainOptions().epochs
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"sample-rate": 0.1, "epochs": 7}))
    opts = parse_options(["--config", str(json_file), "--bucket-edges", "3,30"])
    assert (opts.sample_rate, opts.epochs, opts.bucket_edges) == (0.1, 7, [3, 30])


def test_bad_options_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        load_config_file(bad)
    with pytest.raises(SystemExit):
        parse_options(["--optimizer", "lamb"])
    with pytest.raises(ValueError, match="lr must be a float, got 'fast'"):
        parse_options(["--lr", "fast"])
    with pytest.raises(ValueError, match="bucket_edges"):
        parse_options(["--bucket-edges", "50,20"])


def test_deepspeed_config_takes_batch_optimizer_and_schedule_from_options(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 999, "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    opts = TrainOptions(batch_size=32, gradient_accumulation=2, optimizer="sgd", lr=0.3, momentum=0.8,
                        weight_decay=1e-4, schedule="cosine", warmup_steps=10, deepspeed_config=str(user))
    cfg = deepspeed_config(opts, total_steps=100)
    assert "train_batch_size" not in cfg and cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["bf16"] == {"enabled": True}
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_allow_untested_optimizer"] is True
    assert cfg["optimizer"] == {"type": "SGD", "params": {"lr": 0.3, "weight_decay": 1e-4, "momentum": 0.8}}
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100 and cfg["scheduler"]["params"]["warmup_num_steps"] == 10
    cfg = deepspeed_config(TrainOptions(optimizer="adamw", schedule="linear"), total_steps=40)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["scheduler"]["type"] == "WarmupDecayLR"
    assert cfg["zero_optimization"] == {"stage": 0}
    cfg = deepspeed_config(TrainOptions(optimizer="adam", schedule="constant"), total_steps=40)
    assert cfg["optimizer"]["params"]["adam_w_mode"] is False and cfg["scheduler"]["type"] == "WarmupLR"


def test_reports_render_headless(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,epoch,loss,lr,loss_scale,samples_per_s,elapsed_s\n"
                                          "10,0.5,4.0,0.1,1,100,1\n20,1.0,3.0,0.05,1,120,2\n")
    log = read_log(tmp_path / "metrics.csv")
    assert log["loss"] == [4.0, 3.0] and log["step"] == [10.0, 20.0]
    metrics = {"acc_head": 0.9, "acc_medium": 0.5, "acc_tail": None, "roc_auc": 0.75, "top1_seen": 0.5,
               "tar_at_far_1e-3": float("nan"), "before_training": {"top1_seen": 0.0}}
    paths = write_plots(tmp_path / "plots", log, metrics, {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1]})
    assert sorted(p.name for p in paths) == ["bucket_accuracy.png", "loss.png", "lr.png", "roc.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    write_metrics_json(tmp_path / "m.json", metrics)
    assert json.loads((tmp_path / "m.json").read_text())["tar_at_far_1e-3"] is None
    text = summary_text(metrics, tmp_path)
    assert "50.0%" in text and "0.7500" in text and "untrained" in text and len(text.splitlines()) <= 24


def test_default_scale_is_16_below_10k_classes_and_the_face_presets_keep_64():
    from ffc_parallel.cli.recipe import head_scale, parse_margin
    from ffc_parallel.heads import resolve_margin
    assert head_scale(TrainOptions(), 2844) == 16.0 and head_scale(TrainOptions(margin="cosface"), 10) == 16.0
    assert resolve_margin("arcface", head_scale(TrainOptions(), 10_000)).s == 64.0   # the quickstart's identities
    assert head_scale(TrainOptions(scale=30.0), 10) == 30.0
    for preset in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        opts = parse_options(["--config", str(preset)])
        assert head_scale(opts, 10) is None and parse_margin(opts.margin).s == 64.0, preset.name


def test_loss_plot_draws_a_moving_average_apart_from_the_raw_loss():
    from ffc_parallel.evaluation.report import _smooth, smoothing_window
    loss = [5.0 - 0.05 * i + (0.5 if i % 2 else -0.5) for i in range(80)]   # 800 steps logged every 10
    window = smoothing_window(len(loss))
    assert window == 8 and smoothing_window(2) == 0
    average = _smooth(loss, window)
    assert max(abs(a - b) for a, b in zip(average, loss)) > 0.4          # two lines, not one on top of the other
    assert average[-1] == pytest.approx(sum(loss[-8:]) / 8)


@pytest.mark.timeout(450)  # includes DeepSpeed's one-time JIT build of its CPU comm op on a fresh machine
def test_deepspeed_launcher_two_ranks_learn_digits(tmp_path):
    """The real command line under the DeepSpeed launcher: 2 ranks learn sklearn digits far above chance."""
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
           str(_free_port()), "--module", "ffc_parallel.cli.train", "--data", "digits", "--epochs", "6",
           "--batch-size", "32", "--embedding-dim", "32", "--margin", "cosface", "--scale", "16", "--lr", "0.2",
           "--warmup-steps", "5", "--output-dir", str(out)]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    # Own session: on a time-out the launcher AND its rank processes are killed.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1_seen", "tar_at_far_1e-3", "recall_at_1", "samples_per_s", "acc_head", "acc_medium",
                "acc_tail", "roc_auc"):
        assert key in metrics
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 * (1122 // 64)
    assert metrics["top1_seen"] > 0.8  # 8 classes: chance is 0.125
    assert metrics["loss_last"] < metrics["loss_first"]
    assert "TAR @ FAR=1e-3" in stdout
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "lr.png", "bucket_accuracy.png", "roc.png"}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{metrics['steps']}"


@pytest.mark.timeout(240)
def test_resume_continues_from_the_checkpoint(tmp_path):
    """Synthetic images, the small ResNet, bf16 with ZeRO-1 and Partial FC: stop at step 4, resume to 7."""
    out = str(tmp_path / "run")
    ds_config = tmp_path / "bf16.json"
    ds_config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    first = run_ranks("tests.cases_train:train_run", world_size=2, timeout=200,
                      kwargs=dict(argv=_tiny(out, max_steps=4) + ["--deepspeed-config", str(ds_config)]))
    assert first[0]["steps"] == 4 and first[1] is None
    second = run_ranks("tests.cases_train:train_run", world_size=2, timeout=200,
                       kwargs=dict(argv=_tiny(out, max_steps=7) + ["--resume", "--deepspeed-config", str(ds_config)]))
    assert second[0]["steps"] == 7
    log = read_log(Path(out) / "metrics.csv")
    assert log["step"] == [2.0, 4.0, 6.0, 7.0]  # appended, continuing from step 4
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check_resumable(TrainOptions(output_dir=str(tmp_path / "empty"), resume=True))


def test_a_resumed_log_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    first = RunLog(tmp_path, enabled=True, resume_step=None)
    for step in (2, 4, 6, 8):   # the run crashed after logging step 8; its last checkpoint was step 4
        first.row(step=step, epoch=0, loss=1.0, lr=0.1, loss_scale=1.0, samples_per_s=1.0, elapsed_s=1.0, skipped_images=0)
    first.close()
    resumed = RunLog(tmp_path, enabled=True, resume_step=4)
    resumed.row(step=6, epoch=0, loss=0.5, lr=0.1, loss_scale=1.0, samples_per_s=1.0, elapsed_s=1.0, skipped_images=0)
    resumed.close()
    log = read_log(tmp_path / "metrics.csv")
    assert log["step"] == [2.0, 4.0, 6.0] and log["loss"] == [1.0, 1.0, 0.5]


def test_runs_that_cannot_train_or_evaluate_are_refused_before_training():
    import torch

    from ffc_parallel.cli.recipe import check_trainable_and_evaluable
    from ffc_parallel.data import build_data
    from ffc_parallel.models import build_backbone

    bundle = build_data("synthetic", num_identities=300, unseen_identities=20, eval_ids_per_bucket=10, seed=0)
    mlp = build_backbone("mlp", bundle.input_shape, 8)
    check_trainable_and_evaluable(TrainOptions(batch_size=2), bundle, mlp)
    with pytest.raises(ValueError, match="BatchNorm needs at least 2 samples per rank"):
        check_trainable_and_evaluable(TrainOptions(batch_size=1), bundle, torch.nn.BatchNorm1d(4))
    x, ids = bundle.unseen
    one = bundle.__class__(**{**bundle.__dict__, "unseen": (x[ids == ids[0]], ids[ids == ids[0]])})
    with pytest.raises(ValueError, match="holds 1 unseen identities"):
        check_trainable_and_evaluable(TrainOptions(), one, mlp)
    none_seen = bundle.__class__(**{**bundle.__dict__, "seen": (x[:0], ids[:0])})
    with pytest.raises(ValueError, match="no held-out images of training classes"):
        check_trainable_and_evaluable(TrainOptions(), none_seen, mlp)


def _tiny(out: str, max_steps: int) -> list:
    return ["--num-identities", "300", "--synthetic-mode", "image", "--image-size", "8", "--backbone", "resnet",
            "--sample-rate", "0.5", "--unseen-identities", "20", "--eval-ids-per-bucket", "10",
            "--batch-size", "16", "--embedding-dim", "16", "--max-steps", str(max_steps), "--log-every", "2",
            "--checkpoint-every", "2", "--warmup-steps", "2", "--output-dir", out]


def _free_port() -> int:
    from ffc_parallel.distributed.init import _free_port as free
    return free()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env
