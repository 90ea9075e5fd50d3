"""Input mixup and manifold mixup with two-target losses on the margin head.

    mixup = Mixup(alpha=1.0, layers=None, stop_epoch=180)       # input mixup, off from epoch 180
    mixup = Mixup(alpha=2.0, layers=["layer2", "layer3"])       # manifold mixup at one of these modules
    if mixup.active(epoch):
        loss = mixup.forward_loss(backbone, head, inputs, labels, step)
    else:
        loss = head(backbone(inputs), labels)

Per step one ``λ ~ Beta(α, α)`` and one layer are drawn from ``(seed, step)`` only, so they are the same
on every rank: the head's loss is a mean over the GLOBAL batch, so
``λ · head(emb, y_a) + (1 - λ) · head(emb, y_b)`` is a correct loss only when every rank uses the same
``λ``. Partners are a random permutation of the LOCAL batch (drawn from ``(seed, rank, step)``):
mixing never moves data between ranks. The margin applies to each target separately, hence the two
head calls (each does its own Partial FC draw).

Manifold mixup mixes the output of the module named by ``layers`` (``backbone.get_submodule(name)``)
through a forward hook that exists only during that forward; the name ``"input"`` means the input
itself, so ``layers=["input", "layer1"]`` picks input or hidden mixup at random per step.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..distributed.init import get_rank
from ..distributed import streams

INPUT = "input"


@dataclass(frozen=True)
class MixPlan:
    """One step's mixing: weight ``lam`` of the original, partner ``perm[b]``, the ``layer`` mixed."""

    lam: float
    perm: torch.Tensor
    layer: str


class Mixup:
    """Mixup schedule and mixing; see the module docstring.

    Args:
        alpha: ``λ ~ Beta(alpha, alpha)`` (1.0: uniform).
        layers: module names for manifold mixup, ``"input"`` for the input; None = input mixup only.
        stop_epoch: mixup is off from this epoch on (fine-tuning after mixup); None = always on.
        seed: the draws depend only on ``(seed, step)`` (λ, layer) and ``(seed, rank, step)`` (partners).
    """

    def __init__(self, alpha: float = 1.0, layers=None, stop_epoch: int | None = None, seed: int = 0):
        if not alpha > 0:
            raise ValueError(f"Mixup: alpha must be > 0, got {alpha}")
        self.alpha, self.stop_epoch, self.seed = float(alpha), stop_epoch, int(seed)
        self.layers = [INPUT] if not layers else [str(name) for name in layers]

    def active(self, epoch: int) -> bool:
        """False from ``stop_epoch`` on (train the last epochs without mixup)."""
        return self.stop_epoch is None or epoch < self.stop_epoch

    def plan(self, step: int, batch_size: int, device=None) -> MixPlan:
        """λ and layer from ``(seed, step)`` (same on every rank), partners from ``(seed, rank, step)``."""
        rng = streams.numpy_generator(self.seed, "mixup", step)
        lam = float(rng.beta(self.alpha, self.alpha))
        layer = self.layers[int(rng.integers(len(self.layers)))]
        perm = torch.randperm(batch_size, generator=streams.generator(self.seed, "mixup_partners", get_rank(), step))
        return MixPlan(lam, perm.to(device) if device is not None else perm, layer)

    @staticmethod
    def mix(tensor: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """``λ · tensor + (1 - λ) · tensor[perm]`` along the batch dimension."""
        return plan.lam * tensor + (1.0 - plan.lam) * tensor[plan.perm.to(tensor.device)]

    @contextmanager
    def hooked(self, backbone: torch.nn.Module, plan: MixPlan):
        """Inside the block, ``backbone``'s module ``plan.layer`` returns its mixed output."""
        if plan.layer == INPUT:
            yield
            return
        try:
            module = backbone.get_submodule(plan.layer)
        except AttributeError:
            names = [n for n, _ in backbone.named_modules() if n]
            raise ValueError(f"Mixup: the backbone has no module {plan.layer!r}; its modules are {names}") from None
        handle = module.register_forward_hook(lambda _module, _inputs, output: self.mix(output, plan))
        try:
            yield
        finally:
            handle.remove()

    def forward_embeddings(self, backbone, inputs: torch.Tensor, step: int):
        """``(embeddings, plan)`` of a mixed forward of ``backbone`` on this rank's ``inputs``."""
        plan = self.plan(step, inputs.shape[0], inputs.device)
        with self.hooked(backbone, plan):
            embeddings = backbone(self.mix(inputs, plan) if plan.layer == INPUT else inputs)
        return embeddings, plan

    @staticmethod
    def two_target_loss(loss_of, embeddings: torch.Tensor, labels: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """``λ · loss_of(emb, y) + (1 - λ) · loss_of(emb, y[perm])``: the margin on each target separately.
        ``loss_of(embeddings, labels) -> loss``: the head itself, or any loss built on it."""
        partner = labels[plan.perm.to(labels.device)]
        return plan.lam * loss_of(embeddings, labels) + (1.0 - plan.lam) * loss_of(embeddings, partner)

    def forward_loss(self, backbone, head, inputs: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """One mixed step's loss: :meth:`forward_embeddings` then :meth:`two_target_loss`."""
        embeddings, plan = self.forward_embeddings(backbone, inputs, step)
        return self.two_target_loss(head, embeddings, labels, plan)
