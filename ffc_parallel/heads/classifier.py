"""``ShardedClassifier``: a margin-softmax classifier whose class centers are split across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed.collectives import PieceLayout, gather_rows
from ..distributed.init import get_rank, get_world_size, init_distributed, launched_world_size
from ..optim.center_store import CenterStore, parse_center_storage
from ..optim import row_sets
from ..optim.row_layout import default_sample_block
from ..optim.centers import CenterTrainer
from .margins import resolve_margin
from .row_loss import CrossEntropy
from ..distributed import streams
from ..distributed.checks import BATCH_FIELDS, BatchSpec, agree_on_config, check_batch
from .soft_targets import SOFT_TARGET_FIELDS, soft_target_fields, soft_target_problems
from .sampling import NEGATIVE_SAMPLING, negative_candidates, sample_rows
from .softmax_ce import (DEFAULT_MEMORY_BUDGET_MB, ChunkPlan, ShardedMarginSoftmaxCE, Targets,
                         chunk_cosines, chunk_rows, stats_dtype)
from .logit_cache import CacheArena
from .walk import LossOptions, Step

_INIT_BLOCK = 1 << 16  # rows drawn per seeded block: the init of a class never depends on sharding
_STATE_MARK = 0xFFC0001  # first value of the head's state_dict marker (get_extra_state)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Global class ids ``[start, stop)`` owned by ``rank``: contiguous blocks, the first
    ``num_classes % world_size`` ranks one class larger."""
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (rank < extra)


def init_class_rows(start: int, stop: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """``N(0, std)`` rows for global classes ``start:stop``, identical whatever the sharding."""
    out = torch.empty(stop - start, dim)
    for block in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1 if stop > start else 0):
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        g = streams.generator(seed, "center_init", block)
        rows = torch.empty(_INIT_BLOCK, dim).normal_(0.0, std, generator=g)
        a, b = max(lo, start), min(hi, stop)
        out[a - start: b - start] = rows[a - lo: b - lo]
    return out


INPUT_CHECK_FIELDS = BATCH_FIELDS + ("k",) + SOFT_TARGET_FIELDS   # integers per rank in the head's input check


