"""Data faults on 2 real ranks: ``ffc-train`` under the DeepSpeed launcher (each rank's log apart) and the
step protocol that stops every rank when one cannot load its batch. Each run asserts what every rank
reports and how many seconds pass until every process has exited."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ffc_parallel.data import split_identities, write_face_recordio
from ffc_parallel.testing import run_ranks


def _png(seed: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


CLASSES, PER_CLASS, UNSEEN = 6, 6, 0.34   # 2 unseen classes; 4 x 5 = 20 training images
LABELS = np.repeat(np.arange(CLASSES), PER_CLASS)


def _training_item() -> int:
    """An item of the training split (not of an evaluation set, which every rank decodes at start)."""
    return int(split_identities(LABELS, unseen_fraction=UNSEEN, heldout_per_class=1, seed=0).train[0])


def _folder(root: Path, bad: int | None = None) -> Path:
    for i, label in enumerate(LABELS):
        path = root / f"id{label}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _png(i)
        path.write_bytes(data[: len(data) // 2] if i == bad else data)
    return root


def _launch(tmp_path: Path, data_args: list, timeout: float = 150) -> dict:
    """Run ``ffc-train`` on 2 ranks; ``{rc, logs: [rank 0, rank 1], seconds, after_error, out}``:
    ``seconds`` until the launcher and every rank process are gone, ``after_error`` of those after the
    first traceback appeared in a rank's log."""
    from ffc_parallel.distributed.init import _free_port
    logs, out = tmp_path / "logs", tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port()),
           "--enable_each_rank_log", str(logs), "--module", "ffc_parallel.cli.train", *data_args,
           "--image-size", "8", "--unseen-fraction", str(UNSEEN), "--batch-size", "4", "--epochs", "6",
           "--embedding-dim", "8", "--warmup-steps", "2", "--log-every", "1", "--eval-batch-size", "64",
           "--output-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    start, first_error = time.monotonic(), None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None or _group_alive(proc.pid):
            if time.monotonic() - start > timeout:
                raise AssertionError(f"ffc-train still running after {timeout:.0f} s (a hang)")
            if first_error is None and any("Traceback" in t for t in _rank_logs(logs)):
                first_error = time.monotonic()
            time.sleep(0.1)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    end = time.monotonic()
    return {"rc": proc.returncode, "logs": _rank_logs(logs), "seconds": end - start, "out": out,
            "after_error": None if first_error is None else end - first_error,
            "launcher": proc.stdout.read().decode(errors="replace")}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _rank_logs(logs: Path) -> list:
    files = sorted(logs.glob("*_rank*.log"), key=lambda p: p.name.rsplit("rank", 1)[1]) if logs.is_dir() else []
    return [p.read_text(errors="replace") for p in files]


def _report(name: str, run: dict) -> None:
    after = "" if run["after_error"] is None else f", {run['after_error']:.1f} s after the first traceback"
    print(f"{name}: exit code {run['rc']}, every process gone {run['seconds']:.1f} s after launch{after}")


@pytest.mark.timeout(200)
def test_truncated_recordio_is_refused_by_every_rank_before_training(tmp_path):
    write_face_recordio(tmp_path / "train.rec", [_png(i) for i in range(len(LABELS))], LABELS)
    rec = tmp_path / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-20])           # an interrupted copy: the last record is cut off
    run = _launch(tmp_path, ["--data", "recordio", "--data-path", str(tmp_path)])
    _report("truncated .rec", run)
    assert run["rc"] != 0 and len(run["logs"]) == 2, run["launcher"][-3000:]
    for log in run["logs"]:
        assert f"ValueError: {rec}: record 42 ends past the end of the file" in log, log[-3000:]
    assert not (run["out"] / "metrics.csv").exists()
    assert run["seconds"] < 120


@pytest.mark.timeout(200)
def test_unreadable_image_stops_every_rank_naming_the_file(tmp_path):
    bad = _training_item()
    folder = _folder(tmp_path / "faces", bad=bad)
    bad_path = folder / f"id{LABELS[bad]}" / f"{bad}.png"
    # decoded on access (the decode cache would find it at start on every rank: tests/test_image_sets.py)
    run = _launch(tmp_path, ["--data", "imagefolder", "--data-path", str(folder), "--decode-cache", "none"])
    _report("unreadable image, --on-bad-image fail", run)
    assert run["rc"] != 0 and len(run["logs"]) == 2, run["launcher"][-3000:]
    # The rank that read it raises its own error; the other one learns it at the same step.
    own = [r for r, log in enumerate(run["logs"])
           if f"imagefolder.UnreadableImage: unreadable image {bad_path}: OSError" in log]
    told = [r for r, log in enumerate(run["logs"])
            if f"PeerFailure: rank {1 - r} could not load its next batch: UnreadableImage: unreadable image "
               f"{bad_path}: OSError" in log]
    assert len(own) == 1 and told == [1 - own[0]], "\n=====\n".join(log[-2000:] for log in run["logs"])
    assert "Connection closed by peer" not in "".join(run["logs"])
    assert run["after_error"] is not None and run["after_error"] < 15


@pytest.mark.timeout(200)
def test_skip_trains_through_an_unreadable_image_and_counts_it(tmp_path):
    import json

    from ffc_parallel.evaluation.report import read_log
    bad = _training_item()
    folder = _folder(tmp_path / "faces", bad=bad)
    run = _launch(tmp_path, ["--data", "imagefolder", "--data-path", str(folder), "--on-bad-image", "skip"])
    _report("unreadable image, --on-bad-image skip", run)
    assert run["rc"] == 0, "\n=====\n".join(log[-2000:] for log in run["logs"])
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    log = read_log(run["out"] / "metrics.csv")
    assert metrics["skipped_images"] == log["skipped_images"][-1] >= 1 and metrics["steps"] == 12
    assert log["skipped_images"] == sorted(log["skipped_images"])          # a running total over the ranks
    assert f"skipped unreadable image {folder / f'id{LABELS[bad]}' / f'{bad}.png'}" in "".join(run["logs"])


def fail_on_rank_1_at_step_2(use_lockstep: bool) -> dict:
    """Per rank: what :func:`in_step` / :func:`lockstep` raise when rank 1's third batch fails to load."""
    import torch.distributed as dist

    from ffc_parallel.distributed.lockstep import in_step, lockstep

    def batches():
        for step in range(5):
            if step == 2 and dist.get_rank() == 1:
                raise OSError("unreadable image /data/x.png")
            yield step

    seen = []
    try:
        for batch in (lockstep if use_lockstep else in_step)(batches()):
            seen.append(batch)
    except Exception as exc:
        return {"seen": seen, "error": f"{type(exc).__name__}: {exc}"}
    return {"seen": seen, "error": None}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_lockstep", [False, True])
def test_a_batch_failing_on_one_rank_stops_every_rank_at_that_step(use_lockstep):
    start = time.monotonic()
    results = run_ranks("tests.test_data_faults_ranks:fail_on_rank_1_at_step_2", 2, timeout=60,
                        kwargs={"use_lockstep": use_lockstep})
    print(f"in_step/lockstep failure on 2 ranks: {time.monotonic() - start:.1f} s with start-up")
    assert results[0] == {"seen": [0, 1], "error": "PeerFailure: rank 1 could not load its next batch: "
                                                   "OSError: unreadable image /data/x.png"}
    assert results[1] == {"seen": [0, 1], "error": "OSError: unreadable image /data/x.png"}
