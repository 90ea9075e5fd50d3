"""``fp.HybridModel`` and ``fp.initialize``: conveniences over plain ``deepspeed.initialize``.

A :class:`~ffc_parallel.ShardedClassifier` is safe inside any model given to ``deepspeed.initialize``
(its centers are not module parameters; it follows DeepSpeed's optimizer, see ``optim/centers.py``).
What :func:`initialize` adds: it starts torch.distributed under any launcher, reads the config from
``args.deepspeed_config`` too, defaults ``model_parameters`` to the model's trainable parameters,
and returns an :class:`HybridEngine`, DeepSpeed's engine plus global-norm clipping over backbone AND
centers and checkpoints that include the class shards (``fp.save_checkpoint`` / ``fp.load_checkpoint``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import deepspeed_bridge as bridge
from .distributed.checks import guard_norm_statistics
from .distributed.init import init_distributed


def head_loss(backbone: nn.Module, head: nn.Module, inputs, labels):
    """The default loss of a :class:`HybridModel`: ``head(backbone(inputs), labels)``."""
    return head(backbone(inputs), labels)


class HybridModel(nn.Module):
    """``loss_fn(backbone, head, inputs, labels)``: a data-parallel backbone and a class-sharded head.

    ``forward(inputs, labels) -> loss`` (mean over the global batch, same on every rank);
    ``forward(inputs)`` -> the backbone's embeddings (evaluation, export). Train it with
    :func:`initialize` or plain ``deepspeed.initialize``; plain PyTorch works too (hand
    ``head.weight`` to your optimizer).

    ``loss_fn`` (default :func:`head_loss`) composes the step's loss, e.g. soft targets, mixup's two
    head calls, or the head's loss plus a cross-batch-memory loss. ffc_parallel's collective losses
    (the head, :class:`~ffc_parallel.losses.CrossBatchMemory`, sigmoid focal) scale their own
    embedding gradient for DeepSpeed's averaging; any other term is an ordinary local loss.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, loss_fn=head_loss):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.loss_fn = loss_fn
        guard_norm_statistics(self)   # a batch the head refuses leaves the backbone's BatchNorm statistics as they were

    def forward(self, inputs, labels=None):
        if labels is None:
            return self.backbone(inputs)
        return self.loss_fn(self.backbone, self.head, inputs, labels)


def _heads(module: nn.Module) -> list:
    from .heads.classifier import ShardedClassifier

    return [m for m in module.modules() if isinstance(m, ShardedClassifier)]


