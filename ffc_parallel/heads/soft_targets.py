"""The head's input check of soft targets ``(classes[b, K], probs[b, K])``: what each rank reports in the
one all-gather of ``distributed/checks.py`` and the problems found in the table."""
from __future__ import annotations

import torch

SOFT_TARGET_FIELDS = ("soft_k", "soft_ok", "soft_min", "soft_max", "soft_bad")


def soft_target_fields(soft_targets, batch: int) -> dict[str, int]:
    """One rank's soft targets as :data:`SOFT_TARGET_FIELDS`: K (-1: none), well formed, class range,
    whether any probability is bad."""
    values = [-1, 1, 0, -1, 0]
    if soft_targets is not None:
        classes, probs = soft_targets
        shape_ok = (classes.dim() == 2 and probs.shape == classes.shape and classes.shape[0] == batch
                    and not classes.is_floating_point() and probs.is_floating_point())
        if not shape_ok:
            values = [classes.shape[-1] if classes.dim() else 0, 0, 0, -1, 0]
        else:
            lo, hi = (int(classes.min()), int(classes.max())) if classes.numel() else (0, -1)
            bad = (~torch.isfinite(probs)).any() | (probs < 0).any() | (probs.sum(dim=1) > 1 + 1e-6).any()
            values = [classes.shape[1], 1, lo, hi, int(bad)]
    return dict(zip(SOFT_TARGET_FIELDS, values))


def soft_target_problems(rank: int, f: dict[str, int], k0: int, num_classes: int) -> list[str]:
    problems = []
    if not f["soft_ok"]:
        problems.append(f"rank {rank}: soft_targets must be (classes[b, K] int, probs[b, K] float) "
                        f"with b = the number of embeddings")
    elif f["soft_k"] != k0:
        problems.append(f"rank {rank}: soft_targets has K={f['soft_k']} but rank 0 has K={k0} "
                        "(use the same K everywhere)")
    elif f["soft_min"] <= f["soft_max"] and (f["soft_min"] < 0 or f["soft_max"] >= num_classes):
        problems.append(f"rank {rank}: soft target classes must be in [0, {num_classes}), "
                        f"got [{f['soft_min']}, {f['soft_max']}]")
    if f["soft_bad"]:
        problems.append(f"rank {rank}: soft target probabilities must be finite, >= 0 and sum to at most 1 per sample")
    return problems
