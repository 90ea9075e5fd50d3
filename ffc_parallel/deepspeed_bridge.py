"""Everything ffc_parallel knows about DeepSpeed: the only module that imports it.

The rest of the package talks to DeepSpeed through DeepSpeed's public API (``deepspeed.initialize``,
the engine's ``forward``/``backward``/``step``/``save_checkpoint``/``load_checkpoint``) and through
this module, which also holds every version difference. Read against DeepSpeed 0.16.0 and 0.19.8
(CPU accelerator, gloo); :data:`SUPPORTED` is the range CI runs.

What it does:

* **Engine discovery** (:func:`watch`): a module that needs to know which engine trains it (a
  :class:`~ffc_parallel.ShardedClassifier`, the cross-batch memory, FFC) is watched from its
  construction until its first training forward. While anything is watched, a global forward
  pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``, removed again as soon as
  nothing is watched: it costs a few microseconds per module call) sees each DeepSpeed engine the
  moment it is called, records the ranks over which it AVERAGES gradients (:func:`averaged_size`)
  and attaches every watched module inside ``engine.module`` to an :class:`EngineView`.
* **The centers' step** (:class:`EngineView`): ``torch.optim.optimizer.register_optimizer_step_post_hook``
  fires after DeepSpeed's inner optimizer steps, i.e. only when DeepSpeed applies a step (never on
  an fp16 overflow), at the accumulation boundary, once per parameter group (ZeRO 1/2) or sub-group
  (ZeRO-3); the first call of a boundary steps the attached centers with that optimizer's type,
  hyperparameters and scheduled learning rate.
* **Checkpoints** (:func:`save_engine`, :func:`load_engine`): DeepSpeed's own files, including the
  universal-checkpoint conversion that restores the backbone's ZeRO optimizer state at another
  world size.
* **Global-norm clipping** (:class:`GlobalNormClipping`, used by ``fp.initialize`` only): DeepSpeed
  has no hook for it, so its clipping method is wrapped, the argument found by name.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed.checks import guard_norm_statistics
from .distributed.collectives import scale_grad

SUPPORTED = ">=0.16.0,<0.20,!=0.18.7,!=0.18.8,!=0.18.9"   # setup.cfg's range; CI runs the oldest and the newest
_MIN_VERSION, _BELOW = (0, 16, 0), (0, 20, 0)
_BROKEN_STEP = "its ZeRO-1/2 step fails on 4 ranks under torch 2.13 ('Output 0 of Split is a view ...')"
_KNOWN_BROKEN = {(0, 18, 7): _BROKEN_STEP, (0, 18, 8): _BROKEN_STEP, (0, 18, 9): _BROKEN_STEP}
# ZeRO-1/2 universal checkpoints (the backbone's optimizer state at another world size) load wrong values
# before 0.19.7 (0.16.0-0.19.6 measured by benchmarks/deepspeed_versions.py); ZeRO-3's are right from 0.16.
_UNIVERSAL_ZERO12_FROM = (0, 19, 7)
# Before 0.19.8, ZeRO-3's coalesced parameter all-gather waits for its last asynchronous gather only; gloo
# runs them on independent threads, so a forward may read parameters before they arrive (DeepSpeed PR
# #8539). CUDA/NCCL is not affected.
ZERO3_GLOO_SAFE_FROM = (0, 19, 8)


# ---------------------------------------------------------------------- import and version
def version() -> tuple[int, int, int]:
    import deepspeed

    parts = (deepspeed.__version__.split("+")[0].split(".") + ["0", "0"])[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def require():
    """``import deepspeed``, refusing a version outside :data:`SUPPORTED` with a clear error."""
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"ffc_parallel needs DeepSpeed ({SUPPORTED}): pip install 'ffc_parallel[deepspeed]'") from exc
    found = version()
    if not _MIN_VERSION <= found < _BELOW or found in _KNOWN_BROKEN:
        why = _KNOWN_BROKEN.get(found, "not tested")
        raise RuntimeError(f"ffc_parallel: DeepSpeed {deepspeed.__version__} is not supported ({why}); "
                           f"install deepspeed{SUPPORTED} (pip install 'deepspeed{SUPPORTED}')")
    return deepspeed


def init_comm(backend: str) -> None:
    """Let DeepSpeed wrap the process group already started (no MPI discovery of its own).

    Without CUDA, DeepSpeed would first JIT-compile its shared-memory all-reduce op with gcc
    (minutes on a small machine; a build killed mid-way leaves a file lock that hangs every later
    start). Only its ``inference_all_reduce`` uses that op, so its builder is replaced by a no-op:
    training collectives go through torch.distributed either way.
    """
    deepspeed = require()
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _engine_class():
    module = sys.modules.get("deepspeed.runtime.engine")
    return getattr(module, "DeepSpeedEngine", None)


def is_engine(obj) -> bool:
    cls = _engine_class()
    return cls is not None and isinstance(obj, cls)


# ---------------------------------------------------------------------- engine discovery
_watched: "weakref.WeakSet" = weakref.WeakSet()
_averaging: dict[tuple[int, ...], int] = {}     # ranks a seen engine averages gradients over -> their number
_views: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # engine -> EngineView
_forward_hook = None


def watch(module) -> None:
    """Keep the engine discovery on until ``unwatch(module)``; ``module._attach_engine(view)`` (if it
    defines it) is called when a DeepSpeed engine whose model contains ``module`` is called."""
    global _forward_hook
    _watched.add(module)
    if _forward_hook is None:
        _forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(_before_forward)


def unwatch(module) -> None:
    global _forward_hook
    _watched.discard(module)
    if not _watched and _forward_hook is not None:
        _forward_hook.remove()
        _forward_hook = None


def attach(engine) -> "EngineView":
    """Record ``engine`` and attach the watched modules inside its model (also called by checkpoints,
    which may run before the first forward)."""
    view = view_of(engine)
    for child in engine.module.modules():
        if child in _watched and hasattr(child, "_attach_engine"):
            child._attach_engine(view)
            unwatch(child)
            guard_norm_statistics(engine.module)   # a batch our checks refuse leaves BatchNorm's statistics
    return view


def _before_forward(module, _inputs):
    if is_engine(module):
        attach(module)
    return None


def engines_seen() -> bool:
    """Whether any DeepSpeed engine has run a forward in this process."""
    return bool(_averaging)


def partitioned(param) -> bool:
    """Whether ZeRO-3 partitioned ``param`` (its data is then a placeholder outside a gather)."""
    return hasattr(param, "ds_status")


def group_ranks(group) -> tuple[int, ...]:
    """The global ranks of ``group`` (None: the world)."""
    if not dist.is_initialized():
        return (0,)
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def averaged_size(group) -> int:
    """How many ranks a DeepSpeed engine seen in this process averages gradients over, if those are
    exactly ``group``'s ranks; else 1. A collective loss whose backbone gradient must be the SUM over
    ranks multiplies its embedding gradient by this."""
    return _averaging.get(group_ranks(group), 1)


class GradientSum:
    """The factor on a collective loss's embedding gradient that turns DeepSpeed's AVERAGE of the
    backbone's gradients over ranks into the SUM the loss needs (its gradient for this rank's
    embeddings is this rank's part of a loss every rank holds): :func:`averaged_size` of ``group``,
    read at the first training call (``fixed`` overrides it, e.g. the world size under DDP)."""

    def __init__(self, module, group, fixed: float | None = None):
        self.group, self.value = group, None if fixed is None else float(fixed)
        self._module = weakref.ref(module)
        if self.value is None:
            watch(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` whose gradient is multiplied by the factor (identity without a graph)."""
        if not torch.is_grad_enabled():
            return x
        if self.value is None:
            self.value = float(averaged_size(self.group))
            module = self._module()
            if module is not None:
                unwatch(module)
        return scale_grad(x, self.value) if self.value != 1.0 else x


