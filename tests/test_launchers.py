"""Each launch script starts a real 2-rank (and 4-rank mpirun) run of a tiny entry point (FFC_ENTRY)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffc_parallel.testing import _free_port, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "launch_scripts"


def _config(tmp_path, micro=2, world=2):
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def _run(script, tmp_path, world, extra_env=None, timeout=240):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(FFC_ENTRY="tests.launch_entry", PYTHON=sys.executable, MASTER_PORT=str(_free_port()),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path), **(extra_env or {}))
    cmd = ["bash", str(SCRIPTS / script), "--deepspeed_config", str(_config(tmp_path)), "--out", str(out)]
    run_command(cmd, cwd=ROOT, env=env, timeout=timeout)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["world_size"] == world for r in results)
    assert len({tuple(r["losses"]) for r in results}) == 1, "ranks disagree on the loss"
    assert sorted(tuple(r["class_range"]) for r in results)[-1][1] == 13
    return results


def test_deepspeed_launcher_single_node(tmp_path):
    _run("deepspeed_single_node.sh", tmp_path, 2, {"NUM_GPUS": "2"})


def test_deepspeed_launcher_openmpi_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    _run("deepspeed_multi_node.sh", tmp_path, 2, {"HOSTFILE": str(hostfile), "NO_SSH_CHECK": "1",
                                                  "MASTER_ADDR": "127.0.0.1"})


@pytest.mark.parametrize("world", [2, 4])
def test_mpirun(tmp_path, world):
    results = _run("mpirun.sh", tmp_path, world, {"NP": str(world)})
    assert all("mpirun" in r["launcher"] for r in results)


def test_torchrun(tmp_path):
    _run("torchrun.sh", tmp_path, 2, {"NPROC": "2"})


def test_slurm_template_is_valid_bash_and_uses_the_entry_point():
    text = (SCRIPTS / "slurm.sbatch").read_text()
    assert "${FFC_ENTRY:-ffc_parallel.cli.train}" in text
    subprocess.run(["bash", "-n", str(SCRIPTS / "slurm.sbatch")], check=True)


def test_run_ranks_through_the_deepspeed_launcher():
    from ffc_parallel.testing import run_ranks

    touched = run_ranks("tests.cases_engine:partial_fc_touches_only_sampled_rows", 2, launcher="deepspeed",
                        timeout=300)
    assert len(touched) == 2 and all(t > 0 for t in touched)


@pytest.mark.parametrize("fault", ["sigterm_to_the_script", "kill_9_of_rank_1"])
def test_a_stopped_job_leaves_no_process(tmp_path, fault):
    # DeepSpeed's runner does not forward SIGTERM: its per-node launcher and the ranks went on as orphans.
    # A rank killed with SIGKILL: the DeepSpeed launcher must end the others.
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, FFC_ENTRY="tests.launch_entry", PYTHON=sys.executable, MASTER_PORT=str(_free_port()),
               NUM_GPUS="2", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    cmd = ["bash", str(SCRIPTS / "deepspeed_single_node.sh"), "--deepspeed_config", str(_config(tmp_path)),
           "--out", str(out), "--steps", "100000", "--step-seconds", "0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not all((out / f"rank{r}.step").exists() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.5)
        sent = time.monotonic()
        if fault == "sigterm_to_the_script":
            proc.send_signal(signal.SIGTERM)
        else:
            os.kill(int((out / "rank1.step").read_text().split()[1]), signal.SIGKILL)
        proc.wait(timeout=60)
        seconds = time.monotonic() - sent
        left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        assert not left, f"processes of the job still running: {left}"
        print(f"{fault}: every process of the job gone {seconds:.1f} s after it")
        assert seconds < 30, f"the job took {seconds:.0f} s to stop"
        assert proc.returncode != 0
        if fault == "sigterm_to_the_script":   # each rank unwound and wrote its record
            results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
            assert all(r["stopped"] and r["losses"] for r in results), results
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-9", "-f", str(out)])
