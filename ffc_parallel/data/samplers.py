"""Distributed re-samplers for long-tailed data, built for millions of classes.

Every sampler is a ``torch.utils.data.Sampler`` of data-set indices that

* draws one GLOBAL epoch (the same on every rank: the draw depends only on ``(seed, epoch)``) and
  gives rank r the strided part ``r::world_size``, so ranks are disjoint parts of one epoch;
* is reseeded by ``set_epoch(epoch)`` (call it before each epoch, like ``DistributedSampler``);
* yields exactly ``len(sampler)`` indices on every rank: the global epoch is padded by wrapping
  around to a multiple of ``world_size`` (``drop_last=False``) or cut to one (``drop_last=True``).

All work is vectorised torch: a CSR index of the labels (:class:`ClassIndex`) is built once in
``O(N log N)``; an epoch costs ``O(C)`` for the class probabilities (cumulative sum) plus
``O(n log C)`` for ``n`` draws (inverse CDF by binary search, then a uniform instance of the class);
no Python loop runs over classes or steps.

Schemes (``n_j`` = samples of class j; classes without samples are never drawn):

* :class:`InstanceBalancedSampler`: a random permutation of all samples (``p_j ∝ n_j``).
* :class:`ClassProbabilitySampler` with ``scheme=``
  ``"instance"`` ``p_j = n_j / Σn``; ``"class_balanced"`` ``p_j = 1 / C``; ``"sqrt"`` ``p_j ∝ n_j^0.5``;
  a float ``q``: ``p_j ∝ n_j^q``; ``"progressive"``: ``p_j(t) = (t/T)/C + (1 - t/T) n_j / Σn`` with
  ``t`` the epoch and ``T = total_epochs``. A class is drawn, then a uniform sample of it (with
  replacement); ``num_samples`` per epoch (default: the data-set size).
* :class:`RandomOverSampler`: every sample once plus random duplicates until each class has
  ``target`` (default ``max n_j``) samples.
* :class:`RandomUnderSampler`: ``min(n_j, target)`` random samples of each class without replacement
  (default ``target = min n_j``).
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from ..distributed.init import get_rank, get_world_size
from ..distributed import streams
from ..distributed.checks import agree_on_sampler

SCHEMES = ("instance", "class_balanced", "sqrt", "progressive")


class ClassIndex:
    """CSR index of a data set's labels ``[N]``: the samples of class c are
    ``order[offsets[c]:offsets[c + 1]]``; ``counts[c] = n_c``. Built once, ``O(N log N)``."""

    def __init__(self, labels, num_classes: int | None = None):
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError("labels must be integer class ids")
        labels = labels.long()
        if labels.numel() == 0:
            raise ValueError("the data set has no samples")
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        top = int(labels.max()) + 1
        self.num_classes = top if num_classes is None else int(num_classes)
        if top > self.num_classes:
            raise ValueError(f"label {top - 1} >= num_classes={self.num_classes}")
        self.labels = labels
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=self.num_classes)
        self.offsets = torch.zeros(self.num_classes + 1, dtype=torch.long)
        torch.cumsum(self.counts, 0, out=self.offsets[1:])

    def __len__(self) -> int:
        return self.labels.numel()

    def draw(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uniformly random sample index of each class in ``classes`` (all must have samples)."""
        u = torch.rand(classes.shape, generator=generator, dtype=torch.float64)
        pick = (u * self.counts[classes]).long().clamp_max_(self.counts[classes] - 1)
        return self.order[self.offsets[classes] + pick]


def class_probabilities(counts: torch.Tensor, scheme, epoch: int = 0, total_epochs: int | None = None
                        ) -> torch.Tensor:
    """Class sampling probabilities ``[C]`` (float64, sum 1) of a scheme; see the module docstring."""
    counts = counts.to(torch.float64)
    present = (counts > 0).to(torch.float64)
    instance = counts / counts.sum()
    balanced = present / present.sum()
    if isinstance(scheme, (int, float)) and not isinstance(scheme, bool):
        powered = counts ** float(scheme) * present
        return powered / powered.sum()
    if scheme == "instance":
        return instance
    if scheme == "class_balanced":
        return balanced
    if scheme == "sqrt":
        return class_probabilities(counts, 0.5)
    if scheme == "progressive":
        if not total_epochs or total_epochs < 1:
            raise ValueError("the progressive scheme needs total_epochs >= 1 (T in p_j(t))")
        t = min(max(epoch, 0), total_epochs) / total_epochs
        return t * balanced + (1.0 - t) * instance
    raise ValueError(f"unknown sampling scheme {scheme!r}: use one of {SCHEMES} or a power q (p_j ∝ n_j^q)")