def view_of(engine) -> "EngineView":
    view = _views.get(engine)
    if view is None:
        view = _views[engine] = EngineView(engine)
        _averaging[view.dp_ranks] = len(view.dp_ranks)
    return view


# ---------------------------------------------------------------------- what the centers need from an engine
def _inner_optimizer(wrapper):
    """The torch optimizer DeepSpeed's optimizer wraps (ZeRO, fp16 and bf16 wrappers hold it as ``.optimizer``)."""
    opt = wrapper
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _trained_tensors(wrapper) -> list:
    """The model parameters DeepSpeed's optimizer updates (0.16-0.19 attribute names)."""
    found = []
    for name in ("bit16_groups", "fp16_groups", "bf16_groups"):   # ZeRO 1/2; ZeRO-3 and FP16_Optimizer; BF16_Optimizer
        for group in getattr(wrapper, name, None) or []:
            found.extend(group if isinstance(group, (list, tuple)) else [group])
    for group in getattr(_inner_optimizer(wrapper), "param_groups", []):
        found.extend(group["params"])
    return found


class CenterSettings:
    """The update rule of DeepSpeed's inner optimizer, for the centers: ``kind`` (sgd | adam | adamw),
    ``hyper`` (momentum, dampening, nesterov, weight_decay / betas, eps, weight_decay) and ``lr``,
    all read from its first parameter group."""

    SUPPORTED = "SGD, Adam and AdamW (torch's, DeepSpeed's FusedAdam and DeepSpeedCPUAdam)"

    def __init__(self, opt):
        group = opt.param_groups[0]
        name = type(opt).__name__
        if group.get("maximize") or group.get("amsgrad"):
            raise ValueError(f"DeepSpeed's optimizer {name} uses maximize/amsgrad, which the class centers' "
                             f"optimizer does not support ({self.SUPPORTED} without them)")
        if isinstance(opt, torch.optim.SGD):
            self.kind = "sgd"
            self.hyper = {k: group.get(k, d) for k, d in
                          (("momentum", 0.0), ("dampening", 0.0), ("nesterov", False), ("weight_decay", 0.0))}
        elif isinstance(opt, torch.optim.AdamW) or name in ("FusedAdam", "DeepSpeedCPUAdam") or \
                isinstance(opt, torch.optim.Adam):
            decoupled = (isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
                         if isinstance(opt, torch.optim.Adam) else bool(getattr(opt, "adam_w_mode", True)))
            if not group.get("bias_correction", True):
                raise ValueError(f"DeepSpeed's optimizer {name} runs without bias correction, which the class "
                                 "centers' optimizer does not support")
            self.kind = "adamw" if decoupled else "adam"
            self.hyper = {"betas": tuple(group.get("betas", (0.9, 0.999))), "eps": group.get("eps", 1e-8),
                          "weight_decay": group.get("weight_decay", 0.0)}
        else:
            raise ValueError(f"DeepSpeed's optimizer is {name}: the class centers of ffc_parallel.ShardedClassifier "
                             f"can follow {self.SUPPORTED}; set the config's optimizer type to one of them")
        self.lr = float(group["lr"])


