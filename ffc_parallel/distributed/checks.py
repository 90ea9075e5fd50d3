"""Input checks that every rank agrees on: one all-gather of a few integers per rank, one error everywhere.

A collective object (the head, the FFC pool, the cross-batch memory, the contrastive prior) must never
raise on one rank while the others wait in its next collective. So each rank summarises its input in a
few integers (:func:`batch_fields`), one all-gather gives every rank the same table of every rank's
summary (:func:`gather_fields`), and every rank derives the same list of problems from it and raises the
same ``ValueError`` (:func:`refuse`), naming the rank at fault, before any other collective. The per-rank
batch sizes of the table are what an uneven all-gather needs next, so the check costs no extra
collective.

    table = check_batch(BatchSpec("ffc_parallel.FFC", dim=512), embeddings, labels, group=group)
    sizes = [t["rows"] for t in table]
"""
from __future__ import annotations

import hashlib
import sys
import weakref
from dataclasses import dataclass

import torch

from .collectives import all_gather_table

# The integers :func:`batch_fields` describes one rank's (embeddings, labels) with, in table order.
BATCH_FIELDS = ("rows", "dim", "float_2d", "nonfinite", "labels", "int_labels", "label_min", "label_max")
_NO_LABELS, _NOT_1D = -2, -1


@dataclass(frozen=True)
class BatchSpec:
    """What every rank's ``embeddings[b, dim]`` (and ``labels[b]``) must be.

    who: the object named in the error (``"ffc_parallel.ShardedClassifier"``).
    dim_name: how the expected dim is called in the error (``"the head's embedding_dim"``).
    labels_name: how the labels are called (``"labels"``, ``"image ids"``, ``"identity labels"``).
    label_range: ``(low, high)``: labels must be in ``[low, high)``; ``high=None``: no upper bound;
        ``None``: any integer.
    count_nonfinite: count NaN/inf entries of the embeddings (one pass over them) and refuse any.
    allow_empty: accept a global batch with no rows on any rank.
    """

    who: str
    dim: int
    dim_name: str = "the expected embedding dim"
    labels_name: str = "labels"
    label_range: tuple[int, int | None] | None = (0, None)
    count_nonfinite: bool = False
    allow_empty: bool = False


def gather_fields(fields: dict[str, int], group=None, device=None) -> list[dict[str, int]]:
    """All-gather ``fields`` (the same names in the same order on every rank) in one collective over
    ``group``: one dict per rank, in rank order, identical on every rank."""
    row = torch.tensor([int(v) for v in fields.values()], dtype=torch.long, device=device)
    return [dict(zip(fields, values)) for values in all_gather_table(row, group).tolist()]


def batch_sizes(rows: int, group=None, device=None) -> list[int]:
    """Every rank's number of rows, in rank order (one all-gather over ``group``)."""
    return [t["rows"] for t in gather_fields({"rows": rows}, group, device)]


class InputRefused(ValueError):
    """A batch refused by a rank protocol's check (the same error on every rank). A model guarded by
    :func:`guard_norm_statistics` is left as it was before the refused forward."""


def refuse(who: str, problems: list[str]) -> None:
    """Raise :class:`InputRefused` ``("<who>: bad input: <problem>; <problem>")`` when there are problems.
    Called with problems derived from a gathered table, it raises the same error on every rank."""
    if problems:
        raise InputRefused(f"{who}: bad input: " + "; ".join(problems))


def batch_fields(embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                 count_nonfinite: bool = False) -> dict[str, int]:
    """One rank's ``(embeddings, labels)`` as the integers :data:`BATCH_FIELDS`."""
    float_2d = embeddings.dim() == 2 and embeddings.is_floating_point()
    fields = {"rows": embeddings.shape[0] if embeddings.dim() >= 1 else -1,
              "dim": embeddings.shape[-1] if embeddings.dim() == 2 else -1, "float_2d": int(float_2d),
              "nonfinite": int((~torch.isfinite(embeddings)).sum()) if count_nonfinite and float_2d else 0,
              "labels": _NO_LABELS, "int_labels": 1, "label_min": 0, "label_max": -1}
    if labels is not None:
        is_int = not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
        fields["labels"] = labels.shape[0] if labels.dim() == 1 else _NOT_1D
        fields["int_labels"] = int(is_int)
        if is_int and labels.numel():
            fields["label_min"], fields["label_max"] = int(labels.min()), int(labels.max())
    return fields


