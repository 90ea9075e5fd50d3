"""Dense single-process references (full [C, D] weights, full logits), written independently of the
library: the ground truth every distributed configuration is compared against."""
import math

import torch
import torch.nn.functional as F


def margin_target(cos, s, m1, m2, m3, straight_through=False):
    """Target logit s*(cos(m1*θ+m2) - m3); past the wrap m1*θ+m2 > π, continued linearly in cos."""
    theta = torch.acos(cos)
    theta_wrap = (math.pi - m2) / m1
    wrapped = cos - math.cos(min(theta_wrap, math.pi)) - 1.0
    value = torch.where(m1 * theta + m2 <= math.pi, torch.cos(m1 * theta + m2), wrapped) - m3
    if straight_through:
        value = cos + (value - cos).detach()
    return s * value


def dense_logits(x, weight, labels, s, m1=1.0, m2=0.0, m3=0.0, filter_threshold=None,
                 straight_through=False):
    """Full margin logits ``[B, C]`` of x[B, D] against all C rows of weight[C, D]."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    rows = torch.arange(x.shape[0])
    logits = s * cos
    if filter_threshold is not None:
        dirty = cos > filter_threshold
        dirty[rows, labels] = False
        logits = logits.masked_fill(dirty, 0.0)
    target = margin_target(cos[rows, labels], s, m1, m2, m3, straight_through)
    return logits.index_put((rows, labels), target)


def dense_margin_loss(x, weight, labels, s, m1=1.0, m2=0.0, m3=0.0, filter_threshold=None,
                      straight_through=False):
    """Mean margin-softmax cross-entropy of x[B, D] against all C rows of weight[C, D]."""
    return F.cross_entropy(dense_logits(x, weight, labels, s, m1, m2, m3, filter_threshold, straight_through),
                           labels)


def rel_err(a, b):
    """max |a - b| / max |b| (absolute when b is all zeros)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0