class EngineView:
    """One DeepSpeed engine as the class centers see it: its data-parallel ranks, fp16 loss scale,
    step counter and inner optimizer, whose steps drive the attached centers (``trainers``: objects
    with ``step_centers(settings)``)."""

    def __init__(self, engine):
        self.engine = engine
        self.dp_ranks = group_ranks(getattr(engine, "data_parallel_group", None))
        self.inner = _inner_optimizer(engine.optimizer) if engine.optimizer is not None else None
        self.trainers: list = []
        self._stepped_at = None
        _register_step_hook()

    @property
    def fp16(self) -> bool:
        return bool(self.engine.fp16_enabled())

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    @property
    def gradient_clipping(self) -> float:
        return float(self.engine.gradient_clipping() or 0.0)

    def loss_scale(self) -> float:
        """The loss scale the next backward multiplies the loss by (1 without fp16)."""
        return float(self.engine.optimizer.loss_scale) if self.fp16 else 1.0

    def trains(self, tensor) -> bool:
        """Whether DeepSpeed's optimizer updates ``tensor`` (or ZeRO-3 partitioned it)."""
        return hasattr(tensor, "ds_id") or any(t is tensor for t in _trained_tensors(self.engine.optimizer))

    def settings(self) -> CenterSettings:
        if self.inner is None:
            raise ValueError("the DeepSpeed engine has no optimizer (give deepspeed.initialize a config with an "
                             "`optimizer` section or an optimizer): nothing can step the class centers")
        return CenterSettings(self.inner)

    def check_trainable(self, what: str) -> None:
        """Raise for DeepSpeed configurations the centers cannot follow exactly."""
        if self.zero_stage == 3 and dist.get_backend() == "gloo" and version() < ZERO3_GLOO_SAFE_FROM:
            import warnings
            warnings.warn(f"DeepSpeed {'.'.join(map(str, version()))} gathers ZeRO-3 parameters racily under gloo "
                          "(DeepSpeed PR #8539: wrong or inf losses in some CPU runs); use DeepSpeed >= 0.19.8 for "
                          "ZeRO-3 on CPU. NCCL is not affected.", stacklevel=3)
        if self.fp16 and self.zero_stage == 0:
            raise ValueError(f"{what}: fp16 with ZeRO stage 0 is not supported (DeepSpeed 0.19's stage-0 fp16 "
                             "optimizer does not scale the loss in engine.backward but unscales in step()); use "
                             "ZeRO stage 1, 2 or 3 (deepspeed_configs/zero1_fp16.json) or bf16")
        self.settings()

    def _after_step(self, opt) -> None:
        step = self.global_steps
        if self._stepped_at == step:   # ZeRO 1/2: once per parameter group; ZeRO-3: per sub-group
            return
        self._stepped_at = step
        settings = CenterSettings(opt)
        for trainer in self.trainers:
            trainer.step_centers(settings)


_step_hook = None
_foreign_checked: "weakref.WeakSet" = weakref.WeakSet()   # optimizers outside DeepSpeed already looked at
_bound_weights: dict[int, "weakref.ref"] = {}   # id(center weight) -> weight, of heads attached to an engine


