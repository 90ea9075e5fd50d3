"""DeepSpeed integration: ``fp.HybridModel`` and ``fp.initialize``.

DeepSpeed is handed the backbone only (:class:`_BackbonePath`, the head is held outside its view), so
it never broadcasts rank 0's class shard over the others' nor averages center gradients. Between
the backbone and the head a gradient multiplier turns DeepSpeed's data-parallel AVERAGE into the SUM
the head's gradient semantics need (``emb.grad`` is this rank's part of the global-mean loss). The
centers are stepped by a :class:`~ffc_parallel.optim.ShardedCenterOptimizer` inside
:meth:`FFCEngine.step`, at DeepSpeed's accumulation boundary, with DeepSpeed's learning rate, loss
scale, overflow decision and clipping factor.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .distributed.collectives import scale_grad
from .distributed.init import init_deepspeed_comm, init_distributed
from .optim.consensus import CenterGradientHooks, center_grad_stats
from .optim.sharded import ShardedCenterOptimizer


def head_loss(backbone: nn.Module, head: nn.Module, inputs, labels):
    """The default loss of a :class:`HybridModel`: ``head(backbone(inputs), labels)``."""
    return head(backbone(inputs), labels)


class HybridModel(nn.Module):
    """``loss_fn(backbone, head, inputs, labels)``: a data-parallel backbone and a class-sharded head.

    ``forward(inputs, labels) -> loss`` (mean over the global batch, same on every rank). Train it
    with :func:`initialize`; plain PyTorch use (one process, or summing backbone gradients yourself)
    works too. Wrapped directly by ``deepspeed.initialize`` on more than one rank it raises, since
    DeepSpeed would overwrite every rank's class shard with rank 0's and average center gradients.

    ``loss_fn`` (default :func:`head_loss`) composes the step's loss from the backbone and the head,
    e.g. soft targets, mixup's two head calls, or the head's loss plus a cross-batch-memory loss.
    Every term must follow the head's convention: a scalar identical on every rank whose gradient
    for this rank's embeddings is this rank's part (the true backbone gradient is the SUM over ranks).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, loss_fn=head_loss):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.loss_fn = loss_fn

    def forward(self, inputs, labels):
        _refuse_raw_deepspeed(self.head)
        return self.loss_fn(self.backbone, self.head, inputs, labels)

    def _apply(self, fn, *args, **kwargs):
        # deepspeed.initialize moves the module (module.to) before it broadcasts any parameter:
        # refusing here leaves every rank's class shard intact.
        _refuse_raw_deepspeed(self.head)
        return super()._apply(fn, *args, **kwargs)


def _refuse_raw_deepspeed(head) -> None:
    """Raise if this forward runs under a DeepSpeedEngine (not ours) with a sharded head on > 1 rank."""
    if getattr(head, "world_size", 1) <= 1 or "deepspeed" not in sys.modules:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), DeepSpeedEngine):
            raise RuntimeError(
                "ffc_parallel.HybridModel was wrapped by deepspeed.initialize on "
                f"{head.world_size} ranks: DeepSpeed broadcasts rank 0's class shard over every rank's and "
                "averages center gradients, which silently ruins training. Use "
                "`engine, optimizer, loader, scheduler = ffc_parallel.initialize(model=model, config=...)` "
                "instead (same arguments as deepspeed.initialize).")
        frame = frame.f_back


class _BackbonePath(nn.Module):
    """What DeepSpeed sees: the backbone's parameters only; the head runs outside its view.

    ``forward(inputs, labels)`` = ``model.loss_fn(backbone, head, inputs, labels)``, where every
    backbone output's gradient is multiplied by ``grad_multiplier`` (the data-parallel size) so that
    DeepSpeed's average over ranks yields the sum over ranks.
    """

    def __init__(self, model: HybridModel, grad_multiplier: float):
        super().__init__()
        self.backbone = model.backbone
        object.__setattr__(self, "head", model.head)  # not a submodule: DeepSpeed must not see its weight
        object.__setattr__(self, "model", model)
        self.grad_multiplier = float(grad_multiplier)

    def _scale_output_grad(self, _module, _inputs, output):
        return scale_grad(output, self.grad_multiplier) if torch.is_grad_enabled() else output

    def forward(self, inputs, labels):
        if self.grad_multiplier == 1.0:
            return self.model.loss_fn(self.backbone, self.head, inputs, labels)
        handle = self.backbone.register_forward_hook(self._scale_output_grad)
        try:
            return self.model.loss_fn(self.backbone, self.head, inputs, labels)
        finally:
            handle.remove()


