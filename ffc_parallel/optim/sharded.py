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

A step of every row whose rows share one step count (always so under full softmax) runs torch's fused
kernel (``fused=True`` of the functional ``torch.optim`` API: one pass over each state tensor, on CPU and
GPU) where torch has one for the device and dtype; ``fused=False`` forces the unfused path. NVIDIA apex's
multi-tensor kernels are not used: their gain is batching many small tensors into one launch, and a
rank's centers are one large tensor.
"""
from __future__ import annotations

import functools

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.sgd import sgd as _torch_sgd

SUPPORTED = ("sgd", "adam", "adamw")
_IGNORED_KEYS = {"torch_adam", "fused", "foreach", "fp32_optimizer_states"}  # DeepSpeed implementation switches


class ShardedCenterOptimizer:
    """SGD (momentum, dampening, Nesterov, L2 weight decay), Adam (L2) or AdamW (decoupled) for
    ``weight[num_local, D]``; ``step(rows, lr, grad_scale)`` reads ``weight.grad`` (same shape)."""

    def __init__(self, weight: torch.nn.Parameter, kind: str = "sgd", lr: float = 1e-3, *,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 master_weights: bool | None = None, fused: bool | None = None):
        kind = kind.lower()
        if kind not in SUPPORTED:
            raise ValueError(f"center optimizer {kind!r} is not supported: use one of {SUPPORTED}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.weight, self.kind, self.lr = weight, kind, float(lr)
        self.fused = fused is not False  # None: where torch has a fused kernel (see _fused_kernel_exists)
        self.fused_steps = 0             # steps taken by the fused kernel (for logs and tests)
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
        """Update ``rows`` (sorted unique local row ids, or None for all) with ``weight.grad * grad_scale``.

        A fused step of every row may overwrite ``weight.grad`` (scaled in place, as torch's fused
        optimizers do)."""
        if lr is not None:
            self.lr = float(lr)
        w, grad = self.weight, self.weight.grad
        if grad is None or (rows is not None and rows.numel() == 0):
            return
        sdt = self._state_dtype()
        if rows is None and self.fused and self._step_all_rows_fused(grad.to(sdt), grad_scale):
            return
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

    def _step_all_rows_fused(self, g, grad_scale: float) -> bool:
        """Every row in one fused kernel call (``g``: ``[num_local, D]`` in the state dtype, may be
        overwritten); False, having changed nothing, where rows differ in step count or torch has no
        fused kernel for this device and dtype."""
        steps = self.state["step"]
        low, high = torch.aminmax(steps)
        if int(low) != int(high) or not _fused_kernel_exists(g.device.type, g.dtype):
            return False
        master = self.state.get("master")  # else the centers, or an fp32 copy of half-precision ones
        p = master if master is not None else self.weight.data.to(g.dtype)
        done = int(low)  # steps each row has taken; the fused kernel runs step done + 1
        if grad_scale != 1.0:
            g.mul_(grad_scale)  # not the kernel's grad_scale: that is fp32, and 1 / grad_scale rounds
        if self.kind == "sgd":
            first = done == 0 and self.momentum != 0
            buffers = [None if first else self.state.get("momentum_buffer")]
            _torch_sgd([p], [g], buffers, fused=True,
                                weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr,
                                dampening=self.dampening, nesterov=self.nesterov, maximize=False)
            if first:
                self.state["momentum_buffer"].copy_(buffers[0])
        else:
            adam = _torch_adamw if self.kind == "adamw" else _torch_adam
            step = torch.full((), float(done), dtype=torch.float32, device=g.device)  # the wrapper adds 1
            adam([p], [g], [self.state["exp_avg"]], [self.state["exp_avg_sq"]], [], [step], fused=True,
                 amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr,
                 weight_decay=self.weight_decay, eps=self.eps, maximize=False)
        if p is not self.weight.data:
            self.weight.data.copy_(p)
        steps += 1
        self.fused_steps += 1
        return True

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


@functools.lru_cache(maxsize=None)
def _fused_kernel_exists(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has fused SGD and Adam kernels for ``device_type`` and ``dtype`` (tried once on
    one-element tensors: CPU kernels arrived in torch 2.4, CUDA ones earlier)."""
    try:
        p, g, m, v = (torch.zeros(1, dtype=dtype, device=device_type) for _ in range(4))
        step = torch.zeros((), dtype=torch.float32, device=device_type)
        _torch_adam([p], [g], [m], [v], [], [step], fused=True, amsgrad=False, beta1=0.9, beta2=0.999,
                    lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False)
        _torch_sgd([p], [g], [m], fused=True, weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0,
                   nesterov=False, maximize=False)
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