class ShardedClassifier(nn.Module):
    """Margin-softmax classifier over ``num_classes`` classes sharded by class across ``group``.

    Rank r holds ``weight[num_local, embedding_dim]``, the centers of global classes
    ``class_range = (start, stop)`` (see :func:`shard_range`). ``forward(local_embeddings[b, D],
    local_labels[b])`` gathers the global batch (``B = sum of b`` over ranks; ``b`` may differ per
    rank) and returns the mean margin-softmax cross-entropy over the GLOBAL batch, identical on every
    rank. Its backward gives ``local_embeddings`` the gradient of that loss for this rank's rows and
    ``weight`` the gradient of this rank's class rows.

    ``forward(..., soft_targets=(classes[b, K], probs[b, K]))`` spreads ``probs`` over extra global
    classes per sample (label smoothing over chosen classes); the label keeps ``1 - probs.sum(1)``
    and is the only target with a margin. The per-sample loss is ``-sum_t q_t log p_t``.

    Args:
        margin: ``"arcface"`` (s=64, m2=0.5), ``"cosface"`` (s=64, m3=0.4), ``None`` (scaled cosine
            softmax) or :class:`~ffc_parallel.CombinedMargin`.
        scale: softmax scale ``s`` for the shorthands and for ``margin=None`` (default 64).
        sample_rate: Partial FC. Below 1, each training step uses every class that is a target in
            the global batch plus uniformly sampled negatives, ``max(P, sample_rate * num_local)``
            rows per rank; other rows get zero gradient. Evaluation mode uses every class. The
            center gradient of the sampled rows is added straight into ``weight.grad`` (nothing else
            is touched once it exists) instead of flowing through autograd, so ``torch.autograd.grad``
            with respect to the weight sees no gradient in that mode.
        filter_threshold: if set, negatives whose cosine exceeds it get logit 0 (interclass
            filtering for noisy labels).
        memory_budget_mb: extra memory the loss may use beyond weights and gradients; sets the
            class chunk and how many chunks are kept for the backward.
        chunk_size: classes per chunk, overriding the budget's choice.
        check_inputs: validate labels, shapes and finiteness (one small all-gather, which the
            uneven-batch gather needs anyway; the NaN scan costs one pass over the embeddings).
        seed: seeds the center init (per global class) and Partial FC sampling (per rank and step).
        gather_pieces: the global batch is all-gathered in this many asynchronous pieces, and the
            head computes on arrived pieces while later ones are in flight (the backward sends the
            embedding gradients back the same way). 1 (default) = one blocking gather. Each extra
            piece costs one more accumulation pass over the center gradient and smaller matrix
            products; on CPU/gloo it did not pay (docs/benchmarks.md). ``head.comm_stats`` reports the
            time the last step spent blocked on these collectives.
        row_loss: how per-sample target log-likelihoods become the loss (default
            :class:`~ffc_parallel.heads.row_loss.CrossEntropy`); see ``heads/row_loss.py``. Class
            weights for it are set per shard with :meth:`set_class_weight`.
        dtype: of the centers (default: torch's default, fp32). Casts of the surrounding module
            (``.half()``, DeepSpeed's bf16/fp16) leave it unchanged; device moves (``.to(device)``)
            move the centers. Embeddings of any floating dtype are accepted.
        center_master_weights: an fp32 master copy of bf16/fp16 centers in their optimizer
            (default: yes for half-precision centers).
        grad_multiplier: factor on the embedding gradient (default: the data-parallel size of the
            DeepSpeed engine training the head, 1 without one). Under torch DDP, which also averages
            the backbone's gradients, pass the world size.
        center_storage: where this rank's rows, their master copy and optimizer state live:
            ``"device"`` (default), ``"host"`` (host memory, pinned for a GPU head) or
            ``"disk:/local/nvme/dir"`` (memory-mapped files in a directory of this rank's own under
            it, removed when the head is freed). Off the device, ``weight`` holds only the rows of
            the current step ``[R, D]``; each step they are read from the store (the next step's
            negatives in the background while this one computes), stepped and written back; the
            head then trains only inside a DeepSpeed engine (whose optimizer its rows follow).
            ``head.store_stats()`` reports rows and bytes moved and the share of reading hidden.
        negative_sampling: ``"uniform"`` negatives (default) or ``"block"``: uniformly chosen runs of
            ``sample_block`` consecutive rows (whole pages per read for a store on disk).
        sample_block: rows per block (default: the rows of 64 KiB of weights).

    The centers ``weight`` are a leaf ``nn.Parameter`` that the module does not register: they are
    not in ``parameters()`` nor ``state_dict()`` (which holds only a marker, so that a state dict
    never silently carries part of a classifier), so DeepSpeed, DDP and optimizers built from
    ``net.parameters()`` never broadcast, average, partition or step them. Inside a model given to
    ``deepspeed.initialize`` the head follows DeepSpeed's optimizer and step decisions (see
    ``optim/centers.py``); save and load it with :func:`ffc_parallel.save_checkpoint` /
    :func:`ffc_parallel.load_checkpoint`. Without DeepSpeed, hand ``head.weight`` to an optimizer.
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin="arcface", scale=None,
                 sample_rate: float = 1.0, filter_threshold: float | None = None, *, group=None,
                 init_std: float = 0.01, seed: int = 0, dtype=None, device=None,
                 memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, chunk_size: int | None = None,
                 check_inputs: bool = True, row_loss=None, gather_pieces: int = 1,
                 center_master_weights: bool | None = None, grad_multiplier: float | None = None,
                 center_storage: str = "device", negative_sampling: str = "uniform",
                 sample_block: int | None = None):
        super().__init__()
        if int(embedding_dim) < 1 or int(num_classes) < 1:
            raise ValueError(f"embedding_dim and num_classes must be >= 1, got {embedding_dim}, {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.embedding_dim, self.num_classes = int(embedding_dim), int(num_classes)
        self.margin = resolve_margin(margin, scale)
        self.sample_rate, self.filter_threshold = float(sample_rate), filter_threshold
        self.group, self.seed, self.check_inputs = group, int(seed), check_inputs
        self.memory_budget_mb, self.chunk_size = memory_budget_mb, chunk_size
        if int(gather_pieces) < 1:
            raise ValueError(f"gather_pieces must be >= 1, got {gather_pieces}")
        self.gather_pieces, self.comm_stats = int(gather_pieces), {}
        self.storage, store_dir = parse_center_storage(center_storage)
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"negative_sampling must be one of {NEGATIVE_SAMPLING}, got {negative_sampling!r}")
        dtype = dtype or torch.get_default_dtype()
        self.negative_sampling = negative_sampling
        self.sample_block = int(sample_block) if sample_block else default_sample_block(int(embedding_dim), dtype.itemsize)
        if self.sample_block < 1:
            raise ValueError(f"sample_block must be >= 1, got {sample_block}")
        if not dist.is_initialized() and launched_world_size() > 1:
            init_distributed()   # launched on several ranks (e.g. before deepspeed.initialize): shard over them
        self.rank, self.world_size = get_rank(group), get_world_size(group)
        self.class_range = shard_range(self.num_classes, self.world_size, self.rank)
        self.num_local = self.class_range[1] - self.class_range[0]
        if device is None:
            backend = dist.get_backend(group) if dist.is_initialized() else "gloo"
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        m = self.margin
        agree_on_config("ffc_parallel.ShardedClassifier", {
            "num_classes": self.num_classes, "embedding_dim": self.embedding_dim, "margin s": float(m.s),
            "margin m1": float(m.m1), "margin m2": float(m.m2), "margin m3": float(m.m3),
            "straight_through": m.straight_through, "sample_rate": self.sample_rate,
            "filter_threshold": filter_threshold, "seed": self.seed, "init_std": float(init_std),
            "dtype": str(dtype), "gather_pieces": self.gather_pieces, "center_storage": self.storage,
            "negative_sampling": negative_sampling, "sample_block": self.sample_block}, group, device)
        store = None
        if self.storage == "device":
            rows = init_class_rows(*self.class_range, self.embedding_dim, init_std, self.seed)
            weight = nn.Parameter(rows.to(device=device, dtype=dtype))
        else:
            store = self._init_store(store_dir, dtype, init_std, center_master_weights, torch.device(device).type == "cuda")
            weight = nn.Parameter(torch.empty(0, self.embedding_dim, device=device, dtype=dtype))
        self.centers = CenterTrainer(self, weight, group, master_weights=center_master_weights,
                                     grad_multiplier=grad_multiplier, store=store)
        self._rows_missing = None  # set when a state_dict without this head's rows was loaded
        self.row_loss = row_loss if row_loss is not None else CrossEntropy()
        self._cache_arena = CacheArena()   # the CPU logit caches' memory, kept from step to step
        # [num_local] or None: weights of own classes. Not in state_dict: it differs per rank and is
        # recomputed from class counts (losses.configure_reweighting) after a resume.
        self.register_buffer("class_weight", None, persistent=False)
        self.sample_step = 0          # Partial FC draws depend on (seed, rank, sample_step)
        self._drawn = None            # (key, candidates) of the last draw (negative_candidates)
        self.last_sampled_rows = None  # local rows used by the last training forward (None: all)

    def _init_store(self, directory, dtype, init_std, master_weights, pin) -> CenterStore:
        """A store of this rank's rows (``center_storage`` host or disk) holding their initial values (and
        the master copy of half-precision centers), written block by block."""
        store = CenterStore(self.storage, self.num_local, directory, pin=pin, label=f"rank{self.rank}")
        store.add("weight", dtype, self.embedding_dim)
        half = dtype in (torch.float16, torch.bfloat16)
        if half and master_weights is not False:
            store.add("master", torch.float32, self.embedding_dim)
        start, stop = self.class_range
        for lo in range(start, stop, _INIT_BLOCK):
            hi = min(lo + _INIT_BLOCK, stop)
            rows = init_class_rows(lo, hi, self.embedding_dim, init_std, self.seed).to(dtype)
            store.write_range(lo - start, {"weight": rows, **({"master": rows.float()} if "master" in store.fields else {})})
        return store

    @property
    def weight(self) -> nn.Parameter:
        """This rank's centers ``[num_local, embedding_dim]`` (global classes ``class_range``); with
        ``center_storage`` off the device, the rows of the current step only (see :meth:`local_rows`)."""
        return self.centers.weight

    @property
    def offloaded(self) -> bool:
        """Whether the rows live off the device (``center_storage`` host or disk)."""
        return self.centers.store is not None

    def local_rows(self, start: int, stop: int) -> torch.Tensor:
        """Local rows ``[start, stop)`` of the centers ``[stop - start, D]`` on the centers' device, wherever
        they are stored (a copy for a store)."""
        if not self.offloaded:
            return self.weight.detach()[start:stop]
        return self.centers.store.read_range(start, stop, ["weight"])["weight"].to(self.weight.device)

    def require_device_rows(self, feature: str) -> None:
        """Raise for ``feature`` that needs the whole shard on the device when the rows are stored off it."""
        if self.offloaded:
            raise ValueError(f"{feature} needs this head's rows on the device, but center_storage="
                             f"{self.storage!r}: use center_storage='device' for it")

    def store_stats(self) -> dict:
        """Off-device storage ({} on the device): store bytes, bytes read and written so far, rows of the
        last step, seconds spent reading ahead (``prefetch_read_s``, in the background), waiting for it,
        reading the rows the prefetch did not have (``sync_read_s``) and writing back (``write_s``);
        ``prefetch_hidden_fraction``: the share of the read-ahead the steps did not wait for;
        ``transfer_hidden_fraction``: the hidden share of all store traffic time."""
        if not self.offloaded:
            return {}
        store, resident = self.centers.store, self.centers.resident
        st = resident.stats
        read, wait = st["prefetch_read_s"], st["prefetch_wait_s"]
        transfer = read + st["sync_read_s"] + st["write_s"]
        return {"tier": self.storage, "store_bytes": store.nbytes, "row_bytes": store.row_bytes,
                "bytes_read": store.bytes_read, "bytes_written": store.bytes_written, **st,
                "prefetch_hidden_fraction": (1.0 - wait / read) if read > 0 else None,
                "transfer_hidden_fraction": (read - wait) / transfer if transfer > 0 else None}

    def _attach_engine(self, view) -> None:  # called by deepspeed_bridge
        self.centers.attach(view)

    def _apply(self, fn, *args, **kwargs):
        """Module casts and moves: the centers follow device moves only (see ``dtype``). ``deepspeed.initialize``
        moves its model, so this also makes the next engine call check that a head is in one engine only."""
        result = super()._apply(fn, *args, **kwargs)
        w = self.centers.weight
        target = fn(torch.empty(0, dtype=w.dtype, device=w.device)).device
        self.centers.move_to(target)
        self.centers.recheck_engine()
        return result

    # ------------------------------------------------------------------ state_dict: a marker, never rows
    def get_extra_state(self) -> torch.Tensor:
        """A marker ``[_STATE_MARK, num_classes, embedding_dim]`` in place of the rows: loading a
        state_dict then tells the head that its rows were not restored. (A tensor: DeepSpeed's
        checkpoint tools expect every state_dict value to be one.)"""
        return torch.tensor([_STATE_MARK, self.num_classes, self.embedding_dim], dtype=torch.long)

    def set_extra_state(self, state) -> None:
        values = torch.as_tensor(state).tolist() if torch.is_tensor(state) else []
        if len(values) != 3 or values[0] != _STATE_MARK:
            raise ValueError("ffc_parallel.ShardedClassifier: the state_dict's entry for this head is not a "
                             "ShardedClassifier's marker")
        if values[1:] != [self.num_classes, self.embedding_dim]:
            raise ValueError(f"ffc_parallel.ShardedClassifier: the state_dict was saved from a head of {values[1]} "
                             f"classes x {values[2]} but this head has {self.num_classes} x {self.embedding_dim}")
        self._rows_missing = ("the module was loaded from a state_dict (e.g. by DeepSpeed's engine.load_checkpoint), "
                              "which never holds a ShardedClassifier's rows (each rank owns other classes): load "
                              "checkpoints with ffc_parallel.load_checkpoint(engine, dir), which restores them")

    def rows_loaded(self) -> None:
        """Called once the rows were restored (by :func:`ffc_parallel.load_checkpoint`)."""
        self._rows_missing = None

    def _check_rows(self) -> None:
        if self._rows_missing is not None:
            raise RuntimeError(f"ffc_parallel.ShardedClassifier (rank {self.rank}): {self._rows_missing}")

    def extra_repr(self) -> str:
        m = self.margin
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
                f"class_range={self.class_range}, margin=(s={m.s}, m1={m.m1}, m2={m.m2}, m3={m.m3}), "
                f"sample_rate={self.sample_rate}, world_size={self.world_size}")

    def set_row_loss(self, row_loss) -> None:
        """Replace the constructor's ``row_loss`` (e.g. :func:`ffc_parallel.losses.configure_reweighting`)."""
        if not callable(row_loss):
            raise TypeError(f"row_loss must be callable (log_p[B], class_weight[B] or None) -> (loss, dloss_dlogp), "
                            f"got {type(row_loss).__name__}")
        self.row_loss = row_loss

    def set_class_weight(self, local_weight: torch.Tensor | None) -> None:
        """Weights ``[num_local]`` of this rank's classes (rows ``class_range``), or None for none.

        The loss sees each sample's label weight ``w_y`` through ``row_loss``; no rank ever holds
        the weights of other ranks' classes.
        """
        if local_weight is not None:
            local_weight = torch.as_tensor(local_weight)
            if local_weight.shape != (self.num_local,):
                raise ValueError(f"class weights must have shape [num_local] = [{self.num_local}] "
                                 f"(this rank's classes {self.class_range}), got {tuple(local_weight.shape)}")
            if not torch.isfinite(local_weight).all() or (local_weight < 0).any():
                raise ValueError("class weights must be finite and non-negative")
            local_weight = local_weight.to(device=self.weight.device, dtype=stats_dtype(self.weight.dtype))
        self.class_weight = local_weight

    # ------------------------------------------------------------------ inputs
    def exchange_inputs(self, embeddings, labels=None, k: int = 0, soft_targets=None) -> list[int]:
        """Validate every rank's inputs with one all-gather (over ``group``); return the per-rank
        batch sizes. Losses built on the head call this first, as ``forward`` does.

        Every rank sees the same table and raises the same ``ValueError`` before any other
        collective, so a bad input on one rank never leaves the others waiting (see
        ``distributed/checks.py``).
        """
        spec = BatchSpec("ffc_parallel.ShardedClassifier", self.embedding_dim, "the head's embedding_dim",
                         label_range=(0, self.num_classes), count_nonfinite=self.check_inputs)
        extra = {"k": int(k), **soft_target_fields(soft_targets, embeddings.shape[0] if embeddings.dim() else -1)}

        def problems(table):
            found = [f"rank {r}: k={f['k']} differs from rank 0's k={table[0]['k']}"
                     for r, f in enumerate(table) if f["k"] != table[0]["k"]]
            found += [p for r, f in enumerate(table)
                      for p in soft_target_problems(r, f, table[0]["soft_k"], self.num_classes)]
            if labels is None and not 1 <= table[0]["k"] <= self.num_classes:
                found.append(f"k must be in [1, {self.num_classes}], got {table[0]['k']}")
            return found

        table = check_batch(spec, embeddings, labels, group=self.group, device=self.weight.device, extra=extra,
                            extra_problems=problems)
        return [f["rows"] for f in table]

    def _gather_normalized(self, embeddings, sizes):
        x = embeddings.to(device=self.weight.device, dtype=self.weight.dtype)
        return F.normalize(gather_rows(x, sizes, self.group), dim=1)

    def _plan(self, batch: int, num_cols: int) -> ChunkPlan:
        elem = torch.finfo(stats_dtype(self.weight.dtype)).bits // 8
        return ChunkPlan.for_budget(batch, num_cols, elem, int(self.memory_budget_mb * 2**20),
                                    self.chunk_size)

    # ------------------------------------------------------------------ classes used this step
    def select_classes(self, target_classes: torch.Tensor):
        """``(rows, cols)`` for global target class ids ``[B, T]`` (column 0: the labels).

        ``rows``: sorted local rows to compute (None = all). ``cols[B, T]``: each target's column among
        them, -1 where another rank owns the class. In training mode with ``sample_rate < 1`` every
        owned target class is kept and uniform negatives are drawn (Partial FC).
        """
        start, stop = self.class_range
        owned = (target_classes >= start) & (target_classes < stop)
        local = (target_classes - start).clamp_(0, max(self.num_local - 1, 0))
        rows = None
        if self.training and self.sample_rate < 1.0:
            positives = local[owned].unique()
            rows = sample_rows(positives, self.negative_candidates(self.sample_step), self.num_sample)
            self.sample_step += 1
            local = torch.searchsorted(rows, local)
        self.last_sampled_rows = rows
        if self.offloaded:
            every = rows is None
            rows = self.centers.activate(torch.arange(self.num_local) if every else rows)
            if every and rows.numel() == self.weight.shape[0]:
                rows = None   # every row resident, in order: the loss walks the weight itself
            if self.training and self.sample_rate < 1.0:
                self.centers.prefetch(row_sets.sorted_copy(self.negative_candidates(self.sample_step)))
        if self.training:
            self.centers.note_rows(rows)
        return rows, torch.where(owned, local, torch.full_like(local, -1))

    @property
    def num_sample(self) -> int:
        """Rows per Partial FC step (at least the step's positives)."""
        return int(self.sample_rate * self.num_local)

    def negative_candidates(self, step: int) -> torch.Tensor:
        """The negative candidates of Partial FC step ``step`` on this rank (random order; a pure function
        of seed, rank and step, so they can be drawn, and their rows read, a step early). The last draw is
        kept: a stored head draws step ``s + 1``'s during step ``s`` (its rows are read ahead) and uses
        them at ``s + 1``."""
        key = (step, self.num_sample, self.negative_sampling, self.sample_block)
        if self._drawn is not None and self._drawn[0] == key:
            return self._drawn[1]
        generator = streams.generator(self.seed, "partial_fc", self.rank, step)
        drawn = negative_candidates(self.num_local, self.num_sample, generator, self.negative_sampling,
                                    self.sample_block)
        self._drawn = (key, drawn)
        return drawn

    def label_weight_part(self, labels: torch.Tensor, label_cols: torch.Tensor):
        """``[B]``: each label's class weight where this rank owns it, else 0 (None without class
        weights); summed over ranks it is every sample's ``w_y``."""
        if self.class_weight is None:
            return None
        local = (labels - self.class_range[0]).clamp(0, max(self.num_local - 1, 0))
        return torch.where(label_cols >= 0, self.class_weight[local], torch.zeros_like(self.class_weight[:1]))

    # ------------------------------------------------------------------ forward / predict
    def prepare_embeddings(self, local_embeddings: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(x, training)``: the embeddings ``[b, D]`` on the centers' device and dtype, with the
        centers' backward attached (gradient multiplier, fp16 overflow check); ``training``: whether
        this call trains (then its center gradient goes straight into ``weight.grad``). Every loss
        computed from the head's centers starts here."""
        self._check_rows()
        training = self.training and torch.is_grad_enabled()
        if training:
            self.centers.begin_forward()
        x = self.centers.gate(local_embeddings) if training else local_embeddings
        return x.to(device=self.weight.device, dtype=self.weight.dtype), training

    def prepare_step(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                     soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> Step:
        """What every chunked loss on the centers needs for one call (collective over ``group``):
        checked inputs, the gather's piece layout, the global batch's targets (labels, soft targets,
        label weights) among the classes used this step, the chunk plan and the loss options (with
        the head's ``row_loss``). The loss then all-gathers the embeddings itself."""
        x, training = self.prepare_embeddings(local_embeddings)
        sizes = self.exchange_inputs(local_embeddings, local_labels, soft_targets=soft_targets)
        device = self.weight.device
        layout = PieceLayout(sizes, self.gather_pieces, self.rank, device) if self.world_size > 1 else None
        classes = local_labels.to(device=device, dtype=torch.long).unsqueeze(1)
        q = None
        if soft_targets is not None:
            extra, probs = (t.to(device) for t in soft_targets)
            classes = torch.cat([classes, extra.long()], dim=1)
            probs = probs.to(stats_dtype(self.weight.dtype))
            q = torch.cat([1.0 - probs.sum(dim=1, keepdim=True), probs], dim=1)
            q = gather_rows(q, sizes, self.group)
        classes = gather_rows(classes, sizes, self.group)
        rows, cols = self.select_classes(classes)
        targets = Targets(cols, q, self.label_weight_part(classes[:, 0], cols[:, 0]))
        plan = self._plan(sum(sizes), self.num_local if rows is None else rows.numel())
        record = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        spare = self.centers.take_spare_grad()   # dropped by a forward that writes no center gradient
        options = LossOptions(self.margin, self.filter_threshold, plan, self.group, self.row_loss, layout,
                              self.comm_stats, accumulate=training, record=record, cache_arena=self._cache_arena,
                              grad_buffer=spare if training and record and self.weight.requires_grad else None)
        return Step(x, rows, targets, options)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean margin-softmax cross-entropy over the global batch (a scalar, same on every rank).

        ``local_embeddings[b, D]``, ``local_labels[b]`` int; optional ``soft_targets`` =
        ``(classes[b, K] int, probs[b, K])``: see the class docstring.
        """
        step = self.prepare_step(local_embeddings, local_labels, soft_targets)
        return ShardedMarginSoftmaxCE.apply(step.x, self.weight, step.rows, step.targets, step.options)

    @torch.no_grad()
    def predict(self, local_embeddings: torch.Tensor, k: int = 1):
        """Distributed top-k over all classes by cosine: ``(scores[b, k], class_ids[b, k])``."""
        self._check_rows()
        sizes = self.exchange_inputs(local_embeddings, None, k=int(k))
        xn = self._gather_normalized(local_embeddings, sizes)
        batch, sdt = xn.shape[0], stats_dtype(xn.dtype)
        best = torch.full((batch, k), -float("inf"), dtype=sdt, device=xn.device)
        best_ids = torch.full((batch, k), -1, dtype=torch.long, device=xn.device)
        chunk = self._plan(batch, self.num_local).chunk
        for start in range(0, self.num_local, chunk):
            stop = min(start + chunk, self.num_local)
            cos = chunk_cosines(xn, *chunk_rows(self.local_rows(start, stop), None, 0, stop - start, sdt))
            ids = torch.arange(start, stop, device=xn.device).expand(batch, -1)
            best, pick = torch.cat([best, cos], 1).topk(k, dim=1)
            best_ids = torch.cat([best_ids, ids], 1).gather(1, pick)
        best_ids = torch.where(best_ids >= 0, best_ids + self.class_range[0], best_ids)
        scores = gather_rows(best.t().contiguous(), [k] * self.world_size, self.group)  # [W*k, B]
        ids = gather_rows(best_ids.t().contiguous(), [k] * self.world_size, self.group)
        top, pick = scores.t().topk(k, dim=1)
        offset = sum(sizes[: self.rank])
        rows = slice(offset, offset + sizes[self.rank])
        return top[rows].to(self.weight.dtype), ids.t().gather(1, pick)[rows]
