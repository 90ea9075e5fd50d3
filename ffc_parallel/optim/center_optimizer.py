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

Updates run torch's fused kernel (``fused=True`` of the functional ``torch.optim`` API: one pass over
each state tensor, CPU and GPU) where torch has one for the device and dtype, one call per group of rows
at one step count: every row in place under full softmax, gathered rows under Partial FC.
``fused=False`` forces the unfused element-wise path. NVIDIA apex's multi-tensor kernels are not used:
their gain is batching many small tensors into one launch, and a rank's centers are one large tensor.
"""
from __future__ import annotations

import functools

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.sgd import sgd as _torch_sgd

SUPPORTED = ("sgd", "adam", "adamw")
_MAX_FUSED_GROUPS = 256  # fused calls per step at most (groups of rows at one step count), else unfused
# values per block of an in-place step (its fp32 copies of half weights and gradients, two buffers made once
# per step and reused block to block): on a CPU 2 MiB each, so no [R, D] fp32 copy faults in (4 MiB blocks
# ran as fast); on an accelerator a block bounds them to 2 x 256 MB
_CPU_BLOCK_ELEMENTS, _ACCELERATOR_BLOCK_ELEMENTS = 1 << 19, 1 << 26


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

    def follow(self, kind: str, hyper: dict) -> None:
        """Take the hyperparameters of the optimizer the centers follow (they may change during a run,
        e.g. a weight-decay schedule); the update rule and the state it keeps may not."""
        momentum = float(hyper.get("momentum", self.momentum))
        if kind != self.kind or (self.kind == "sgd" and (momentum != 0) != ("momentum_buffer" in self.state)):
            raise ValueError(f"the optimizer the centers follow changed from {self.kind} (momentum {self.momentum}) to "
                             f"{kind} (momentum {momentum}) during training; the centers' state cannot follow")
        self.momentum = momentum
        self.dampening = float(hyper.get("dampening", self.dampening))
        self.nesterov = bool(hyper.get("nesterov", self.nesterov))
        self.weight_decay = float(hyper.get("weight_decay", self.weight_decay))
        self.betas = tuple(float(b) for b in hyper.get("betas", self.betas))
        self.eps = float(hyper.get("eps", self.eps))

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
        if self.fused and _fused_kernel_exists(grad.device.type, sdt) and self._step_fused(rows, grad, grad_scale):
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

    def _step_fused(self, rows: torch.Tensor | None, grad: torch.Tensor, grad_scale: float) -> bool:
        """The step through torch's fused kernel, one call per group of rows that share what the update
        depends on (Adam: the row's step count; SGD with momentum: whether it is the row's first step).
        Every row of one group: in place, no gather. False, having changed nothing, past
        ``_MAX_FUSED_GROUPS`` groups (the unfused path then takes the step)."""
        steps = self.state["step"] if rows is None else self.state["step"].index_select(0, rows)
        if self.kind != "sgd":
            key = steps
        else:
            key = (steps > 0).to(torch.uint8) if self.momentum else torch.zeros_like(steps, dtype=torch.uint8)
        low, high = torch.aminmax(key)
        sdt = self._state_dtype()
        if rows is None and int(low) == int(high):  # every row in place, a block of rows at a time
            master = self.state.get("master")  # else the centers, or an fp32 copy of half-precision ones
            state = {k: v for k, v in self.state.items() if k not in ("step", "master")}
            n = self.weight.shape[0]
            per_block = _CPU_BLOCK_ELEMENTS if self.weight.device.type == "cpu" else _ACCELERATOR_BLOCK_ELEMENTS
            block = max(1, per_block // max(1, self.weight.shape[1]))
            # fp32 working copies of half rows and gradients: two block buffers, reused block to block
            shape = (min(block, n), self.weight.shape[1])
            p_buf = self.weight.new_empty(shape, dtype=sdt) if master is None and self.weight.dtype != sdt else None
            g_buf = grad.new_empty(shape, dtype=sdt) if grad.dtype != sdt else None
            for a in range(0, n, block):
                w = self.weight.data[a:a + block]
                p = master[a:a + block] if master is not None else w if p_buf is None else p_buf[: w.shape[0]].copy_(w)
                g = grad[a:a + block]   # the gradient itself when fp32: may be overwritten
                g = g if g_buf is None else g_buf[: g.shape[0]].copy_(g)
                if grad_scale != 1.0:
                    g.mul_(grad_scale)
                self._fused_kernel(p, g, {k: v[a:a + block] for k, v in state.items()}, int(low))
                if p.data_ptr() != w.data_ptr():
                    w.copy_(p)
            steps += 1
            self.fused_steps += 1
            return True
        if rows is None:
            rows = torch.arange(self.weight.shape[0], device=steps.device)
        order = torch.argsort(key, stable=True)
        groups, counts = torch.unique_consecutive(key[order], return_counts=True)
        if groups.numel() > _MAX_FUSED_GROUPS:
            return False
        rows = rows[order]
        master = self.state.get("master")
        p = (master if master is not None else self.weight.data).index_select(0, rows).to(sdt)
        g = grad.index_select(0, rows).to(sdt)
        if grad_scale != 1.0:
            g.mul_(grad_scale)
        state = {k: v.index_select(0, rows) for k, v in self.state.items() if k not in ("step", "master")}
        begin = 0
        for value, count in zip(groups.tolist(), counts.tolist()):
            part = slice(begin, begin + count)
            self._fused_kernel(p[part], g[part], {k: v[part] for k, v in state.items()}, value)
            begin += count
        self.weight.data.index_copy_(0, rows, p.to(self.weight.dtype))
        if master is not None:
            master.index_copy_(0, rows, p)
        for k, v in state.items():
            self.state[k].index_copy_(0, rows, v)
        self.state["step"].index_add_(0, rows, torch.ones_like(rows))
        self.fused_steps += 1
        return True

    def _fused_kernel(self, p, g, state: dict, done: int) -> None:
        """One fused update of ``p`` (``[n, D]``, state dtype, in place) with ``g`` (same shape, may be
        overwritten) and its ``state`` rows (in place); ``done``: the rows' step count before this step
        (SGD: only whether it is 0)."""
        if self.kind == "sgd":
            first = done == 0 and self.momentum != 0
            buffers = [None if first else state.get("momentum_buffer")]
            _torch_sgd([p], [g], buffers, fused=True, weight_decay=self.weight_decay, momentum=self.momentum,
                       lr=self.lr, dampening=self.dampening, nesterov=self.nesterov, maximize=False)
            if first:
                state["momentum_buffer"].copy_(buffers[0])  # torch made the first buffer: the gradient
        else:
            adam = _torch_adamw if self.kind == "adamw" else _torch_adam
            step = torch.full((), float(done), dtype=torch.float32, device=p.device)  # the wrapper adds 1
            adam([p], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step], fused=True, amsgrad=False,
                 beta1=self.betas[0], beta2=self.betas[1], lr=self.lr, weight_decay=self.weight_decay,
                 eps=self.eps, maximize=False)

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