def batch_problems(rank: int, f: dict[str, int], spec: BatchSpec) -> list[str]:
    """What is wrong with rank ``rank``'s summary ``f`` (from :func:`batch_fields`) under ``spec``."""
    problems = []
    if not f["float_2d"]:
        problems.append(f"rank {rank}: embeddings must be a 2-D floating-point tensor [b, {spec.dim}]")
    elif f["dim"] != spec.dim:
        problems.append(f"rank {rank}: embedding dim is {f['dim']} but {spec.dim_name} is {spec.dim}")
    if f["labels"] != _NO_LABELS:
        if f["labels"] == _NOT_1D:
            problems.append(f"rank {rank}: {spec.labels_name} must be a 1-D tensor [batch]")
        elif f["labels"] != f["rows"]:
            problems.append(f"rank {rank}: {f['rows']} embeddings but {f['labels']} {spec.labels_name}")
        low, high = spec.label_range or (None, None)
        lo, hi = f["label_min"], f["label_max"]
        if not f["int_labels"]:
            problems.append(f"rank {rank}: {spec.labels_name} must be an integer tensor (class ids), "
                            "not floating point or bool")
        elif low is not None and lo <= hi and (lo < low or (high is not None and hi >= high)):
            allowed = f"in [{low}, {high})" if high is not None else f">= {low}"
            problems.append(f"rank {rank}: {spec.labels_name} must be {allowed}, got values in [{lo}, {hi}]")
    if f["nonfinite"]:
        problems.append(f"rank {rank}: {f['nonfinite']} non-finite (NaN/inf) values in the embeddings")
    return problems


def check_batch(spec: BatchSpec, embeddings: torch.Tensor, labels: torch.Tensor | None = None, *, group=None,
                device=None, extra: dict[str, int] | None = None, extra_problems=None) -> list[dict[str, int]]:
    """Validate every rank's batch under ``spec`` with one all-gather over ``group``; return the table
    (one dict per rank: :data:`BATCH_FIELDS` plus ``extra``'s names) or raise the same ``ValueError``
    on every rank. ``extra_problems(table) -> [str]`` adds checks of the ``extra`` fields."""
    fields = batch_fields(embeddings, labels, spec.count_nonfinite)
    fields.update(extra or {})
    table = gather_fields(fields, group, device if device is not None else embeddings.device)
    problems = [p for rank, f in enumerate(table) for p in batch_problems(rank, f, spec)]
    if extra_problems is not None:
        problems += extra_problems(table)
    if not problems and not spec.allow_empty and sum(f["rows"] for f in table) == 0:
        problems.append("the global batch is empty on every rank")
    refuse(spec.who, problems)
    return table


def _as_int64(value) -> int:
    """A value of a configuration as one int64: ints as they are, floats by their bits, anything else
    (strings, margins, None) by a stable hash of its ``repr``."""
    if isinstance(value, bool) or isinstance(value, int):
        return int(value) if -2**63 <= int(value) < 2**63 else _digest(repr(value))
    if isinstance(value, float):
        return int(torch.tensor(value, dtype=torch.float64).view(torch.long))
    return _digest(repr(value))


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def agree_on_config(who: str, config: dict, group=None, device=None) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless every rank built ``who`` with the
    same ``config`` (names -> values: class counts, dims, margins, rates, seeds...), naming each value
    that differs, its value on rank 0 and the ranks that differ. One all-gather of ``len(config) + 1``
    integers (the last: a digest of the group's global ranks). A no-op on one rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    fields = {name: _as_int64(value) for name, value in config.items()}
    fields["__group__"] = _digest(repr(tuple(ranks)))
    table = gather_fields(fields, group, device)
    problems = []
    for name in fields:
        differ = [r for r, f in enumerate(table) if f[name] != table[0][name]]
        if not differ:
            continue
        if name == "__group__":
            problems.append(f"the process group differs from rank 0's on rank(s) {differ}")
            continue
        value = config[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            decode = int if isinstance(value, int) else (
                lambda bits: float(torch.tensor(bits, dtype=torch.long).view(torch.float64)))
            others = ", ".join(f"{decode(table[r][name])!r} on rank {r}" for r in differ)
            problems.append(f"{name} is {decode(table[0][name])!r} on rank 0 but {others}")
        else:
            problems.append(f"{name} on rank(s) {differ} differs from rank 0's")
    if problems:
        raise ValueError(f"{who}: the ranks were built with different configurations (every rank must pass the "
                         "same values): " + "; ".join(problems))


def agree_on_sampler(who: str, config: dict, rank: int, world_size: int) -> None:
    """:func:`agree_on_config` over the world for a sampler built for ``rank`` of ``world_size`` when that
    is this process's place in a running job (a sampler built for another rank, e.g. in a one-process
    test of the partition, checks nothing)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() == world_size and dist.get_rank() == rank:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        agree_on_config(who, config, None, device)


_guarded: "weakref.WeakSet" = weakref.WeakSet()


def guard_norm_statistics(model: torch.nn.Module) -> None:
    """Make a forward of ``model`` that ends in :class:`InputRefused` leave its normalisation layers'
    running statistics (BatchNorm's mean, variance and batch count) as they were before it: a refused
    batch (a NaN image, a bad label) otherwise moves them in the backbone before the head's check
    sees it. Costs a copy of those buffers per training forward (kilobytes for a ResNet). Idempotent."""
    if model in _guarded:
        return
    _guarded.add(model)
    saved: list = []

    def snapshot(module, _args):
        saved.clear()
        if module.training:
            saved.extend((b, b.clone()) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                         for b in m.buffers(recurse=False))

    def restore(_module, _args, _output):
        if isinstance(sys.exc_info()[1], InputRefused):
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
        saved.clear()

    model.register_forward_pre_hook(snapshot)
    model.register_forward_hook(restore, always_call=True)
