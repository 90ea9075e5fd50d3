"""Start torch.distributed under any launcher a DeepSpeed user has.

Recognised launchers, in order of precedence:

* torchrun / the DeepSpeed launcher / SLURM with exported variables: ``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT`` (``LOCAL_RANK`` optional) are already set;
* ``mpirun`` (Open MPI, MPICH, Intel MPI) or ``srun``: rank and size come from the launcher's
  variables; rank 0's host and a free port are agreed through mpi4py (or SLURM's node list);
* nothing at all: a single process, world size 1, on a free local port.

The agreed values are written back to ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` so that a later
``deepspeed.initialize`` sees one consistent environment and never runs its own MPI discovery (which,
at 4 ranks on one node, derived conflicting ``LOCAL_RANK`` values and hung the surviving ranks).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

_MPI_VARIABLES = (  # (launcher name, rank, size, local rank)
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun (MPICH/Intel MPI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("srun (SLURM)", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class DistributedInfo:
    """What :func:`init_distributed` found and started."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str
    device: torch.device
    master: str

    def describe(self) -> str:
        return (f"ffc_parallel: launcher={self.launcher}, world_size={self.world_size}, "
                f"backend={self.backend}, device={self.device.type}, master={self.master}")


_INFO: DistributedInfo | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _discover() -> tuple[str, int, int, int]:
    """Return (launcher, rank, world_size, local_rank) and fill in the MASTER_* variables."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        launcher = "deepspeed launcher" if "CROSS_RANK" in env or "DS_ACCELERATOR" in env else "torchrun/env"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return launcher, rank, world, int(env.get("LOCAL_RANK", rank))
    for name, rank_var, size_var, local_var in _MPI_VARIABLES:
        if rank_var in env and size_var in env:
            rank, world = int(env[rank_var]), int(env[size_var])
            local_rank = int(env.get(local_var, 0))
            if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
                addr, port = _agree_master(rank, world)
                env.setdefault("MASTER_ADDR", addr)
                env.setdefault("MASTER_PORT", str(port))
            return name, rank, world, local_rank
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single process", 0, 1, 0


def launched_world_size() -> int:
    """The number of ranks the launcher started (its environment variables), 1 without a launcher."""
    env = os.environ
    for var in ("WORLD_SIZE",) + tuple(size_var for _, _, size_var, _ in _MPI_VARIABLES):
        if var in env:
            return int(env[var])
    return 1


def _agree_master(rank: int, world: int) -> tuple[str, int]:
    """Rank 0's address and a free port on it, agreed by every rank through MPI."""
    if world == 1:
        return "127.0.0.1", _free_port()
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "ffc_parallel: started under MPI without MASTER_ADDR/MASTER_PORT and mpi4py is not installed. "
            "Install it (pip install mpi4py) or export MASTER_ADDR and MASTER_PORT for every rank."
        ) from exc
    payload = (socket.gethostbyname(socket.gethostname()), _free_port()) if rank == 0 else None
    return MPI.COMM_WORLD.bcast(payload, root=0)


def init_distributed(backend: str | None = None, timeout_s: float | None = None,
                     verbose: bool = True) -> DistributedInfo:
    """Initialise ``torch.distributed`` (and DeepSpeed's comm layer if DeepSpeed is imported).

    Idempotent: a second call, or a call after the user initialised torch.distributed, returns the
    same description. Picks ``nccl`` when CUDA is available and ``gloo`` otherwise, binds the CUDA
    device to ``local_rank``, and prints one line on rank 0 describing what it found.
    ``timeout_s`` (default: ``FFC_DIST_TIMEOUT`` or 1800) bounds every collective.
    """
    global _INFO
    if _INFO is not None and dist.is_initialized():
        return _INFO
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        launcher, local_rank = "already initialised", int(os.environ.get("LOCAL_RANK", rank))
        backend = dist.get_backend()
    else:
        launcher, rank, world, local_rank = _discover()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          LOCAL_SIZE=os.environ.get("LOCAL_SIZE", os.environ.get(
                              "OMPI_COMM_WORLD_LOCAL_SIZE", str(world))))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if timeout_s is None:
            timeout_s = float(os.environ.get("FFC_DIST_TIMEOUT", 1800))
        if backend == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    _INFO = DistributedInfo(rank, world, local_rank, backend, launcher, device, master)
    if "deepspeed" in sys.modules:   # DeepSpeed imported: let its comm layer wrap this process group now
        from ..deepspeed_bridge import init_comm
        init_comm(backend)
    if verbose and rank == 0:
        print(_INFO.describe(), file=sys.stderr, flush=True)
    return _INFO


_BEFORE_EXIT: dict = {}   # id -> callable: scratch a process must remove even when it leaves by os._exit


def before_exit(key, fn=None) -> None:
    """Run ``fn`` when this rank leaves through :func:`exit_distributed` (``fn=None`` forgets ``key``)."""
    if fn is None:
        _BEFORE_EXIT.pop(key, None)
    else:
        _BEFORE_EXIT[key] = fn


def exit_distributed(code: int = 0) -> NoReturn:
    """End this rank's process once every rank got here: barrier, destroy the process groups, flush
    stdout/stderr, then ``os._exit(code)`` without the interpreter's teardown.

    Call it last, after files are closed (scratch registered with :func:`before_exit` is removed here). Why: a gloo worker thread can drop the last reference to a
    Python tensor while the interpreter finalizes; that thread then aborts the whole process (SIGABRT,
    "terminate called without an active exception") after a run that succeeded, and the launcher
    reports a failure. Seen about once in 40 two-rank runs with torch 2.13 (core dump: a
    ``ProcessGroupGloo`` worker in ``THPVariable_dealloc`` during ``Py_FinalizeEx``).
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for fn in list(_BEFORE_EXIT.values()):
        fn()
    if "mpi4py" in sys.modules:  # started through mpirun: without MPI_Finalize, mpirun reports a failure
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def get_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1
