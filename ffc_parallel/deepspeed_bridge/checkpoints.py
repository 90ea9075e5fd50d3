"""DeepSpeed's checkpoint files: saving an engine, loading one at the same or another world size (with
DeepSpeed's universal-checkpoint conversion), and reading its module states. Part of the bridge: the
only place besides ``deepspeed_bridge/__init__.py`` that knows DeepSpeed's internals."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import _UNIVERSAL_ZERO12_FROM, version

_MODULE_FILES = ("mp_rank_*_model_states.pt", "zero_pp_rank_0_mp_rank_*_model_states.pt")
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "lr_scheduler",
                   "data_sampler", "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
                   "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
                   "shared_params", "frozen_param_fragments", "universal_checkpoint_info"}


def _universal_info() -> dict:
    """The client-state entry DeepSpeed's universal conversion requires (0.16-0.18 refuse without it)."""
    from deepspeed.checkpoint import constants as c

    return {c.UNIVERSAL_CHECKPOINT_INFO: {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def save_engine(engine, save_dir, tag: str, client_state: dict, exclude_frozen_parameters: bool = False,
                writes=None) -> None:
    """DeepSpeed's files of ``engine`` into ``save_dir/tag`` (collective; no ``latest`` file, no recovery
    scripts: DeepSpeed puts those into ``save_dir``, outside the checkpoint). ``writes(path, state, write)``,
    if given, performs each of DeepSpeed's file writes (``write()`` is DeepSpeed's own) and must not
    raise: a write failing on one rank then leaves DeepSpeed's collectives in step on every rank."""
    state = dict(client_state or {})
    state.update(_universal_info())
    files = engine.checkpoint_engine
    save = files.save
    with contextlib.ExitStack() as patches:
        patches.enter_context(_patched(engine, "_copy_recovery_script", lambda save_path: None))
        if writes is not None:
            patches.enter_context(_patched(files, "save", lambda state_dict, path: writes(
                Path(path), state_dict, lambda: save(state_dict, path))))
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen_parameters)


@contextlib.contextmanager
def _patched(obj, name: str, value):
    """``obj.name = value`` on the instance for the duration of the block, then as it was."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


def module_states(tag_dir: Path) -> dict:
    """DeepSpeed's module-states file of a checkpoint (rank 0's; counters, client state, world size)."""
    for pattern in _MODULE_FILES:
        files = sorted(Path(tag_dir).glob(pattern))
        if files:
            return torch.load(files[0], map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model-states file ({' or '.join(_MODULE_FILES)})")


def saved_world_size(tag_dir: Path) -> int:
    return int(module_states(tag_dir).get("dp_world_size", 1))


def client_state_of(states: dict) -> dict:
    """The user's ``client_state`` inside DeepSpeed's module-states dict."""
    return {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}


def load_engine(engine, tag_dir: Path, *, load_module_strict=True, load_optimizer_states=True,
                load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    """Load DeepSpeed's part of ``tag_dir`` saved at any data-parallel world size; returns
    ``(path, client_state)`` like ``engine.load_checkpoint`` (collective).

    Same world size: DeepSpeed's own load. Another world size: optimizer states partitioned by ZeRO
    go through DeepSpeed's universal checkpoint (converted on rank 0 into a temporary folder next
    to the checkpoint, removed afterwards); with ``load_optimizer_states=False`` or
    ``load_module_only=True`` only the module is loaded (ZeRO-3: consolidated from its partitions).
    """
    tag_dir = Path(tag_dir)
    saved = saved_world_size(tag_dir)
    kwargs = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                  load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only)
    if custom_load_fn is not None:
        kwargs["custom_load_fn"] = custom_load_fn
    partitioned = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()   # optimizer state per rank
    if saved == engine.dp_world_size or not partitioned:
        return _checked(engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, **kwargs), tag_dir)
    if load_optimizer_states and not load_module_only:
        return _load_universal(engine, tag_dir, saved, kwargs)
    if engine.zero_optimization_stage() < 3:
        kwargs.update(load_optimizer_states=False, load_module_only=True)
        result = _checked(engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, **kwargs), tag_dir)
    else:
        result = str(tag_dir), _load_zero3_module(engine, tag_dir)
    _restore_counters(engine, tag_dir, load_lr_scheduler_states)
    return result


def _checked(result, tag_dir):
    path, client_state = result
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    return path, client_state


def _load_universal(engine, tag_dir: Path, saved: int, kwargs: dict):
    stage = engine.zero_optimization_stage()
    if stage < 3 and version() < _UNIVERSAL_ZERO12_FROM:
        import deepspeed
        raise ValueError(
            f"{tag_dir} was saved at data-parallel world size {saved}, this run has {engine.dp_world_size}: restoring "
            f"the ZeRO-{stage} optimizer state at another world size needs DeepSpeed >= 0.19.7 (DeepSpeed "
            f"{deepspeed.__version__}'s universal checkpoints load wrong values). Upgrade DeepSpeed, resume at world "
            f"size {saved}, or pass load_optimizer_states=False (the backbone's optimizer state then restarts; the "
            f"centers keep theirs)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    work = tag_dir.parent / f".universal-{tag_dir.name}"
    converted = work / tag_dir.name
    error = None
    if rank == 0:
        try:   # any failure here must reach the broadcast below, or the other ranks wait there forever
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   str(tag_dir), "--output_folder", str(converted)], capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
            if proc.returncode != 0:
                error = (proc.stderr.strip().splitlines()[-1:] or ["(no output)"])[0]
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = _from_rank0(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {tag_dir} into {work} failed on rank 0: "
                           f"{error}")
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        result = _checked(engine.load_checkpoint(str(work), tag=tag_dir.name, **kwargs), tag_dir)
    finally:
        config.load_universal_checkpoint = previous
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
    return str(tag_dir), result[1]


def _from_rank0(message):
    """Rank 0's ``message`` (None or a string) on every rank."""
    box = [message]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_zero3_module(engine, tag_dir: Path) -> dict:
    """ZeRO-3, module only, another world size: consolidate the fp32 module from the saved partitions
    on rank 0, scatter it into this run's partitions, refresh the fp32 master copies."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    rank = dist.get_rank() if dist.is_initialized() else 0
    full, error = {}, None
    if rank == 0:
        try:
            full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as exc:   # reported to every rank before the gathers below
            error = f"{type(exc).__name__}: {exc}"
    error = _from_rank0(error)
    if error is not None:
        raise RuntimeError(f"consolidating the ZeRO-3 module of {tag_dir} failed on rank 0: {error}")
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(full[name].to(param.dtype))
    engine.optimizer.refresh_fp32_params()
    return client_state_of(module_states(tag_dir))


def _restore_counters(engine, tag_dir: Path, load_lr_scheduler_states: bool) -> None:
    """After a module-only load, the step counters (and scheduler) DeepSpeed skipped."""
    states = module_states(tag_dir)
    engine.global_steps = states.get("global_steps", engine.global_steps)
    engine.global_samples = states.get("global_samples", engine.global_samples)
    engine.skipped_steps = states.get("skipped_steps", engine.skipped_steps)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])


def consolidated_fp32_state_dict(tag_dir: Path) -> dict:
    """The full fp32 ``state_dict`` of the module saved in ``tag_dir`` (ZeRO partitions merged), offline."""
    tag_dir = Path(tag_dir)
    module = module_states(tag_dir)["module"]
    full = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in module.items()}
    if list(tag_dir.glob("*optim_states.pt")) and list(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        merged = dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
        # Under ZeRO-1 DeepSpeed records no frozen parameters (their shapes are saved from stage 2 on), so
        # the merge leaves them out: they are whole in the module state (ZeRO-3 keeps empty placeholders there).
        return {**{k: v for k, v in full.items() if torch.is_tensor(v) and v.numel() > 0}, **merged}
    return full
