"""Additive/multiplicative angular margins on the target logit.

``CombinedMargin(s, m1, m2, m3)`` turns the target cosine ``c = cos θ`` into ``s * (cos(m1*θ + m2) - m3)``
and every other cosine into ``s * c``. ArcFace is ``(64, 1, 0.5, 0)``, CosFace ``(64, 1, 0, 0.4)``,
SphereFace-like ``m1 > 1``; ``(s, 1, 0, 0)`` is a plain scaled cosine softmax.

Past the point where the angle wraps, ``m1*θ + m2 > π``, ``cos(m1*θ + m2)`` would start to *rise* again
as the sample gets worse, rewarding a wrong prediction. There we continue the target linearly in
``c`` from the wrap point: ``f(c) = c - c* - 1 - m3`` with ``c* = cos((π - m2)/m1)``. The result is
continuous, strictly increasing in ``c`` and always below the wrap value ``-1 - m3``
(insightface's ``cos θ - m sin m`` branch jumps by about 0.12 at the wrap point for ArcFace).

Gradients: by default the exact derivative ``f'(c)``; ``straight_through=True`` uses ``f'(c) = 1``
(what insightface's in-place ArcFace does), which is off by the factor ``f'(c)`` (about 35% at
θ = 45° for ArcFace, 15% at 60°, more near θ = 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Smallest sin θ used in f'(c) = m1 sin(m1 θ + m2) / sin θ, which is infinite at θ = 0 when m2 > 0.
_MIN_SIN = 1e-6


@dataclass(frozen=True)
class CombinedMargin:
    """Target logit ``s * (cos(m1*θ + m2) - m3)``; see the module docstring for the wrap rule."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        if not self.s > 0:
            raise ValueError(f"CombinedMargin: scale s must be > 0, got {self.s}")
        if not self.m1 > 0:
            raise ValueError(f"CombinedMargin: m1 must be > 0, got {self.m1}")
        if not 0 <= self.m2 < math.pi:
            raise ValueError(f"CombinedMargin: m2 must be in [0, pi), got {self.m2}")

    @property
    def is_angular(self) -> bool:
        return self.m1 != 1.0 or self.m2 != 0.0

    @property
    def wrap_cos(self) -> float:
        """``c*``: target cosines below it have ``m1*θ + m2 > π`` (``-1`` when that cannot happen)."""
        theta_wrap = (math.pi - self.m2) / self.m1
        return math.cos(theta_wrap) if theta_wrap < math.pi else -1.0

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        """``f(c)`` for target cosines ``cos`` (any shape), before scaling by ``s``."""
        if not self.is_angular:
            return cos - self.m3
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        inside = torch.cos(self.m1 * theta + self.m2)
        wrapped = cos - self.wrap_cos - 1.0
        return torch.where(cos >= self.wrap_cos, inside, wrapped) - self.m3

    def target_grad(self, cos: torch.Tensor) -> torch.Tensor:
        """``f'(c)`` (or 1 when ``straight_through``), same shape as ``cos``."""
        if self.straight_through or not self.is_angular:
            return torch.ones_like(cos)
        c = cos.clamp(-1.0, 1.0)
        theta = torch.acos(c)
        sin_theta = torch.sqrt((1.0 - c * c).clamp_min(0.0)).clamp_min(_MIN_SIN)
        inside = self.m1 * torch.sin(self.m1 * theta + self.m2) / sin_theta
        return torch.where(c >= self.wrap_cos, inside, torch.ones_like(c))


def resolve_margin(margin, scale: float | None = None) -> CombinedMargin:
    """Turn ``"arcface"``, ``"cosface"``, ``None`` (plain cosine softmax) or a margin into a margin.

    ``scale`` overrides ``s`` of the shorthands; with ``margin=None`` it is the softmax scale
    (default 64).
    """
    if isinstance(margin, CombinedMargin):
        if scale is not None and scale != margin.s:
            raise ValueError(f"scale={scale} conflicts with the margin's own s={margin.s}")
        return margin
    s = 64.0 if scale is None else float(scale)
    if margin is None:
        return CombinedMargin(s)
    if isinstance(margin, str):
        key = margin.lower()
        if key == "arcface":
            return CombinedMargin(s, 1.0, 0.5, 0.0)
        if key == "cosface":
            return CombinedMargin(s, 1.0, 0.0, 0.4)
        if key in ("none", "softmax", "cosine"):
            return CombinedMargin(s)
    raise ValueError(f"unknown margin {margin!r}: use 'arcface', 'cosface', None or "
                     f"fp.CombinedMargin(s, m1, m2, m3)")
