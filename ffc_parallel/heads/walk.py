"""One call of a chunked loss over the head's centers: what such a loss takes, and its walk over the
global batch (gather pieces) and the used classes (tiles), written once for every loss.

A loss plugs its per-tile math into the walk:

    walk = TileWalk.start(x_local, weight, rows, targets, options)
    for piece in walk.gather(x_local):              # normalised rows of the global batch as they arrive
        for tile in walk.tiles(piece):              # scaled rows v of the tile's classes, its targets
            label_cos, mask = walk.logits(z, piece, tile)   # base-2 logits, margin, filter
            ...                                     # the loss's row statistics of the tile

    center = walk.center_gradient(borrow)           # backward, from the saved batch
    for piece in walk.pieces_again(want_x):
        for tile in walk.tiles(piece):
            ...                                     # G = d loss / d logit of the tile
            walk.add_grads(piece, tile, G, center)
        walk.send_embedding_grad(piece)             # reduce-scattered while the next piece runs
    return walk.embedding_grad(), center.finish()

The embeddings' gradient is summed over ranks (every rank holds a part of every sample's loss); the
center gradient goes into ``weight.grad`` in the head's training mode (:class:`CenterGradient`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.collectives import CommTimer, PieceLayout, ReduceScatterPieces, all_gather_pieces
from .chunking import ChunkPlan, TileTargets, stats_dtype, tiles
from .borrowed_grad import gradient_buffer
from .logit_cache import CacheArena
from .margins import CombinedMargin
from .row_loss import RowLoss
from .stages import (LN2, LOG2E, center_grad_, embedding_grad_, margin_and_filter_, normalized, scaled_rows_,
                     tile_logits_)


@dataclass
class Targets:
    """What each sample of the global batch is scored against (tensors on the weight's device).

    cols: ``[B, T]`` column of each target among the used local rows, -1 where another rank owns the
        class. Column 0 is the sample's label, the only target that gets the margin.
    q: ``[B, T]`` target probabilities (each row sums to 1), or None for ``T = 1``, ``q = 1``.
    class_weight_part: ``[B]`` the label's class weight where this rank owns the label, 0 elsewhere
        (summed over ranks into ``w_y``), or None for unit weights.
    """

    cols: torch.Tensor
    q: torch.Tensor | None = None
    class_weight_part: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOptions:
    """The non-tensor arguments of one call of a chunked loss.

    margin, filter_threshold: the head's logits (:class:`~ffc_parallel.heads.margins.CombinedMargin`,
        interclass filter or None). plan: a :class:`~ffc_parallel.heads.chunking.ChunkPlan`.
    group: the process group the classes are sharded over.
    row_loss: a :class:`~ffc_parallel.heads.row_loss.RowLoss`, ``(l[B], w_y[B]) -> (loss, dloss/dl)``.
    layout: a :class:`~ffc_parallel.distributed.collectives.PieceLayout` (None: one process).
    comm_stats: a dict that receives the forward/backward :class:`CommTimer` summaries (or None).
    accumulate: add the center gradient straight into ``weight.grad`` (set if None) instead of
        returning it through autograd (the head's training mode): with Partial FC rows only those
        rows are written, so a step costs O(rows) once ``weight.grad`` exists (the centers' trainer
        zeroes only the touched rows after its step), and the gradient is complete when the backward
        returns (the fp16 overflow check reads it).
    record: whether the caller records a graph for a backward (grad mode on and an input requiring
        grad); without, the forward keeps nothing for one.
    cache_arena: the head's :class:`~ffc_parallel.heads.logit_cache.CacheArena` for its CPU logit
        caches (None: each cache allocates its tiles).
    grad_buffer: a released center gradient of an earlier step (``CenterTrainer.take_spare_grad``) that
        a new ``weight.grad`` may be a view of when it is large enough (None: a new buffer).
    """

    margin: CombinedMargin
    filter_threshold: float | None
    plan: ChunkPlan
    group: object
    row_loss: RowLoss
    layout: PieceLayout | None = None
    comm_stats: dict | None = None
    accumulate: bool = False
    record: bool = True
    cache_arena: CacheArena | None = None
    grad_buffer: torch.Tensor | None = None


@dataclass(frozen=True)
class Step:
    """One call's inputs of a loss on the head's centers (``ShardedClassifier.prepare_step``):
    ``x[b, D]`` the local embeddings on the centers' device and dtype, ``rows[S]`` the sorted local
    rows used (Partial FC) or None for all, the :class:`Targets` of the global batch, the options."""

    x: torch.Tensor
    rows: torch.Tensor | None
    targets: Targets
    options: LossOptions


@dataclass
class Piece:
    """Rows of the global batch that travel together: ``rows[n]`` (global, rank-major), their
    normalised embeddings ``xn[n, D]``, their targets by tile, and ``grad_xn[n, D]`` (stats dtype)
    in a backward that wants the embeddings' gradient."""

    number: int
    rows: torch.Tensor
    xn: torch.Tensor
    targets: TileTargets
    grad_xn: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.xn.shape[0]


@dataclass
class Tile:
    """Used classes ``start:stop`` (tile ``index``): scaled rows ``v[k, D]`` and the piece's target
    entries inside, ``hit = (rows, cols - start, t)`` or None."""

    index: int
    start: int
    stop: int
    v: torch.Tensor
    hit: tuple | None


class _TileBuffer:
    """One flat buffer of ``n * width`` elements (``n`` the largest piece so far) that ``[n, k]`` tiles view."""

    def __init__(self, dtype, device, width: int):
        self.dtype, self.device, self.width = dtype, device, width
        self.flat = torch.empty(0, dtype=dtype, device=device)

    def view(self, n: int, k: int) -> torch.Tensor:
        if self.flat.numel() < n * k:
            self.flat = torch.empty(n * self.width, dtype=self.dtype, device=self.device)
        return self.flat[: n * k].view(n, k)


class TileWalk:
    """The walk of one call: the global batch ``xn[B, D]``, ``norms[B, 1]``, ``scale[num_cols] =
    sigma / |w|`` of the used classes, tiles of ``width`` classes (default: the plan's compute tile)
    and the buffers reused over them. Build it with :meth:`start` in a forward and from the saved
    tensors in a backward."""

    def __init__(self, weight, rows, targets: Targets, options: LossOptions, xn, norms, scale,
                 width: int | None = None, forward: bool = False):
        self.weight, self.rows, self.targets, self.options = weight, rows, targets, options
        self.xn, self.norms, self.scale, self.sdt, self.forward = xn, norms, scale, scale.dtype, forward
        self.batch, self.num_cols = xn.shape[0], scale.numel()
        self.width = width or options.plan.tile(self.batch, torch.finfo(self.sdt).bits // 8, xn.device.type)
        self.spans = tiles(self.num_cols, self.width)
        self.edges = [start for start, _ in self.spans] + [self.num_cols]
        layout = options.layout
        one_piece = layout is None or layout.pieces == 1
        self.direct = rows is None and one_piece  # one pass over all classes
        # each row's gradient is written once: also when ``rows`` are every row of the weight (sorted, so
        # 0..n-1: a stored head's resident rows), with no index_add_ into a zeroed gradient
        self.writes_once = (rows is None or rows.numel() == weight.shape[0]) and one_piece
        self.v_buf = weight.new_empty((min(self.width, self.num_cols), weight.shape[1]))
        # half centers: the forward's norms go through a stats-dtype tile; the half products copied into
        # stats-dtype tiles and the backward's d loss / d logit cast back go through a half tile (_narrow)
        half = weight.dtype != self.sdt
        self.wide_buf = torch.empty(self.v_buf.shape, dtype=self.sdt, device=xn.device) if half and forward else None
        self._narrow = _TileBuffer(xn.dtype, xn.device, self.width)
        self._work = _TileBuffer(self.sdt, xn.device, self.width)
        self.timer, self._scatter, self._grad_x, self._want_x = CommTimer(), None, None, False

    @classmethod
    def start(cls, x_local, weight, rows, targets, options, width=None) -> "TileWalk":
        """A forward's walk; :meth:`gather` fills its batch and the forward's first piece its scales."""
        batch = x_local.shape[0] if options.layout is None else sum(options.layout.sizes)
        num_cols = weight.shape[0] if rows is None else rows.numel()
        xn = x_local.new_empty((batch, x_local.shape[1]))
        norms = torch.empty(batch, 1, dtype=x_local.dtype, device=x_local.device)
        scale = torch.empty(num_cols, dtype=stats_dtype(x_local.dtype), device=x_local.device)
        return cls(weight, rows, targets, options, xn, norms, scale, width, forward=True)

    def _piece(self, number, rows, xn_p, grad_xn=None) -> Piece:
        return Piece(number, rows, xn_p, TileTargets(self.targets.cols.index_select(0, rows), self.edges), grad_xn)

    def gather(self, x_local):
        """Yield the global batch as it arrives (``x_local[b, D]`` all-gathered over the group in the
        layout's pieces, all issued at once), each :class:`Piece` normalised and kept in ``xn``."""
        layout = self.options.layout
        pieces = ([(0, x_local, torch.arange(self.batch, device=x_local.device))] if layout is None
                  else all_gather_pieces(x_local, layout, self.options.group, self.timer))
        for number, x_p, rows in pieces:
            xn_p, norms_p = normalized(x_p)
            self.xn[rows], self.norms[rows] = xn_p, norms_p
            yield self._piece(number, rows, xn_p)

    def pieces_again(self, want_x: bool):
        """A backward's pieces, in the forward's order, from the saved batch (``grad_xn`` zeroed when
        ``want_x``)."""
        layout, self._want_x = self.options.layout, want_x
        if layout is not None:
            self._scatter = ReduceScatterPieces(layout, self.xn, self.options.group, self.timer)
        for number in range(1 if layout is None else layout.pieces):
            rows = torch.arange(self.batch, device=self.xn.device) if layout is None else layout.rows(number)[1]
            xn_p = self.xn.index_select(0, rows)
            grad_xn = torch.zeros(xn_p.shape, dtype=self.sdt, device=xn_p.device) if want_x else None
            yield self._piece(number, rows, xn_p, grad_xn)

    def tiles(self, piece: Piece):
        """Yield the piece's tiles in order; the forward's first piece also sets their scales."""
        sigma, fresh = self.options.margin.s * LOG2E, self.forward and piece.number == 0
        for index, (start, stop) in enumerate(self.spans):
            v = scaled_rows_(self.weight, self.rows, start, stop, self.scale, self.v_buf, fresh, sigma, self.wide_buf)
            yield Tile(index, start, stop, v, piece.targets.tile(index, start))

    def work(self, piece: Piece, tile: Tile) -> torch.Tensor:
        """A ``[n, k]`` view of the call's stats buffer (``n * width`` elements, reused)."""
        return self._work.view(piece.n, tile.stop - tile.start)

    def logits(self, out, piece: Piece, tile: Tile):
        """The tile's base-2 logits into ``out[n, k]`` with the margin and the filter: ``(label_cos,
        mask)`` of :func:`~ffc_parallel.heads.stages.margin_and_filter_`."""
        tile_logits_(out, piece.xn, tile.v, None if out.dtype == piece.xn.dtype else self._narrow_tile(out))
        return margin_and_filter_(out, tile.hit, self.options.margin, self.options.filter_threshold)

    def center_gradient(self, borrow=None) -> "CenterGradient":
        """The writer of this backward's center gradient (``borrow``: the buffer the cache borrowed)."""
        return CenterGradient(self.weight, self.rows, self.scale, self.options.margin.s, self.width, self.writes_once,
                              self.weight if self.options.accumulate else None, borrow, self.options.grad_buffer)

    def add_grads(self, piece: Piece, tile: Tile, grad, center: "CenterGradient | None") -> None:
        """Add the tile's ``grad[n, k] = d loss / d logit`` into ``d xn`` (``ln2 G v``: ``logit = ln2 *
        xn . v``) and into the center gradient (``center``, None when not wanted)."""
        g = grad if grad.dtype == self.xn.dtype else self._cast_tile(grad)
        if piece.grad_xn is not None and g.dtype == self.sdt:
            piece.grad_xn.addmm_(g, tile.v, alpha=LN2)
        elif piece.grad_xn is not None:
            piece.grad_xn.add_(torch.mm(g, tile.v), alpha=LN2)
        if center is not None:
            center.add(tile, g, piece.xn)

    def _narrow_tile(self, like):
        """An ``[n, k]`` buffer shaped like ``like`` in the embeddings' dtype, kept over the call's tiles."""
        return self._narrow.view(*like.shape)

    def _cast_tile(self, grad):
        """``grad[n, k]`` in the embeddings' dtype, in the buffer of :meth:`_narrow_tile`."""
        return self._narrow_tile(grad).copy_(grad)

    def send_embedding_grad(self, piece: Piece) -> None:
        """The piece's ``d loss / d x`` through the normalisation, reduce-scattered (summed over ranks)
        back to the ranks its rows came from while the next piece is computed."""
        if piece.grad_xn is None:
            return
        grad_x = embedding_grad_(piece.grad_xn, piece.xn, self.norms.index_select(0, piece.rows)).to(self.xn.dtype)
        if self._scatter is None:
            self._grad_x = grad_x
        else:
            self._scatter.submit(piece.number, grad_x)

    def embedding_grad(self) -> torch.Tensor | None:
        """``d loss / d x_local[b, D]`` of this rank's rows (None when not wanted)."""
        return self._scatter.finish() if self._scatter is not None and self._want_x else self._grad_x

    def report(self, phase: str) -> None:
        """Record the phase's collectives in ``options.comm_stats``."""
        if self.options.comm_stats is not None:
            self.options.comm_stats[phase] = self.timer.summary()


class CenterGradient:
    """How a backward writes ``d loss / d weight`` tile by tile, the same for every chunked loss.

    With ``param`` (the weight, in the head's training mode) the gradient goes into ``param.grad``:
    added in place where that exists, Partial FC rows added into zeros where it does not, else a
    buffer of its own becomes it; without, it is returned through autograd. With one pass over all
    classes, or over every row of the weight (``direct``), each tile's rows are written once, in place,
    into a buffer never zero-filled; otherwise tiles (or ``rows``) are added. ``borrow``: the buffer the
    logit cache borrowed (``borrowed_grad.py``), which becomes the gradient. ``spare``: a released
    gradient buffer a new one may be a view of (with ``param`` only: autograd would copy it).
    """

    def __init__(self, weight, rows, scale, s, width, direct, param, borrow, spare=None):
        self.rows, self.scale, self.s, self.param, self.direct = rows, scale, s, param, direct
        self.every_row = rows is not None and rows.numel() == weight.shape[0]   # sorted unique: 0..n-1
        buffer = borrow.hand_over() if borrow is not None else None
        self.borrow = borrow if buffer is not None else None
        if param is not None and param.grad is not None and buffer is None:
            self.grad, self.direct = param.grad, False              # add into the gradient there is
        elif param is not None and rows is not None and not direct:  # Partial FC: rows into a zero gradient
            param.grad = self.grad = gradient_buffer(param, True, spare)
        elif buffer is not None:
            self.grad = buffer                                       # holds cache entries until they are used
        else:
            self.grad = gradient_buffer(weight, not direct, spare if param is not None else None)
        width = min(width, scale.numel())
        self.tmp, self.h_buf = weight.new_empty((width, weight.shape[1])), weight.new_empty((width, weight.shape[1]))
        self.wide = torch.empty((width, weight.shape[1]), dtype=scale.dtype, device=weight.device) \
            if weight.dtype != scale.dtype else None

    def add(self, tile: Tile, g, xn_p) -> None:
        """The tile's center gradient from ``g[n, k] = d loss / d logit`` and ``xn_p[n, D]``."""
        start, stop = tile.start, tile.stop
        overlapped = self.borrow is not None and self.borrow.overlaps(start, stop)   # by its own cache entry
        h = self.grad[start:stop] if self.direct and not overlapped else self.h_buf[: stop - start]
        center_grad_(torch.mm(g.t(), xn_p, out=h), tile.v, self.scale[start:stop], self.s, self.tmp, self.wide)
        if self.rows is not None and not self.every_row:
            self.grad.index_add_(0, self.rows[start:stop], h)
        elif overlapped:
            self.grad[start:stop] = h
        elif not self.direct:
            self.grad[start:stop] += h

    def finish(self) -> torch.Tensor | None:
        """The weight's gradient for autograd: None where it went into ``weight.grad``."""
        if self.param is None:
            return self.grad
        if self.grad is not self.param.grad:     # a buffer of our own: becomes or joins it
            if self.param.grad is None:
                self.param.grad = self.grad
            else:
                self.param.grad.add_(self.grad)
        return None
