"""One overflow decision and one gradient norm for the backbone (inside DeepSpeed) and the centers.

DeepSpeed decides overflow and clipping from the gradients it owns. :class:`CenterGradientHooks`
extends both decisions with the class-sharded centers, which DeepSpeed never sees:

* overflow: a NaN/inf in any rank's center gradient is agreed on through one all-reduce (MAX) over
  the head's group and OR-ed into DeepSpeed's own (already data-parallel-agreed) overflow check, so
  every rank skips the step and DeepSpeed's dynamic loss scaler backs off once, for both parts;
* clipping: the squared center-gradient norms of all ranks are summed (each rank's shard counted
  once) and added to the backbone norm DeepSpeed computes; the backbone is clipped by DeepSpeed with
  that global norm and the centers are clipped with the same factor.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def center_grad_stats(grad: torch.Tensor | None, rows: torch.Tensor | None, group=None) -> tuple[bool, float]:
    """``(any rank non-finite, global squared norm)`` of the center gradients ``[num_local, D]``
    restricted to ``rows`` (None = all), agreed over ``group`` with one all-reduce of 2 numbers."""
    stats = torch.zeros(2, dtype=torch.float64, device=grad.device if grad is not None else "cpu")
    if grad is not None:
        g = grad if rows is None else grad.index_select(0, rows)
        g = g.double()
        sq = g.pow(2).sum()
        stats[0] = float(not torch.isfinite(sq))
        stats[1] = sq if torch.isfinite(sq) else 0.0
    if dist.is_initialized():
        flag = stats[:1].clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(stats[1:], op=dist.ReduceOp.SUM, group=group)
        stats[0] = flag[0]
    return bool(stats[0] > 0), float(stats[1])


class CenterGradientHooks:
    """Wraps the overflow check and the clipping of a DeepSpeed optimizer so that they include the
    centers. Set :attr:`center_overflow` and :attr:`center_norm_sq` (unscaled) before each
    ``deepspeed_engine.step()`` at an accumulation boundary; read :attr:`clip_factor` after it
    (the factor, >= 1, the gradients were divided by for clipping)."""

    def __init__(self, ds_engine):
        self.ds = ds_engine
        self.center_overflow = False
        self.center_norm_sq = 0.0
        self.clip_factor = 1.0
        opt = ds_engine.optimizer
        self.clip = float(ds_engine.gradient_clipping() or 0.0)
        if hasattr(opt, "has_overflow"):  # ZeRO 1/2/3
            self._wrap_overflow(opt, "has_overflow")
        checker = getattr(opt, "overflow_checker", None)
        if checker is not None:  # FP16_Optimizer (fused / unfused), ZeRO-0
            for name in ("has_overflow", "check", "check_using_norm"):
                if hasattr(checker, name):
                    self._wrap_overflow(checker, name)
        if self.clip > 0:
            self._wrap_clipping(ds_engine, opt)

    def _wrap_overflow(self, obj, name):
        original = getattr(obj, name)

        def checked(*args, **kwargs):
            return bool(original(*args, **kwargs)) or self.center_overflow
        setattr(obj, name, checked)

    def _wrap_clipping(self, ds, opt):
        if hasattr(opt, "unscale_and_clip_grads"):
            original = opt.unscale_and_clip_grads
            # (grad_groups | sub_group_id, total_norm, ...) everywhere but FP16_UnfusedOptimizer's (total_norm, ...)
            position = 0 if type(opt).__name__ == "FP16_UnfusedOptimizer" else 1

            def clipped(*args, **kwargs):
                scale = float(getattr(opt, "loss_scale", 1.0) or 1.0)
                if "total_norm" in kwargs:
                    kwargs["total_norm"] = self._global_norm(kwargs["total_norm"], scale)
                else:
                    args = list(args)
                    args[position] = self._global_norm(args[position], scale)
                return original(*args, **kwargs)
            opt.unscale_and_clip_grads = clipped
        elif not (ds.fp16_enabled() or ds.bfloat16_enabled() or ds.zero_optimization()):
            ds.clip_fp32_gradients = self._clip_fp32_backbone
        else:
            raise NotImplementedError(
                f"gradient_clipping with the DeepSpeed optimizer {type(opt).__name__} (ZeRO stage "
                f"{ds.zero_optimization_stage()}, bf16={ds.bfloat16_enabled()}) is not supported by "
                "ffc_parallel: use ZeRO stage 1, 2 or 3, or fp32/fp16 at stage 0")

    def _global_norm(self, scaled_backbone_norm, scale):
        """Backbone norm (times ``scale``, as DeepSpeed passes it) combined with the center norm;
        records the factor DeepSpeed will divide by, for the centers."""
        bb = torch.as_tensor(scaled_backbone_norm, dtype=torch.float64)
        total = torch.sqrt(bb * bb + self.center_norm_sq * scale * scale)
        self.clip_factor = max(1.0, (float(total) / scale + 1e-6) / self.clip) if math.isfinite(float(total)) else 1.0
        return total.to(torch.as_tensor(scaled_backbone_norm).dtype) if torch.is_tensor(scaled_backbone_norm) else float(total)

    @torch.no_grad()
    def _clip_fp32_backbone(self):
        grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
        bb_sq = sum(float(g.double().pow(2).sum()) for g in grads)
        total = math.sqrt(bb_sq + self.center_norm_sq)
        self.clip_factor = max(1.0, (total + 1e-6) / self.clip)
        for g in grads:
            g.div_(self.clip_factor)