def _load_config(config) -> dict:
    if isinstance(config, (str, Path)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a DeepSpeed JSON config, got {type(config).__name__}")
    return dict(config)


class _DeepSpeedFacade:
    """What :class:`FFCEngine` and :class:`PoolEngine` share: ``self.deepspeed`` (the DeepSpeed
    engine) and ``self.module`` (the user's model) with DeepSpeed's API; other attributes are
    DeepSpeed's."""

    def backward(self, loss, **kwargs):
        return self.deepspeed.backward(loss, **kwargs)

    def train(self, mode: bool = True):
        self.deepspeed.train(mode)
        self.module.train(mode)   # FFCEngine: DeepSpeed's module does not hold the head
        return self

    def eval(self):
        return self.train(False)

    @property
    def loss_scale(self) -> float:
        return float(self.deepspeed.optimizer.loss_scale) if self.deepspeed.fp16_enabled() else 1.0

    @property
    def global_steps(self) -> int:
        return self.deepspeed.global_steps

    def __getattr__(self, name):
        if name in ("deepspeed", "module", "head"):  # not set yet: avoid recursion
            raise AttributeError(name)
        return getattr(self.deepspeed, name)


class FFCEngine(_DeepSpeedFacade):
    """A DeepSpeed engine for the backbone plus the sharded optimizer of the centers.

    Use it like a DeepSpeed engine: ``loss = engine(inputs, labels)``, ``engine.backward(loss)``,
    ``engine.step()`` after every micro-batch (the optimizers step at the accumulation boundary).
    ``engine.module`` is the :class:`HybridModel`; ``engine.deepspeed`` the DeepSpeed engine of the
    backbone; ``engine.head_optimizer`` the centers' optimizer. Other attributes are DeepSpeed's.
    """

    def __init__(self, ds_engine, model: HybridModel, head_optimizer: ShardedCenterOptimizer, config: dict):
        self.deepspeed, self.module, self.head_optimizer, self.config = ds_engine, model, head_optimizer, config
        self.head = model.head
        self.head.rows_listener = self._note_rows
        self.hooks = CenterGradientHooks(ds_engine)
        self._rows: torch.Tensor | None = None   # union of Partial FC rows since the last step
        self._all_rows = False                   # a forward used every row
        self._pending = False                    # a training forward happened since the last step
        self._loss_multiplier = None             # d(what DeepSpeed back-propagated) / d loss

    # ------------------------------------------------------------------ DeepSpeed-like API
    def __call__(self, inputs, labels):
        return self.forward(inputs, labels)

    def forward(self, inputs, labels):
        loss = self.deepspeed(inputs, labels)
        if self.head.training and torch.is_grad_enabled() and loss.requires_grad:
            loss.register_hook(self._record_loss_multiplier)
        return loss

    def _record_loss_multiplier(self, grad):
        """The gradient reaching the loss is DeepSpeed's (loss scale / accumulation steps): the head's
        gradient carries exactly this factor, whatever path DeepSpeed scaled the loss through."""
        self._loss_multiplier = float(grad)

    def _note_rows(self, rows):
        """Called by the head for every training class selection (every head call of a step)."""
        if not torch.is_grad_enabled():
            return
        self._pending = True
        if rows is None:
            self._all_rows = True
        elif not self._all_rows:
            self._rows = rows if self._rows is None else torch.unique(torch.cat([self._rows, rows]))

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.deepspeed.is_gradient_accumulation_boundary()

    def step(self, **kwargs):
        """Call after every micro-batch; at the accumulation boundary step backbone and centers."""
        if not self.deepspeed.is_gradient_accumulation_boundary():
            return self.deepspeed.step(**kwargs)
        rows = None if self._all_rows else self._rows
        lr = self.deepspeed.get_lr()[0]
        scale = 1.0  # the loss scale the head's gradient carries (measured; 1 without fp16)
        if self._loss_multiplier is not None and self.deepspeed.fp16_enabled():
            scale = self._loss_multiplier * self.deepspeed.gradient_accumulation_steps()
        grad = self.head.weight.grad
        if self._pending and rows is not None:
            rows = rows.to(grad.device if grad is not None else self.head.weight.device)
        self.hooks.clip_factor = 1.0
        if self.deepspeed.fp16_enabled() or self.hooks.clip > 0:
            overflow, norm_sq = center_grad_stats(grad if self._pending else None, rows, self.head.group)
            self.hooks.center_overflow = overflow and self.deepspeed.fp16_enabled()
            self.hooks.center_norm_sq = norm_sq / (scale * scale)
        result = self.deepspeed.step(**kwargs)
        if self.deepspeed.was_step_applied() and self._pending and grad is not None:
            self.head_optimizer.step(rows, lr=lr, grad_scale=1.0 / (scale * self.hooks.clip_factor))
        if grad is not None and rows is not None and self._pending:
            grad.index_fill_(0, rows, 0.0)  # Partial FC wrote only these rows: keep the buffer, O(rows)
        else:
            self.head.weight.grad = None
        self._rows, self._all_rows, self._pending, self._loss_multiplier = None, False, False, None
        return result

    def save_checkpoint(self, save_dir, tag=None, client_state=None):
        from .checkpoint import save_checkpoint
        return save_checkpoint(self, save_dir, tag=tag, client_state=client_state)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True):
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states)


