"""The device side of a center store: the rows of this step, and the next step's read ahead.

:class:`ResidentRows` holds, for one head, the rows a step uses: the head's ``weight`` parameter is
``[R, D]`` of them (the loss indexes it by position), the other fields' rows (master, optimizer state,
step) wait beside it until the centers step; then everything is written back to the
:class:`~ffc_parallel.optim.center_store.CenterStore`. The next step's Partial FC candidates are read in a
background thread while this step computes (:meth:`ResidentRows.prefetch`).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from . import row_sets
from .center_store import CenterStore, reusable_buffer


class ResidentRows:
    """The rows of one head on the device this step, read from ``store`` and written back after the step.

    ``weight`` (the head's centers parameter) holds ``rows`` ``[R, D]`` of field ``weight``; the other
    fields' rows are read when the centers step (:meth:`state_rows`) and written back with the new
    weights (:meth:`write_back`). :meth:`prefetch` reads the next step's candidate rows in a thread.
    ``stats``: seconds the last prefetch read, seconds the step waited for it, rows and bytes moved.
    """

    def __init__(self, store: CenterStore, weight: torch.nn.Parameter):
        self.store, self.weight = store, weight
        self.rows = torch.empty(0, dtype=torch.long)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ffc-prefetch")
        self._future = None
        self._ahead_rows = None
        self._other: dict[str, torch.Tensor] = {}
        self._ahead = None
        self._spare = None   # the last prefetch's buffers, once its rows were taken: the next one reads into them
        self.stats = {"prefetch_read_s": 0.0, "prefetch_wait_s": 0.0, "sync_read_s": 0.0, "write_s": 0.0,
                      "rows": 0, "prefetched_rows_used": 0}

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, rows: torch.Tensor | None) -> None:
        """Start reading ``rows`` (sorted; the next step's candidates) of every field in the background,
        into the buffers of the last prefetch where they fit (their pages are mapped already)."""
        unused = self._settle()
        spare = self._spare if unused is None else unused
        self._ahead, self._ahead_rows, self._spare = None, None, None
        if rows is None or rows.numel() == 0:
            return
        self._ahead_rows = rows

        def read():
            t0 = time.perf_counter()
            values = self.store.read(rows, into=spare)
            return values, time.perf_counter() - t0

        self._future = self._pool.submit(read)

    def _settle(self) -> dict | None:
        """Wait for the prefetch in flight (its rows stay in ``_ahead``)."""
        if self._future is None:
            return self._ahead
        t0 = time.perf_counter()
        values, seconds = self._future.result()
        self.stats["prefetch_wait_s"] += time.perf_counter() - t0
        self.stats["prefetch_read_s"] += seconds
        self._future, self._ahead = None, values
        return values

    def _take(self, rows: torch.Tensor, into: dict | None = None) -> dict[str, torch.Tensor]:
        """Every field of ``rows`` (sorted), into the buffers ``into`` where they fit: from the prefetched
        rows where there (one gather per field), the rest read now. The prefetch's buffers become spare."""
        ahead, ahead_rows = self._settle(), self._ahead_rows
        self._ahead, self._ahead_rows = None, None
        if ahead is None or ahead_rows is None or not ahead_rows.numel():
            t0 = time.perf_counter()
            out = self.store.read(rows, into=into)
            self.stats["sync_read_s"] += time.perf_counter() - t0
            return out
        out = {}
        for name, value in ahead.items():
            buffer = reusable_buffer(into, name, (rows.numel(), value.shape[1]), value.dtype, self.store.pin)
            out[name] = value.new_empty((rows.numel(), value.shape[1])) if buffer is None else buffer
        late = []   # positions of rows not read ahead (lone positives): each gathered from a wrong place, replaced below
        for a, pos, found in row_sets.lookup(ahead_rows, rows):
            for name, value in ahead.items():
                torch.index_select(value, 0, pos, out=out[name][a:a + pos.numel()])
            late.append((~found).nonzero().flatten().add_(a))
        late = torch.cat(late) if late else torch.empty(0, dtype=torch.long)
        self._spare = ahead
        self.stats["prefetched_rows_used"] += rows.numel() - late.numel()
        t0 = time.perf_counter()
        added = [n for n in self.store.fields if n not in out]   # fields added after the prefetch began
        if added:
            out.update(self.store.read(rows, added, into=into))
        if late.numel():
            for name, value in self.store.read(rows[late], list(ahead)).items():
                out[name].index_copy_(0, late, value)
        if added or late.numel():
            self.stats["sync_read_s"] += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ the step's rows
    def activate(self, rows: torch.Tensor, keep: bool) -> torch.Tensor:
        """Put ``rows`` (sorted local ids) on the device, with the rows already there when ``keep``
        (gradient accumulation: their pending gradient too); returns the positions of ``rows`` among
        the resident rows (what the loss indexes ``weight`` with)."""
        rows = rows.cpu()
        old, old_data, old_grad = self.rows, self.weight.data, self.weight.grad
        keep = keep and old.numel() > 0
        union = torch.unique(torch.cat([old, rows])) if keep else rows
        if not (keep and torch.equal(union, old)):
            fresh = union[~torch.isin(union, old)] if keep else union
            # without keep the resident buffers are done with (written back): the new rows go into them
            values = self._take(fresh, None if keep else {"weight": old_data, **self._other})
            device, dtype = old_data.device, old_data.dtype
            if not keep:   # every row is fresh, in order: the rows read are the resident rows
                data, other = values.pop("weight").to(device=device, dtype=dtype), values
            else:
                fresh_pos = torch.searchsorted(union, fresh)
                data = torch.empty(union.numel(), old_data.shape[1], dtype=dtype, device=device)
                data[fresh_pos.to(device)] = values.pop("weight").to(device=device, dtype=dtype)
                other = {k: v.new_empty((union.numel(), v.shape[1])) for k, v in values.items()}
                for k, v in values.items():
                    other[k][fresh_pos] = v
            grad = None
            if keep:
                old_pos = torch.searchsorted(union, old)
                data[old_pos.to(device)] = old_data
                for k in other:
                    other[k][old_pos] = self._other[k]
                if old_grad is not None:
                    grad = torch.zeros_like(data)
                    grad[old_pos.to(device)] = old_grad
            self.weight.data, self.weight.grad, self.rows, self._other = data, grad, union, other
            self.stats["rows"] = int(union.numel())
        if rows is self.rows:   # sorted unique: positions 0..R-1
            return torch.arange(rows.numel(), device=self.weight.device)
        return torch.searchsorted(self.rows, rows).to(self.weight.device)

    def remap(self, positions: torch.Tensor, rows_before: torch.Tensor) -> torch.Tensor:
        """Positions among ``rows_before`` -> positions of the same rows among the resident rows now."""
        return torch.searchsorted(self.rows, rows_before[positions.cpu()]).to(positions.device)

    def state_rows(self) -> dict[str, torch.Tensor]:
        """The non-weight fields (master, optimizer state, step) of the resident rows, on the device, as
        the optimizer keeps them (``step`` ``[R]``, the others ``[R, width]``)."""
        missing = [n for n in self.store.fields if n != "weight" and n not in self._other]
        if missing:   # fields added after these rows were read (the optimizer's, at attach)
            self._other.update(self.store.read(self.rows, missing))
        return {k: (v.view(-1) if k == "step" else v).to(self.weight.device) for k, v in self._other.items()}

    def write_back(self, state: dict[str, torch.Tensor]) -> None:
        """Write the resident rows (weights and ``state``, the optimizer's rows after its step) to the
        store; the prefetched next rows that this step changed are refreshed from them."""
        ahead = self._settle()
        t0 = time.perf_counter()
        values = {"weight": self.weight.data.detach().cpu()}
        values.update({k: v.detach().cpu().reshape(self.rows.numel(), -1) for k, v in state.items()
                       if k in self.store.fields})
        self.store.write(self.rows, values)
        self._other = {k: values[k] for k in self._other}
        if ahead is not None and self._ahead_rows is not None and self.rows.numel():
            piece = row_sets.rows_piece(max(v[:1].nbytes for v in ahead.values()))   # rows gathered per piece
            for a, pos, found in row_sets.lookup(self.rows, self._ahead_rows, piece):
                hit = found.nonzero().flatten()
                for name in ahead:
                    ahead[name].index_copy_(0, hit.add(a), values[name].index_select(0, pos.index_select(0, hit))
                                            .to(ahead[name].dtype))
        self.store.release()
        self.stats["write_s"] += time.perf_counter() - t0

    def reset(self) -> None:
        """Forget the resident and prefetched rows (the store was rewritten, e.g. by a checkpoint load)."""
        self._settle()
        self._ahead, self._ahead_rows, self._other, self._spare = None, None, {}, None
        self.rows = torch.empty(0, dtype=torch.long)
        self.weight.data = self.weight.data.new_empty((0, self.weight.shape[1]))
        self.weight.grad = None

    def close(self):
        self._settle()
        self._pool.shutdown(wait=True)