class HybridEngine:
    """DeepSpeed's engine (``engine.deepspeed``) with two extras: global-norm clipping over the
    backbone and every head's centers, and checkpoints that hold the class shards.

    Use it like a DeepSpeed engine: ``loss = engine(inputs, labels)``, ``engine(inputs)`` for
    embeddings (a :class:`HybridModel`), ``engine.backward(loss)``, ``engine.step()`` after every
    micro-batch, ``save_checkpoint`` / ``load_checkpoint`` with DeepSpeed's keywords and return
    values. ``engine.module`` is the model; any other attribute is DeepSpeed's.
    """

    def __init__(self, ds_engine, model: nn.Module):
        self.deepspeed, self.module = ds_engine, model
        self.clipping = bridge.GlobalNormClipping(ds_engine) if _heads(model) else None

    def __call__(self, *inputs, **kwargs):
        return self.deepspeed(*inputs, **kwargs)

    forward = __call__

    @property
    def heads(self) -> list:
        """Every :class:`~ffc_parallel.ShardedClassifier` inside the model."""
        return _heads(self.module)

    @property
    def head(self):
        """The model's head (the first, if there are several)."""
        heads = self.heads
        return heads[0] if heads else None

    @property
    def head_optimizer(self):
        """The first head's center optimizer (built when the engine first runs the model)."""
        return self.head.centers.optimizer if self.head is not None else None

    def backward(self, loss, **kwargs):
        return self.deepspeed.backward(loss, **kwargs)

    def step(self, **kwargs):
        """Call after every micro-batch; at the accumulation boundary DeepSpeed steps the backbone and,
        through its optimizer, the centers, clipped together to ``gradient_clipping``."""
        if self.clipping is not None and self.clipping.active and self.deepspeed.is_gradient_accumulation_boundary():
            trainers = [h.centers for h in self.heads]
            self.clipping.factor = 1.0
            self.clipping.extra_norm_sq = sum(t.pending_norm_sq() for t in trainers)
            for t in trainers:
                t.clipping = self.clipping
        return self.deepspeed.step(**kwargs)

    def train(self, mode: bool = True):
        self.deepspeed.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def loss_scale(self) -> float:
        return float(self.deepspeed.optimizer.loss_scale) if self.deepspeed.fp16_enabled() else 1.0

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        from .checkpoint import save_checkpoint
        return save_checkpoint(self.deepspeed, save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        from .checkpoint import load_checkpoint
        return load_checkpoint(self.deepspeed, load_dir, tag=tag, load_module_strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                               custom_load_fn=custom_load_fn)

    def __getattr__(self, name):
        if name in ("deepspeed", "module", "clipping"):  # not set yet: avoid recursion
            raise AttributeError(name)
        return getattr(self.deepspeed, name)


def _config_of(config, args) -> dict | None:
    """The DeepSpeed config as a dict, from ``config`` (dict or JSON path) or ``args.deepspeed_config``."""
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if config is not None and from_args is not None:
        raise ValueError(f"the DeepSpeed config was given twice: config={config!r} and args.deepspeed_config="
                         f"{from_args!r}; pass one of them")
    config = config if config is not None else from_args
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (a dict or a JSON path) or args with --deepspeed_config")
    if isinstance(config, (str, Path)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a DeepSpeed JSON config, got {type(config).__name__}")
    return dict(config)


def initialize(model, config=None, training_data=None, lr_scheduler=None, *, args=None,
               model_parameters=None, collate_fn=None, mpu=None, **deepspeed_kwargs):
    """``engine, optimizer, loader, scheduler`` like ``deepspeed.initialize``; the engine is an
    :class:`HybridEngine`.

    ``model``: any module holding :class:`~ffc_parallel.ShardedClassifier` heads (e.g. a
    :class:`HybridModel`) or an :class:`~ffc_parallel.FFC` model. ``config``: a DeepSpeed config
    dict or JSON path, or ``None`` to read ``args.deepspeed_config``. The centers follow DeepSpeed's
    optimizer (the config's ``optimizer`` section or a client optimizer: SGD, Adam, AdamW) and its
    learning-rate schedule. ``model_parameters`` defaults to the model's trainable parameters (the
    centers are never among them). Everything about a head (its master copies, gradient multiplier,
    row loss) is set by its constructor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ffc_parallel.initialize expects an nn.Module, got {type(model).__name__}")
    info = init_distributed(verbose=False)
    bridge.init_comm(info.backend)
    deepspeed = bridge.require()
    config = _config_of(config, args)
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = _without_config(args)   # DeepSpeed refuses a config given both ways
    from .algorithms.ffc import FFC

    if isinstance(model, FFC) and config.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise ValueError("FFC under ZeRO-3 is not supported: ZeRO-3 partitions the probe, whose whole parameters "
                         "the gallery's EMA reads every step. Use ZeRO stage 0, 1 or 2.")
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    model_parameters = list(model_parameters)
    _refuse_centers_in(model_parameters, deepspeed_kwargs.get("optimizer"), _heads(model))
    ds_engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, collate_fn=collate_fn, mpu=mpu, config=config, **deepspeed_kwargs)
    bridge.attach(ds_engine)   # misuse (optimizer holding a center, wrong group) raises now, on every rank
    return HybridEngine(ds_engine, model), optimizer, loader, scheduler


def _refuse_centers_in(model_parameters: list, client_optimizer, heads) -> None:
    """Raise before DeepSpeed sees them if a head's centers are among the parameters it would train."""
    groups = [g["params"] if isinstance(g, dict) else [g] for g in model_parameters]
    if isinstance(client_optimizer, torch.optim.Optimizer):
        groups += [g["params"] for g in client_optimizer.param_groups]
    given = {id(p) for group in groups for p in group}
    for head in heads:
        if id(head.weight) in given:
            raise ValueError("a ShardedClassifier's weight was handed to DeepSpeed's optimizer (model_parameters or "
                             "the optimizer's param groups): DeepSpeed would broadcast, average and partition a class "
                             "shard that differs on every rank. Pass model.parameters() (the centers are not among "
                             "them); the centers follow DeepSpeed's optimizer by themselves")


def _without_config(args):
    import copy

    args = copy.copy(args)
    args.deepspeed_config = None
    return args