def draw_classes(probs: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` class ids drawn with replacement from ``probs[C]`` by inverse CDF (any C, no 2^24 limit)."""
    cdf = torch.cumsum(probs, 0)
    u = torch.rand(num, generator=generator, dtype=torch.float64) * cdf[-1]
    out = torch.searchsorted(cdf, u, right=True).clamp_max_(probs.numel() - 1)
    # Rounding at the top of the CDF could land on a trailing zero-probability class: step back.
    bad = probs[out] == 0
    if bad.any():
        out[bad] = torch.searchsorted(cdf, u[bad], right=False).clamp_max_(probs.numel() - 1)
    return out


class _DistributedEpochSampler(Sampler):
    """Partition of one global epoch (drawn from ``(seed, epoch)``) across ranks; see the module doc."""

    def __init__(self, epoch_size: int, rank=None, world_size=None, seed: int = 0, drop_last: bool = False):
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if epoch_size < 1:
            raise ValueError(f"an epoch must have at least one sample, got {epoch_size}")
        self.epoch_size, self.seed, self.drop_last, self.epoch = int(epoch_size), int(seed), drop_last, 0
        per_rank = epoch_size // self.world_size if drop_last else math.ceil(epoch_size / self.world_size)
        if per_rank == 0:
            raise ValueError(f"drop_last with {epoch_size} samples and {self.world_size} ranks leaves nothing")
        self.num_samples = per_rank
        agree_on_sampler(type(self).__name__, {"epoch_size": self.epoch_size, "seed": self.seed,
                                               "drop_last": bool(drop_last), **self._agreed()},
                         self.rank, self.world_size)

    def _agreed(self) -> dict:
        """What else every rank's sampler must agree on (the labels it draws from)."""
        index = getattr(self, "index", None)
        if index is None:
            return {}
        return {"samples": len(index), "label_sum": int(index.labels.sum()), "num_classes": index.num_classes}

    def set_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch`` (the same on every rank); progressive schemes also read ``t`` from it."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def global_epoch(self) -> torch.Tensor:
        """The whole epoch's indices (every rank, before partitioning), ``[epoch_size]`` int64."""
        return self._draw(streams.generator(self.seed, "class_sampler", self.epoch))

    def __iter__(self):
        indices = self.global_epoch()
        total = self.num_samples * self.world_size
        if total > indices.numel():  # pad by wrapping around
            indices = indices.repeat(math.ceil(total / indices.numel()))
        return iter(indices[:total][self.rank::self.world_size].tolist())

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class InstanceBalancedSampler(_DistributedEpochSampler):
    """Every sample once per epoch in random order (``p_j ∝ n_j``): ``labels`` or a data-set size."""

    def __init__(self, labels_or_size, rank=None, world_size=None, seed: int = 0, drop_last: bool = False):
        size = int(labels_or_size) if isinstance(labels_or_size, int) else len(labels_or_size)
        super().__init__(size, rank, world_size, seed, drop_last)

    def _draw(self, generator):
        return torch.randperm(self.epoch_size, generator=generator)


class ClassProbabilitySampler(_DistributedEpochSampler):
    """Draw a class from ``class_probabilities(scheme)``, then a uniform sample of it (with replacement).

    ``scheme``: ``"instance"``, ``"class_balanced"``, ``"sqrt"``, ``"progressive"`` (needs
    ``total_epochs``) or a power ``q``. ``num_samples``: global epoch size (default the data-set size).
    """

    def __init__(self, labels, scheme="class_balanced", num_samples: int | None = None,
                 total_epochs: int | None = None, num_classes: int | None = None, rank=None, world_size=None,
                 seed: int = 0, drop_last: bool = False):
        self.index = labels if isinstance(labels, ClassIndex) else ClassIndex(labels, num_classes)
        self.scheme, self.total_epochs = scheme, total_epochs
        self.probabilities(0)  # validate the scheme now, not at the first epoch
        super().__init__(len(self.index) if num_samples is None else num_samples, rank, world_size, seed, drop_last)

    def probabilities(self, epoch: int | None = None) -> torch.Tensor:
        """Class probabilities ``[C]`` used in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        return class_probabilities(self.index.counts, self.scheme, epoch, self.total_epochs)

    def _draw(self, generator):
        classes = draw_classes(self.probabilities(), self.epoch_size, generator)
        return self.index.draw(classes, generator)


class RandomOverSampler(_DistributedEpochSampler):
    """Every sample once plus random duplicates (with replacement) up to ``target`` per class
    (default the largest class): epoch size ``Σ_j max(n_j, target)`` over classes with samples."""

    def __init__(self, labels, target: int | None = None, num_classes: int | None = None, rank=None,
                 world_size=None, seed: int = 0, drop_last: bool = False):
        self.index = labels if isinstance(labels, ClassIndex) else ClassIndex(labels, num_classes)
        counts = self.index.counts
        self.target = int(counts.max()) if target is None else int(target)
        self.extra = (self.target - counts).clamp_min(0) * (counts > 0)
        super().__init__(len(self.index) + int(self.extra.sum()), rank, world_size, seed, drop_last)

    def _draw(self, generator):
        classes = torch.repeat_interleave(torch.arange(self.index.num_classes), self.extra)
        epoch = torch.cat([torch.arange(len(self.index)), self.index.draw(classes, generator)])
        return epoch[torch.randperm(epoch.numel(), generator=generator)]


class RandomUnderSampler(_DistributedEpochSampler):
    """``min(n_j, target)`` random samples of each class without replacement (default target: the
    smallest non-empty class), in random order; a new subset every epoch."""

    def __init__(self, labels, target: int | None = None, num_classes: int | None = None, rank=None,
                 world_size=None, seed: int = 0, drop_last: bool = False):
        self.index = labels if isinstance(labels, ClassIndex) else ClassIndex(labels, num_classes)
        counts = self.index.counts
        self.target = int(counts[counts > 0].min()) if target is None else int(target)
        if self.target < 1:
            raise ValueError(f"target must be >= 1, got {self.target}")
        super().__init__(int(counts.clamp_max(self.target).sum()), rank, world_size, seed, drop_last)

    def _draw(self, generator):
        index = self.index
        shuffled = torch.randperm(len(index), generator=generator)
        by_class = shuffled[torch.argsort(index.labels[shuffled], stable=True)]  # random order inside a class
        position = torch.arange(len(index)) - index.offsets[index.labels[by_class]]
        kept = by_class[position < self.target]
        return kept[torch.randperm(kept.numel(), generator=generator)]


SAMPLERS = SCHEMES + ("oversample", "undersample")   # the one table of re-samplers (ffc-train's --sampler)


def build_sampler(name: str, labels, *, rank=None, world_size=None, seed: int = 0, num_classes: int | None = None,
                  total_epochs: int | None = None) -> _DistributedEpochSampler:
    """The re-sampler called ``name`` (one of :data:`SAMPLERS`): a :class:`ClassProbabilitySampler`
    for the schemes, :class:`RandomOverSampler` / :class:`RandomUnderSampler` for the other two."""
    kw = dict(rank=rank, world_size=world_size, seed=seed, num_classes=num_classes)
    if name == "oversample":
        return RandomOverSampler(labels, **kw)
    if name == "undersample":
        return RandomUnderSampler(labels, **kw)
    if name not in SCHEMES:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return ClassProbabilitySampler(labels, name, total_epochs=total_epochs, **kw)


class DeferredResampling:
    """DRS: sample with ``before`` until ``switch_epoch``, then with ``after`` (e.g. class-balanced).

    ``sampler(epoch)`` returns the sampler for that epoch with ``set_epoch(epoch)`` already called;
    ``switches_at(epoch)`` tells the training loop when to rebuild its ``DataLoader``.
    """

    def __init__(self, switch_epoch: int, before: Sampler, after: Sampler):
        if switch_epoch < 0:
            raise ValueError(f"switch_epoch must be >= 0, got {switch_epoch}")
        self.switch_epoch, self.before, self.after = int(switch_epoch), before, after

    def sampler(self, epoch: int) -> Sampler:
        chosen = self.after if epoch >= self.switch_epoch else self.before
        if hasattr(chosen, "set_epoch"):
            chosen.set_epoch(epoch)
        return chosen

    def switches_at(self, epoch: int) -> bool:
        return epoch == self.switch_epoch
