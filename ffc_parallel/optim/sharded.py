"""Optimizers for one rank's class centers ``weight[num_local, D]``, with row-sparse (lazy) updates.

The state (momentum, Adam moments, a per-row step count) is allocated for this rank's rows only and
lives on the weight's device. :meth:`ShardedCenterOptimizer.step` updates the rows it is given (the
Partial FC rows touched since the last step) or every row (``rows=None``); rows not given keep their
weights AND their state untouched, so the cost of a step scales with the rows touched.

Half-precision centers (bf16/fp16) get an fp32 master copy by default (``master_weights=True``, state
key ``"master"``): updates are applied to it and rounded into the centers, so steps smaller than the
half-precision resolution of a weight are not lost. ``master_weights=False`` updates in fp32 and rounds
back each step, saving 4 bytes per weight.

Lazy semantics: a row's step count, momentum and moments advance only when the row is touched; weight
decay applies only to touched rows; Adam's bias correction uses the row's own step count. With every
row touched each step (``sample_rate=1``) this is exactly ``torch.optim.SGD`` / ``Adam`` / ``AdamW``.
"""
from __future__ import annotations

import torch

SUPPORTED = ("sgd", "adam", "adamw")
_IGNORED_KEYS = {"torch_adam", "fused", "foreach", "fp32_optimizer_states"}  # DeepSpeed implementation switches


class ShardedCenterOptimizer:
    """SGD (momentum, dampening, Nesterov, L2 weight decay), Adam (L2) or AdamW (decoupled) for
    ``weight[num_local, D]``; ``step(rows, lr, grad_scale)`` reads ``weight.grad`` (same shape)."""

    def __init__(self, weight: torch.nn.Parameter, kind: str = "sgd", lr: float = 1e-3, *,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 master_weights: bool | None = None):
        kind = kind.lower()
        if kind not in SUPPORTED:
            raise ValueError(f"center optimizer {kind!r} is not supported: use one of {SUPPORTED}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.weight, self.kind, self.lr = weight, kind, float(lr)
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), bool(nesterov)
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(float(b) for b in betas), float(eps)
        n = weight.shape[0]
        self.state: dict[str, torch.Tensor] = {"step": torch.zeros(n, dtype=torch.long, device=weight.device)}
        if kind == "sgd" and self.momentum != 0:
            self.state["momentum_buffer"] = torch.zeros_like(weight, dtype=self._state_dtype())
        if kind in ("adam", "adamw"):
            self.state["exp_avg"] = torch.zeros_like(weight, dtype=self._state_dtype())
            self.state["exp_avg_sq"] = torch.zeros_like(weight, dtype=self._state_dtype())
        half = weight.dtype in (torch.float16, torch.bfloat16)
        if master_weights if master_weights is not None else half:
            if not half:
                raise ValueError("master_weights=True needs bf16/fp16 centers: fp32 centers are their own master")
            self.state["master"] = weight.detach().to(torch.float32).clone()

    @classmethod
    def from_deepspeed_config(cls, weight, optimizer_section: dict,
                              master_weights: bool | None = None) -> "ShardedCenterOptimizer":
        """Build from a DeepSpeed config's ``optimizer`` section (``{"type": ..., "params": {...}}``).

        ``"Adam"`` follows DeepSpeed: decoupled weight decay (AdamW) unless ``"adam_w_mode": false``.
        """
        kind = str(optimizer_section.get("type", "")).lower()
        params = dict(optimizer_section.get("params", {}))
        adam_w_mode = params.pop("adam_w_mode", True)
        if kind == "adam" and adam_w_mode:
            kind = "adamw"
        for key in _IGNORED_KEYS:
            params.pop(key, None)
        known = {"lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"optimizer params {unknown} are not supported by the sharded center optimizer "
                             f"(supported: {sorted(known)})")
        if kind not in SUPPORTED:
            raise ValueError(f"the DeepSpeed optimizer type {optimizer_section.get('type')!r} has no sharded "
                             f"center optimizer: use SGD, Adam or AdamW")
        return cls(weight, kind, master_weights=master_weights, **params)

    def _state_dtype(self):
        return torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """Update ``rows`` (sorted unique local row ids, or None for all) with ``weight.grad * grad_scale``."""
        if lr is not None:
            self.lr = float(lr)
        w, grad = self.weight, self.weight.grad
        if grad is None or (rows is not None and rows.numel() == 0):
            return
        sdt = self._state_dtype()
        if rows is None:
            g = grad.to(sdt)
            if grad_scale != 1.0:
                g = g * grad_scale
            st = {k: v for k, v in self.state.items()}
            p = st["master"] if "master" in st else w.data.to(sdt)
        else:
            g = grad.index_select(0, rows).to(sdt) * grad_scale
            st = {k: v.index_select(0, rows) for k, v in self.state.items()}
            p = st["master"] if "master" in st else w.data.index_select(0, rows).to(sdt)
        # p is updated in place: the centers (fp32), the master rows, or an fp32 copy rounded back below
        st["step"] += 1
        if self.kind == "sgd":
            self._sgd(p, g, st)
        else:
            self._adam(p, g, st)
        if rows is None:
            if p is not w.data:
                w.data.copy_(p)
        else:
            w.data.index_copy_(0, rows, p.to(w.dtype))
            for k, v in st.items():
                self.state[k].index_copy_(0, rows, v)

    def _sgd(self, p, g, st):
        if self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        if self.momentum:
            buf, first = st["momentum_buffer"], (st["step"] == 1).unsqueeze(1)
            updated = buf.mul(self.momentum).add_(g, alpha=1 - self.dampening)
            buf.copy_(torch.where(first, g, updated))  # torch.optim.SGD: the first buffer is the gradient
            g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
        p.add_(g, alpha=-self.lr)

    def _adam(self, p, g, st):
        beta1, beta2 = self.betas
        if self.kind == "adamw":
            p.mul_(1 - self.lr * self.weight_decay)
        elif self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = st["step"].to(p.dtype).unsqueeze(1)
        bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step).sqrt()
        denom = (st["exp_avg_sq"].sqrt() / bias2_sqrt).add_(self.eps)
        p.addcdiv_(st["exp_avg"] / bias1, denom, value=-self.lr)

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        """Hyper-parameters and per-row state tensors ``[num_local, ...]`` (rows of this rank)."""
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay, "betas": list(self.betas),
                "eps": self.eps, "state": {k: v.detach().clone() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd["kind"] != self.kind:
            raise ValueError(f"checkpoint center optimizer is {sd['kind']!r} but this run uses {self.kind!r}")
        for key, value in sd["state"].items():
            if key not in self.state or value.shape != self.state[key].shape:
                raise ValueError(f"center optimizer state {key!r}: checkpoint shape "
                                 f"{tuple(value.shape)} does not match {tuple(self.state.get(key, value).shape)}")
            self.state[key].copy_(value)
        if "master" in self.state and "master" not in sd["state"]:
            self.state["master"].copy_(self.weight.detach())  # a checkpoint without masters: start from the centers
        self.lr = float(sd["lr"])
