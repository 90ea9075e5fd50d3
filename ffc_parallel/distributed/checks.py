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


def refuse(who: str, problems: list[str]) -> None:
    """Raise ``ValueError("<who>: bad input: <problem>; <problem>")`` when there are problems. Called
    with problems derived from a gathered table, it raises the same error on every rank."""
    if problems:
        raise ValueError(f"{who}: bad input: " + "; ".join(problems))


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