def note_bound_weight(weight) -> None:
    _bound_weights[id(weight)] = weakref.ref(weight)


def _register_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(opt, _args, _kwargs) -> None:
    for view in list(_views.values()):
        if view.inner is opt:
            view._after_step(opt)
            return
    if opt in _foreign_checked:
        return
    _foreign_checked.add(opt)
    for group in opt.param_groups:
        for p in group["params"]:
            ref = _bound_weights.get(id(p))
            if ref is not None and ref() is p:
                raise RuntimeError(
                    f"an optimizer ({type(opt).__name__}) outside DeepSpeed steps the class centers of an "
                    "ffc_parallel.ShardedClassifier that DeepSpeed's optimizer already steps: remove head.weight "
                    "from that optimizer's parameters")


# ---------------------------------------------------------------------- global-norm clipping (fp.initialize)
class GlobalNormClipping:
    """DeepSpeed's gradient clipping with extra, class-sharded gradients in the norm.

    Before each boundary ``step()`` set :attr:`extra_norm_sq` (the squared norm of the unscaled
    center gradients, summed over ranks); DeepSpeed then clips the backbone with the global norm
    and :attr:`factor` (>= 1) is what the centers must be divided by too. DeepSpeed has no hook
    for this: its ``unscale_and_clip_grads`` (ZeRO 1-3, fp16) gets the combined norm through its
    ``total_norm`` argument (found by name); fp32 at stage 0 clips in ``clip_fp32_gradients``.
    """

    def __init__(self, engine):
        self.engine, self.extra_norm_sq, self.factor = engine, 0.0, 1.0
        self.max_norm = float(engine.gradient_clipping() or 0.0)
        if self.max_norm <= 0:
            return
        opt = engine.optimizer
        if hasattr(opt, "unscale_and_clip_grads"):
            self._wrap_unscale(opt)
        elif not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
            engine.clip_fp32_gradients = self._clip_fp32
        else:
            raise NotImplementedError(
                f"gradient_clipping with DeepSpeed's optimizer {type(opt).__name__} (ZeRO stage "
                f"{engine.zero_optimization_stage()}, bf16={engine.bfloat16_enabled()}) is not supported by "
                "ffc_parallel.initialize: use ZeRO stage 1, 2 or 3, or fp32 at stage 0")

    @property
    def active(self) -> bool:
        return self.max_norm > 0

    def _wrap_unscale(self, opt) -> None:
        original = opt.unscale_and_clip_grads
        position = _argument_position(original, "total_norm")

        def clipped(*args, **kwargs):
            scale = float(getattr(opt, "loss_scale", 1.0) or 1.0)
            if "total_norm" in kwargs:
                kwargs["total_norm"] = self._combined(kwargs["total_norm"], scale)
            else:
                args = list(args)
                args[position] = self._combined(args[position], scale)
            return original(*args, **kwargs)
        opt.unscale_and_clip_grads = clipped

    def _combined(self, scaled_norm, scale: float):
        """DeepSpeed's (loss-scaled) backbone norm combined with the centers'; records :attr:`factor`."""
        bb = torch.as_tensor(scaled_norm, dtype=torch.float64)
        total = torch.sqrt(bb * bb + self.extra_norm_sq * scale * scale)
        value = float(total)
        self.factor = max(1.0, (value / scale + 1e-6) / self.max_norm) if math.isfinite(value) else 1.0
        return total.to(scaled_norm.dtype) if torch.is_tensor(scaled_norm) else value

    @torch.no_grad()
    def _clip_fp32(self) -> None:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) + self.extra_norm_sq)
        self.factor = max(1.0, (total + 1e-6) / self.max_norm)
        for g in grads:
            g.div_(self.factor)


def _argument_position(method, name: str) -> int:
    """Position of argument ``name`` in a bound method's call, looking through DeepSpeed's decorators
    (``instrument_w_nvtx`` wraps without ``functools.wraps``: the function is in its closure)."""
    todo, seen = [getattr(method, "__func__", method)], set()
    while todo:
        func = todo.pop()
        if id(func) in seen:
            continue
        seen.add(id(func))
        try:
            names = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            names = []
        if name in names:
            return names.index(name) - (1 if names and names[0] == "self" else 0)
        todo.extend(cell.cell_contents for cell in getattr(func, "__closure__", None) or ()
                    if callable(cell.cell_contents))
    raise NotImplementedError(f"{method.__qualname__} has no argument {name!r}: this DeepSpeed version's clipping "
                              f"cannot include the class centers (ffc_parallel supports DeepSpeed {SUPPORTED})")


# ---------------------------------------------------------------------- checkpoints
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
