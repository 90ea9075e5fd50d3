"""Checkpoint faults on 2 real ranks (gloo, ZeRO-1, drop-in route), each under a hard timeout and timed to
the exit of every process: damaged files are named on every rank by ``fp.load_checkpoint``, by
``ffc-reshard`` and ``ffc-export`` (exit code 2, no partial output); a full disk (a real tmpfs) and
failing writes on one rank raise the same error on every rank, leave no staging directory and ``latest``
as it was, and training goes on to a save that loads back equal to a run that never saw the fault."""
import contextlib
import os
import subprocess
import sys
import time

import pytest

from ffc_parallel.testing import run_ranks
from tests.cases_checkpoint_faults import BACKBONE, DAMAGES, OLD_INTACT, TAG

pytestmark = pytest.mark.deepspeed


def _timed_ranks(target, bound, **kwargs):
    """``run_ranks(target, 2)`` and the seconds until both processes exited, asserted below ``bound``."""
    start = time.monotonic()
    results = run_ranks(target, 2, timeout=120, kwargs=kwargs)
    seconds = time.monotonic() - start
    print(f"{target}: both ranks exited after {seconds:.1f} s")
    assert seconds < bound, f"{target} took {seconds:.1f} s (a rank waiting in a collective?)"
    return results


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Every damaged copy of one 2-rank checkpoint, and what each rank said loading it."""
    root = tmp_path_factory.mktemp("damaged")
    results = _timed_ranks("tests.cases_checkpoint_faults:load_damaged_copies", 60,
                           ckpt=str(root / "ckpt"), work=str(root))
    return root, results


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_load_names_the_damaged_file_on_every_rank(damaged, how):
    root, results = damaged
    name, says = DAMAGES[how]
    first, second = (r[how] for r in results)
    assert first["error"] is not None and first["error"] == second["error"], (first, second)
    assert str(root / how / TAG / name) in first["error"] and says in first["error"], first["error"]
    assert first["warned"] == second["warned"] == how.startswith("old_")
    assert max(first["seconds"], second["seconds"]) < 10


def test_checkpoint_without_table_loads_with_a_warning(damaged):
    _, results = damaged
    assert all(r[OLD_INTACT]["error"] is None and r[OLD_INTACT]["warned"] for r in results)


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_reshard_and_export_refuse_the_damaged_file(damaged, how, tmp_path, capsys):
    from ffc_parallel.cli.export import main as export
    from ffc_parallel.cli.reshard import main as reshard

    root, _ = damaged
    name, says = DAMAGES[how]
    src, out = root / how, tmp_path / "out"
    with pytest.warns(UserWarning, match="no table") if how.startswith("old_") else contextlib.nullcontext():
        assert reshard([str(src), str(out), "--world-size", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(src / TAG / name) in err and says in err, err
    assert not out.exists() or list(out.iterdir()) == [], "reshard left a partial output"
    if name == BACKBONE:   # export reads the backbone only
        assert export([str(src), str(tmp_path / "b.pt")]) == 2
        assert str(src / TAG / name) in capsys.readouterr().err and not list(tmp_path.glob("b.pt*"))


def test_reshard_command_exits_2_on_a_truncated_backbone(damaged, tmp_path):
    root, _ = damaged
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ffc_parallel.cli.reshard", str(root / "truncated_backbone"),
                           str(tmp_path / "out"), "--world-size", "3", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.monotonic() - start
    print(f"ffc-reshard on a truncated backbone exited {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode == 2 and str(root / "truncated_backbone" / TAG / BACKBONE) in proc.stderr, proc.stderr
    assert "truncated" in proc.stderr and seconds < 30


def test_reshard_of_a_checkpoint_without_table_adds_one(damaged, tmp_path):
    import json

    from ffc_parallel.cli.reshard import main as reshard

    root, _ = damaged
    with pytest.warns(UserWarning, match="no table"):
        assert reshard([str(root / OLD_INTACT), str(tmp_path / "out"), "--world-size", "3", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / TAG / "ffc_shards" / "manifest.json").read_text())
    shards = [f"ffc_shards/classifier/shard_0000{r}.pt" for r in range(3)]
    zero = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert sorted(manifest["files"]) == sorted([BACKBONE, *shards, *zero])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (about four of the test's checkpoints), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (a full disk is injected in test_write_failure_on_one_rank_...)")
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_is_the_same_error_on_every_rank_and_training_goes_on(small_tmpfs, tmp_path):
    results = _timed_ranks("tests.cases_checkpoint_faults:disk_full_then_train_on", 90,
                           mount=str(small_tmpfs), roomy=str(tmp_path / "roomy"))
    assert results[0]["errors"] == results[1]["errors"]
    ckpt = small_tmpfs / "ckpt"
    for what, error in results[0]["errors"].items():
        head = f"no space left on {ckpt}, needed about "
        assert error.startswith(head), error
        needed = float(error[len(head):].split(" MB")[0])
        assert abs(needed - results[0]["saved_bytes"] / 1e6) <= 0.1, (needed, results[0]["saved_bytes"])
        assert f"{ckpt}/.staging-global_step" in error and "was removed" in error
    shards, deepspeed = results[0]["errors"]["shards"], results[0]["errors"]["deepspeed"]
    assert "rank 0: could not write" in shards and "shard_00000.pt" in shards and "shard_00001.pt" in shards
    assert "unexpected pos" in shards or "No space left" in shards
    assert BACKBONE in deepspeed and "iostream error" in deepspeed, deepspeed


def test_write_failure_on_one_rank_is_an_error_on_every_rank(tmp_path):
    results = _timed_ranks("tests.cases_checkpoint_faults:one_rank_write_fails", 60, ckpt=str(tmp_path / "ckpt"))
    assert results[0] == results[1]
    ckpt = tmp_path / "ckpt"
    deepspeed, latest = results[0]["deepspeed_rank1"], results[0]["latest_rank0"]
    assert deepspeed.startswith(f"no space left on {ckpt}, needed about ") and "rank 1: could not write" in deepspeed
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in deepspeed and "rank 0:" not in deepspeed
    assert latest.startswith(f"no space left on {ckpt}") and "rank 0: could not publish" in latest, latest
    assert f"{ckpt}/latest is unchanged" in latest and "latest" in latest.split("could not publish")[1]