class PoolEngine(_DeepSpeedFacade):
    """The DeepSpeed engine of an :class:`~ffc_parallel.FFC` model (from :func:`initialize`).

    DeepSpeed trains the probe (its parameters only); the gallery (EMA) and the slot-sharded class
    pool change inside the model's forward. Use it like a DeepSpeed engine: ``loss = engine(inputs,
    labels)``, ``engine.backward(loss)``, ``engine.step()``. Its checkpoints also hold every rank's
    pool slots and load at any world size. Other attributes are DeepSpeed's.
    """

    def __init__(self, ds_engine, model):
        self.deepspeed, self.module = ds_engine, model

    def __call__(self, inputs, labels):
        return self.deepspeed(inputs, labels)

    def step(self, **kwargs):
        return self.deepspeed.step(**kwargs)

    def save_checkpoint(self, save_dir, tag=None, client_state=None):
        from .checkpoint import save_pool_checkpoint
        return save_pool_checkpoint(self, save_dir, tag=tag, client_state=client_state)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True):
        from .checkpoint import load_pool_checkpoint
        return load_pool_checkpoint(self, load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                    load_lr_scheduler_states=load_lr_scheduler_states)


def _initialize_ffc(model, config, args, training_data, lr_scheduler, collate_fn, mpu, deepspeed_kwargs):
    """``deepspeed.initialize`` of an FFC model: the probe's parameters only, gradient multiplier = the
    data-parallel size (DeepSpeed averages, FFC's loss needs the sum), ZeRO 0-2."""
    import deepspeed

    if config.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise ValueError("FFC under ZeRO-3 is not supported: ZeRO-3 partitions the probe, whose whole parameters "
                         "the gallery's EMA reads every step. Use ZeRO stage 0, 1 or 2.")
    world = dist.get_world_size(model.group) if dist.is_initialized() else 1
    if model.grad_multiplier not in (1.0, float(world)):
        raise ValueError(f"FFC(grad_multiplier={model.grad_multiplier}): fp.initialize sets it to the data-parallel "
                         f"size {world} itself; build the model with the default 1.0")
    model.grad_multiplier = float(world)
    ds_engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=[p for p in model.trainable_parameters() if p.requires_grad],
        training_data=training_data, lr_scheduler=lr_scheduler, collate_fn=collate_fn, mpu=mpu, config=config,
        **deepspeed_kwargs)
    if ds_engine.dp_world_size != world:
        raise ValueError(f"the FFC pool's process group has {world} ranks but DeepSpeed's data-parallel group has "
                         f"{ds_engine.dp_world_size}: ffc_parallel needs them to be the same ranks")
    return PoolEngine(ds_engine, model), optimizer, loader, scheduler


