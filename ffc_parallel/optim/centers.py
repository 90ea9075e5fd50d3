"""How one head's class centers are trained: the rows a step touched, the gradient's scale and
overflow, and the step, driven by the DeepSpeed engine the head is attached to.

A :class:`CenterTrainer` belongs to one :class:`~ffc_parallel.ShardedClassifier` and holds its
centers ``weight[num_local, D]`` (this rank's rows, a leaf ``nn.Parameter`` that no module
registers, so nothing that walks ``module.parameters()`` (DeepSpeed's broadcast, gradient
averaging, ZeRO partitioning, optimizers given ``net.parameters()``, DDP) ever touches it).

Attached to a DeepSpeed engine (``deepspeed_bridge`` does it at the engine's first forward):

* the embedding gradient is multiplied by the data-parallel size (DeepSpeed averages the backbone's
  gradients over ranks; the head's loss needs their sum) by :meth:`gate`, a view with a gradient hook;
* with fp16, after every backward the accumulated center gradient of the rows used so far is checked
  for inf/NaN (agreed over the head's group); if any rank has one, :meth:`gate` makes the embedding
  gradient inf, so DeepSpeed's own overflow check skips the step of backbone and centers on every
  rank and backs the one loss scale off;
* when DeepSpeed's inner optimizer steps, :meth:`step_centers` updates the rows touched since the
  last step (Partial FC) or all rows with the same update rule, hyperparameters and learning rate,
  divided by the loss scale the gradients carry; a step DeepSpeed skipped drops the gradient at the
  next forward.

Without an engine (plain PyTorch, one process or a user's own gradient sums), ``head.weight`` is an
ordinary parameter: hand it to an optimizer of your own.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.distributed as dist

from .. import deepspeed_bridge as bridge
from .center_optimizer import ShardedCenterOptimizer
from .center_store import CenterStore
from .resident_rows import ResidentRows


_STATS_ELEMENTS = 1 << 20   # gradient values per pass of center_grad_stats (the most one gather of rows copies)


def center_grad_stats(grad: torch.Tensor | None, rows: torch.Tensor | None, group=None) -> tuple[bool, float]:
    """``(any rank non-finite, global squared norm)`` of the center gradients ``[num_local, D]``
    restricted to ``rows`` (None = all), agreed over ``group`` with one all-reduce of 2 numbers. Summed
    in fp64 a block of rows at a time, each block copied into one fp64 buffer (an fp64 copy of a
    half-precision ``[R, D]`` gradient is 4x its size: at 5e5 rows of D 128, 1 GB; ``vector_norm(dtype=)``
    would make a new fp64 copy of every block)."""
    stats = torch.zeros(2, dtype=torch.float64, device=grad.device if grad is not None else "cpu")
    if grad is not None:
        sq = torch.zeros((), dtype=torch.float64, device=grad.device)
        step = max(1, _STATS_ELEMENTS // max(1, grad.shape[-1]))
        count = grad.shape[0] if rows is None else rows.numel()
        wide = None if grad.dtype == torch.float64 else \
            torch.empty((min(step, count), grad.shape[-1]), dtype=torch.float64, device=grad.device)
        for lo in range(0, count, step):
            part = grad[lo:lo + step] if rows is None else grad.index_select(0, rows[lo:lo + step])
            part = part if wide is None else wide[: part.shape[0]].copy_(part)
            sq += torch.linalg.vector_norm(part).square()
        stats[0] = float(not torch.isfinite(sq))
        stats[1] = sq if torch.isfinite(sq) else 0.0
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        flag = stats[:1].clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(stats[1:], op=dist.ReduceOp.SUM, group=group)
        stats[0] = flag[0]
    return bool(stats[0] > 0), float(stats[1])


class CenterTrainer:
    """The centers of one head and how they are stepped (see the module docstring).

    Args:
        weight: the centers ``[num_local, D]``.
        group: the head's process group.
        master_weights: fp32 master copy of half-precision centers (None: yes for bf16/fp16).
        grad_multiplier: factor on the embedding gradient; None = the data-parallel size of the
            DeepSpeed engine the head is attached to, 1 without one (pass the world size under DDP).
        store: a :class:`~ffc_parallel.optim.center_store.CenterStore` holding every row off the device
            (then ``weight`` holds only the rows of the current step, see :meth:`activate`), or None.
    """

    def __init__(self, module: torch.nn.Module, weight: torch.nn.Parameter, group=None,
                 master_weights: bool | None = None, grad_multiplier: float | None = None,
                 store: CenterStore | None = None):
        self.weight, self.group, self.master_weights = weight, group, master_weights
        self.store = store
        self.resident = ResidentRows(store, weight) if store is not None else None
        self.owner = f"ffc_parallel.{type(module).__name__}"
        self.fixed_multiplier = None if grad_multiplier is None else float(grad_multiplier)
        self.view = None             # deepspeed_bridge.EngineView once attached
        self.optimizer: ShardedCenterOptimizer | None = None
        self.clipping = None         # fp.initialize's GlobalNormClipping (its .factor divides the step)
        self.resolved = False        # attached, or known to train without an engine
        self._rows: torch.Tensor | None = None
        self._all_rows = False
        self._pending = False
        self._window = None          # engine step count when the pending gradient began
        self._loss_scale = 1.0
        self._warned_clipping = False
        self._spare_grad: torch.Tensor | None = None   # a released CPU gradient buffer (take_spare_grad)
        self._module = weakref.ref(module)
        bridge.watch(module)

    # ------------------------------------------------------------------ engine
    def attach(self, view) -> None:
        """Follow the engine ``view`` (the bridge calls this, through the head, for the engine whose
        model holds the head); raises for a configuration the centers cannot follow."""
        if self.view is view:
            return
        if self.view is not None:
            raise RuntimeError(f"{self.owner} is inside the models of two DeepSpeed engines: a head's centers follow "
                               "one engine's optimizer; build a new head for the second model")
        ranks = bridge.group_ranks(self.group)
        if ranks != view.dp_ranks:
            raise ValueError(f"{self.owner} is sharded over ranks {list(ranks)} but DeepSpeed averages gradients over "
                             f"its data-parallel ranks {list(view.dp_ranks)}: build the head on DeepSpeed's "
                             "data-parallel group (group=None for the world)")
        if view.trains(self.weight):
            raise ValueError(f"{self.owner}'s weight was handed to DeepSpeed's optimizer (model_parameters or the "
                             "optimizer's param groups): DeepSpeed would broadcast, average and partition a class "
                             "shard that differs on every rank. Pass net.parameters() (the centers are not among them) "
                             "and let the head follow DeepSpeed's optimizer")
        view.check_trainable(self.owner)
        settings = view.settings()
        self.optimizer = ShardedCenterOptimizer(self.weight, settings.kind, settings.lr,
                                                master_weights=self.master_weights, **settings.hyper)
        if self.store is not None:   # the optimizer's state lives in the store, row by row
            for name, value in self.optimizer.state.items():
                self.store.add(name, value.dtype, value.shape[1] if value.dim() == 2 else 1)
        self.view, self.resolved = view, True
        view.trainers.append(self)
        bridge.note_bound_weight(self.weight)

    def recheck_engine(self) -> None:
        """Watch again for the engine that calls the head (an attached head then checks it is the same one)."""
        module = self._module()
        if self.view is not None and module is not None:
            bridge.watch(module)

    @property
    def grad_multiplier(self) -> float:
        if self.fixed_multiplier is not None:
            return self.fixed_multiplier
        return float(len(self.view.dp_ranks)) if self.view is not None else 1.0

    @property
    def checks_overflow(self) -> bool:
        return self.view is not None and self.view.fp16

    # ------------------------------------------------------------------ one micro-batch
    def begin_forward(self) -> None:
        """Start of a training forward that records a graph."""
        if not self.resolved:
            if bridge.engines_seen():
                raise RuntimeError(
                    f"{self.owner} trains next to a DeepSpeed engine whose model does not contain it: its centers would "
                    "never be stepped and the backbone's gradient would be averaged where the head needs a sum. Make "
                    "the head a submodule of the model given to deepspeed.initialize (or to ffc_parallel.initialize)")
            module = self._module()
            if module is not None:
                bridge.unwatch(module)
            self.resolved = True
        if self.view is None:
            if self.store is not None:
                raise RuntimeError(f"{self.owner} keeps its rows in a center store (center_storage host/disk): it "
                                   "trains only inside a DeepSpeed engine, which steps the rows and writes them "
                                   "back; an optimizer given head.weight would step this step's rows only")
            return
        if self._pending and self.view.global_steps != self._window:
            self.drop()   # DeepSpeed skipped that step (fp16 overflow): so do the centers
        self._loss_scale = self.view.loss_scale()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a view) whose gradient :meth:`_embedding_grad` rewrites; ``x`` itself when nothing applies."""
        if not (torch.is_grad_enabled() and x.requires_grad) or (self.grad_multiplier == 1.0 and not self.checks_overflow):
            return x
        gated = x.view_as(x)   # a node of this call only: the hook never touches another use of x
        gated.register_hook(self._embedding_grad)
        return gated

    def _embedding_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Runs once the head's backward wrote the center gradient: inf everywhere when any rank's centers
        overflowed (fp16, collective), else the gradient times the multiplier."""
        if self.checks_overflow and self.center_grad_overflowed():
            return torch.full_like(grad, float("inf"))
        multiplier = self.grad_multiplier
        return grad * multiplier if multiplier != 1.0 else grad

    def activate(self, rows: torch.Tensor) -> torch.Tensor:
        """The indices into ``weight`` of local rows ``rows`` (sorted) for this forward: ``rows`` itself
        for centers on the device; with a store, ``rows`` are brought onto the device (next to the rows of
        a pending gradient) and their positions among the resident rows are returned."""
        if self.resident is None:
            return rows
        before = self.resident.rows
        keep = self._pending and torch.is_grad_enabled()
        positions = self.resident.activate(rows, keep=keep)
        if keep and self._rows is not None:
            self._rows = self.resident.remap(self._rows, before)
        return positions

    def prefetch(self, rows: torch.Tensor | None) -> None:
        """Start reading ``rows`` (the next step's candidates) from the store (nothing without one)."""
        if self.resident is not None:
            self.resident.prefetch(rows)

    def note_rows(self, rows: torch.Tensor | None) -> None:
        """The local rows a training forward uses (None: all); their gradient waits for the next step."""
        if not torch.is_grad_enabled():
            return
        if not self._pending:
            self._pending = True
            self._window = self.view.global_steps if self.view is not None else None
        if rows is None:
            self._all_rows, self._rows = True, None
        elif not self._all_rows:
            self._rows = rows if self._rows is None else torch.unique(torch.cat([self._rows, rows]))

    def pending_rows(self) -> torch.Tensor | None:
        """The rows (sorted, unique) with a pending gradient; None when that is every row (a stored head's
        resident rows, usually): the optimizer and the norm then walk the tensors in place, no gather."""
        rows = None if self._all_rows else self._rows
        if rows is not None and rows.numel() == self.weight.shape[0]:
            return None
        if rows is not None and self.weight.grad is not None:
            rows = rows.to(self.weight.grad.device)
        return rows

    def center_grad_overflowed(self) -> bool:
        """Whether any rank's accumulated center gradient (rows used so far) holds inf/NaN (collective)."""
        return center_grad_stats(self.weight.grad if self._pending else None, self.pending_rows(), self.group)[0]

    def pending_norm_sq(self) -> float:
        """Squared norm of the unscaled pending center gradient, summed over the group (collective)."""
        _, sq = center_grad_stats(self.weight.grad if self._pending else None, self.pending_rows(), self.group)
        return sq / (self._loss_scale * self._loss_scale)

    # ------------------------------------------------------------------ the step
    def step_centers(self, settings) -> None:
        """Apply DeepSpeed's step (``settings``: a ``deepspeed_bridge.CenterSettings``) to the pending rows."""
        grad = self.weight.grad
        if self._pending and grad is not None:
            self.optimizer.follow(settings.kind, settings.hyper)
            if self.clipping is None and self.view.gradient_clipping > 0 and not self._warned_clipping:
                self._warned_clipping = True
                if bridge.group_ranks(self.group)[0] == (dist.get_rank() if dist.is_initialized() else 0):
                    warnings.warn(
                        f"DeepSpeed clips the backbone's gradient to gradient_clipping={self.view.gradient_clipping} "
                        "(DeepSpeed's default when the config has none); the class centers are not clipped under "
                        "plain deepspeed.initialize. ffc_parallel.initialize clips backbone and centers by their "
                        "global norm; set gradient_clipping to 0 to clip neither.", stacklevel=2)
            factor = self.clipping.factor if self.clipping is not None and self.clipping.active else 1.0
            if self.resident is not None:
                self.optimizer.state = self.resident.state_rows()
            self.optimizer.step(self.pending_rows(), lr=settings.lr, grad_scale=1.0 / (self._loss_scale * factor))
            if self.resident is not None:
                self.resident.write_back(self.optimizer.state)
        self.drop()

    def drop(self) -> None:
        """Forget the pending gradient: zero the rows Partial FC wrote (O(rows)), or release the buffer
        (``weight.grad`` becomes None; on a CPU the buffer is kept for :meth:`take_spare_grad`)."""
        rows, grad = self.pending_rows(), self.weight.grad
        if grad is not None and rows is not None and self.resident is None:
            grad.index_fill_(0, rows, 0.0)
        else:
            self.weight.grad = None
            if grad is not None and grad.device.type == "cpu":
                self._spare_grad = grad
        self._rows, self._all_rows, self._pending, self._window = None, False, False, None

    def take_spare_grad(self) -> torch.Tensor | None:
        """The CPU gradient buffer the last :meth:`drop` released (once; None afterwards), for the next
        backward to write its gradient into: a fresh buffer of ``[R, D]`` would fault its pages in again
        (the kernel unmaps a freed large block), about 40 ms per step for 128 MB. Its old values are
        garbage: code that kept a reference to a dropped ``weight.grad`` sees it overwritten."""
        spare, self._spare_grad = self._spare_grad, None
        return spare

    # ------------------------------------------------------------------ device moves
    def move_to(self, device: torch.device) -> None:
        """Move the centers, their gradient and optimizer state to ``device`` (dtype unchanged)."""
        if self.weight.device == device:
            return
        with torch.no_grad():
            self.weight.data = self.weight.data.to(device)
            if self.weight.grad is not None:
                self.weight.grad = self.weight.grad.to(device)
        if self.optimizer is not None:
            self.optimizer.state = {k: v.to(device) for k, v in self.optimizer.state.items()}
        if self._rows is not None:
            self._rows = self._rows.to(device)