def initialize(model, config, training_data=None, lr_scheduler=None, *, args=None,
               model_parameters=None, collate_fn=None, mpu=None, center_master_weights: bool | None = None,
               **deepspeed_kwargs):
    """``engine, optimizer, loader, scheduler``, like ``deepspeed.initialize`` for a :class:`HybridModel`
    (engine: :class:`FFCEngine`) or an :class:`~ffc_parallel.FFC` model (engine: :class:`PoolEngine`).

    ``config``: a DeepSpeed config dict or JSON path; its ``optimizer`` section (SGD, Adam, AdamW)
    also configures the centers' optimizer, which follows the backbone's learning rate (the
    ``scheduler`` section or ``lr_scheduler``). ``model_parameters`` defaults to the backbone's
    parameters. Works whether or not :func:`ffc_parallel.init_distributed` was called first.
    ``center_master_weights``: an fp32 master copy of bf16/fp16 centers (default: yes for half
    centers; see ``docs/deepspeed.md`` for the bytes per class).
    """
    import deepspeed

    from .heads.ffc import FFC

    if not isinstance(model, (HybridModel, FFC)):
        raise TypeError("ffc_parallel.initialize expects an ffc_parallel.HybridModel(backbone, head) or an "
                        "ffc_parallel.FFC model; for a model without a sharded head use deepspeed.initialize")
    info = init_distributed(verbose=False)
    init_deepspeed_comm(info.backend)
    config = _load_config(config)
    if isinstance(model, FFC):
        return _initialize_ffc(model, config, args, training_data, lr_scheduler, collate_fn, mpu, deepspeed_kwargs)
    if "optimizer" not in config:
        raise ValueError("the DeepSpeed config needs an `optimizer` section: it configures both the backbone's "
                         "and the centers' optimizer (a client optimizer cannot be sharded by class)")
    if deepspeed_kwargs.get("optimizer") is not None:
        raise ValueError("pass the optimizer through the config's `optimizer` section, not as an object: "
                         "the centers need a sharded copy of it")
    if config.get("fp16", {}).get("enabled") and config.get("zero_optimization", {}).get("stage", 0) == 0:
        raise ValueError("fp16 with ZeRO stage 0 is not supported: DeepSpeed 0.19's stage-0 fp16 optimizer does not "
                         "scale the loss in engine.backward but unscales in step(). Use ZeRO stage 1, 2 or 3 "
                         "(deepspeed_configs/zero1_fp16.json) or bf16.")
    head = model.head
    if not getattr(getattr(head, "weight", None), "ffc_class_sharded", False):
        raise TypeError("HybridModel.head must be an ffc_parallel.ShardedClassifier (weight.ffc_class_sharded)")
    head_world = dist.get_world_size(head.group) if dist.is_initialized() else 1
    path = _BackbonePath(model, grad_multiplier=head_world)
    if model_parameters is None:
        model_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    ds_engine, _, loader, scheduler = deepspeed.initialize(
        args=args, model=path, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, collate_fn=collate_fn, mpu=mpu, config=config, **deepspeed_kwargs)
    if ds_engine.dp_world_size != head_world:
        raise ValueError(f"the head's process group has {head_world} ranks but DeepSpeed's data-parallel group "
                         f"has {ds_engine.dp_world_size}: ffc_parallel needs them to be the same ranks")
    head_opt = ShardedCenterOptimizer.from_deepspeed_config(head.weight, config["optimizer"],
                                                            master_weights=center_master_weights)
    head_opt.lr = ds_engine.get_lr()[0]
    engine = FFCEngine(ds_engine, model, head_opt, config)
    return engine, ds_engine.optimizer, loader, scheduler
