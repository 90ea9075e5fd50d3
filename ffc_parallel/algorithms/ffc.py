"""FFC (Faster Face Classification, CVPR 2022): a dynamic class pool of gallery features replaces the
``[num_identities, D]`` classifier, so memory does not grow with the number of identities.

Pieces (see ``docs/ffc.md`` for the math and the exact pool update rule):

* :class:`ClassPool`: ``pool_size`` slots of gallery features, SHARDED BY SLOT across ``group``
  (rank r holds slots ``shard_range(pool_size, W, r)``), an identity -> slot map kept as sorted
  arrays of this rank's slots, and least-recently-used eviction agreed by all ranks. No tensor is
  ever sized by the number of identities; identity ids may be any int64 >= 0.
* :func:`pool_loss`: existing identities (in the pool) get a margin softmax over every filled slot;
  fresh identities get the mean of their top-k cosines to the pool as a penalty.
* :class:`FFC`: probe network (trained) + gallery network (EMA of the probe, no gradients) + pool;
  ``forward(inputs, labels) -> loss`` like :class:`~ffc_parallel.HybridModel`.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..deepspeed_bridge import GradientSum, partitioned
from ..distributed.checks import BatchSpec, agree_on_config, check_batch, guard_norm_statistics
from ..distributed.collectives import all_gather_table, all_reduce_, gather_rows, sum_over_ranks
from ..distributed.init import get_rank, get_world_size
from ..distributed.lockstep import lockstep
from ..heads.margins import resolve_margin
from ..heads.classifier import shard_range

_NEVER = -1  # stamp of a slot that was never written: evicted first


class ClassPool(nn.Module):
    """``pool_size`` slots of unit-norm gallery features with identity -> slot map and LRU eviction.

    Sharded by slot over ``group``: this rank holds global slots ``slot_range = (start, stop)`` as
    buffers ``features[n, D]``, ``ids[n]`` (identity or -1 = empty) and ``stamps[n]`` (update step
    of the last use, -1 = never). Every method taking a batch expects the GLOBAL batch (identical on
    every rank) and is a collective over ``group``.
    """

    def __init__(self, pool_size: int, embedding_dim: int, *, refresh_momentum: float = 0.5,
                 group=None, device=None, dtype=torch.float32):
        super().__init__()
        if int(pool_size) < 1 or int(embedding_dim) < 1:
            raise ValueError(f"pool_size and embedding_dim must be >= 1, got {pool_size}, {embedding_dim}")
        if not 0.0 <= refresh_momentum < 1.0:
            raise ValueError(f"refresh_momentum must be in [0, 1), got {refresh_momentum}")
        self.pool_size, self.embedding_dim = int(pool_size), int(embedding_dim)
        self.refresh_momentum, self.group = float(refresh_momentum), group
        self.rank, self.world_size = get_rank(group), get_world_size(group)
        agree_on_config("ffc_parallel.ClassPool", {"pool_size": self.pool_size, "embedding_dim": self.embedding_dim,
                                                    "refresh_momentum": self.refresh_momentum}, group, device)
        self.slot_range = shard_range(self.pool_size, self.world_size, self.rank)
        n = self.slot_range[1] - self.slot_range[0]
        self.register_buffer("features", torch.zeros(n, self.embedding_dim, device=device, dtype=dtype))
        self.register_buffer("ids", torch.full((n,), -1, dtype=torch.long, device=device))
        self.register_buffer("stamps", torch.full((n,), _NEVER, dtype=torch.long, device=device))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long, device=device))
        self._rebuild_index()

    def extra_repr(self) -> str:
        return (f"pool_size={self.pool_size}, embedding_dim={self.embedding_dim}, "
                f"slot_range={self.slot_range}, refresh_momentum={self.refresh_momentum}")

    # ------------------------------------------------------------------ identity -> slot
    def _rebuild_index(self) -> None:
        filled = (self.ids >= 0).nonzero().squeeze(1)
        ids, order = self.ids[filled].sort()
        self._index_ids, self._index_slots = ids, filled[order]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._rebuild_index()

    def local_lookup(self, identities: torch.Tensor) -> torch.Tensor:
        """Local slot of each identity held by THIS rank, -1 elsewhere; ``[n]`` -> ``[n]``."""
        if self._index_ids.numel() == 0:
            return torch.full_like(identities, -1)
        pos = torch.searchsorted(self._index_ids, identities).clamp_(max=self._index_ids.numel() - 1)
        hit = self._index_ids[pos] == identities
        return torch.where(hit, self._index_slots[pos], torch.full_like(identities, -1))

    def lookup(self, identities: torch.Tensor) -> torch.Tensor:
        """Global slot of each identity, -1 when it is not in the pool (collective, one all-reduce).

        ``identities[n]`` int64 must be the same on every rank.
        """
        local = self.local_lookup(identities)
        slots = torch.where(local >= 0, local + self.slot_range[0], local)
        return all_reduce_(slots, op=dist.ReduceOp.MAX, group=self.group)

    def filled(self):
        """``(features[n_f, D], global_slots[n_f])`` of this rank's filled slots (a copy, ascending slots)."""
        local = (self.ids >= 0).nonzero().squeeze(1)
        return self.features.index_select(0, local), local + self.slot_range[0]

    def num_filled(self) -> int:
        """Filled slots over all ranks (collective)."""
        count = torch.tensor([int((self.ids >= 0).sum())], device=self.ids.device)
        return int(all_reduce_(count, group=self.group))

    # ------------------------------------------------------------------ update
    def _least_recently_used(self, count: int, now: int) -> torch.Tensor:
        """The ``count`` global slots with the smallest ``(stamp, slot)`` among slots not used at step
        ``now``, ascending; agreed by every rank with one all-gather of ``count`` keys per rank."""
        if count == 0:
            return torch.empty(0, dtype=torch.long, device=self.ids.device)
        start = self.slot_range[0]
        local_slots = torch.arange(self.ids.numel(), device=self.ids.device)
        keys = (self.stamps + 1) * self.pool_size + (local_slots + start)  # unique, orders (stamp, slot)
        keys = keys[self.stamps < now]
        take = min(count, keys.numel())
        best = keys.topk(take, largest=False).values if take else keys
        padded = torch.full((count,), torch.iinfo(torch.long).max, dtype=torch.long, device=keys.device)
        padded[:take] = best
        candidates = all_gather_table(padded, self.group).flatten()
        chosen = candidates.topk(count, largest=False).values.sort().values
        return chosen % self.pool_size

    @torch.no_grad()
    def update(self, features: torch.Tensor, identities: torch.Tensor) -> dict:
        """Apply the pool update rule for one step's global batch (collective).

        ``features[B, D]`` gallery features and ``identities[B]`` int64, identical on every rank.
        Per identity u of the batch, ``g_u`` = normalised mean of its features. Existing u (slot s):
        ``f_s <- normalize(m * f_s + (1 - m) * g_u)`` with ``m = refresh_momentum``. Fresh u, in order
        of first appearance in the batch: takes the least-recently-used slot not used this step
        (empty slots first, ties by lower slot), ``f_s <- g_u``. Every identity of the batch gets the
        stamp of this step. If more fresh identities arrive than slots are free of this step's
        identities, the later ones are dropped (reported as ``dropped``).
        """
        if features.dim() != 2 or features.shape[1] != self.embedding_dim or identities.shape != features.shape[:1]:
            raise ValueError(f"ClassPool.update: expected features [B, {self.embedding_dim}] and identities [B], "
                             f"got {tuple(features.shape)} and {tuple(identities.shape)}")
        identities = identities.to(device=self.ids.device, dtype=torch.long)
        if identities.numel() and int(identities.min()) < 0:
            raise ValueError("ClassPool.update: identities must be >= 0 (-1 marks an empty slot)")
        self.clock += 1
        now = int(self.clock)
        unique, inverse = identities.unique(return_inverse=True)
        sums = features.new_zeros(unique.numel(), self.embedding_dim, dtype=self.features.dtype)
        sums.index_add_(0, inverse, features.to(self.features.dtype))
        means = F.normalize(sums, dim=1)
        first_seen = torch.full((unique.numel(),), identities.numel(), dtype=torch.long, device=identities.device)
        first_seen.scatter_reduce_(0, inverse, torch.arange(identities.numel(), device=identities.device), "amin")
        slots = self.lookup(unique)
        start, stop = self.slot_range

        existing = slots >= 0
        mine = existing & (slots >= start) & (slots < stop)
        rows = slots[mine] - start
        m = self.refresh_momentum
        self.features[rows] = F.normalize(m * self.features[rows] + (1 - m) * means[mine], dim=1)
        self.stamps[rows] = now

        fresh = (~existing).nonzero().squeeze(1)
        fresh = fresh[first_seen[fresh].argsort()]
        room = self.pool_size - int(existing.sum())
        dropped = max(0, fresh.numel() - room)
        fresh = fresh[:room]
        victims = self._least_recently_used(fresh.numel(), now)
        evicted = 0
        take = (victims >= start) & (victims < stop)
        if take.any():
            rows, who = victims[take] - start, fresh[take]
            evicted = int((self.ids[rows] >= 0).sum())
            self.ids[rows] = unique[who]
            self.features[rows] = means[who]
            self.stamps[rows] = now
        self._rebuild_index()
        return {"refreshed": int(existing.sum()), "inserted": int(fresh.numel()), "dropped": dropped,
                "evicted_here": evicted}

    # ------------------------------------------------------------------ whole-pool views
    @torch.no_grad()
    def full_state(self) -> dict:
        """Every rank's slots assembled in slot order (collective): ``features[P, D]``, ``ids[P]``,
        ``stamps[P]``, ``clock``. For tests, inspection and resharding; costs ``P * D`` memory."""
        sizes = [shard_range(self.pool_size, self.world_size, r)[1] - shard_range(self.pool_size, self.world_size, r)[0]
                 for r in range(self.world_size)]
        return {"features": gather_rows(self.features, sizes, self.group),
                "ids": gather_rows(self.ids, sizes, self.group),
                "stamps": gather_rows(self.stamps, sizes, self.group), "clock": self.clock.clone()}

    @torch.no_grad()
    def load_full_state(self, state: dict) -> None:
        """Take this rank's slots from a :meth:`full_state` of a pool of the same size saved on any
        number of ranks (resharding)."""
        if state["ids"].shape != (self.pool_size,) or state["features"].shape != (self.pool_size, self.embedding_dim):
            raise ValueError(f"ClassPool.load_full_state: state is for a pool of {tuple(state['features'].shape)}, "
                             f"this pool is [{self.pool_size}, {self.embedding_dim}]")
        start, stop = self.slot_range
        self.features.copy_(state["features"][start:stop])
        self.ids.copy_(state["ids"][start:stop])
        self.stamps.copy_(state["stamps"][start:stop])
        self.clock.copy_(state["clock"])
        self._rebuild_index()


def pool_loss(probe: torch.Tensor, slots: torch.Tensor, pool: ClassPool, margin, topk: int = 5,
              fresh_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """FFC loss of a global batch against a slot-sharded pool; identical on every rank.

    ``probe[B, D]``: unit-norm probe features of the global batch (differentiable); ``slots[B]``:
    each sample's global pool slot or -1 (from :meth:`ClassPool.lookup`); ``margin``: a
    :class:`~ffc_parallel.CombinedMargin`. With ``cos_bj`` the cosine to filled slot j:

    * existing b (slot y_b): ``CE_b = logsumexp_j(s cos_bj, target s f(cos_by)) - s f(cos_by)`` over
      every filled slot of every rank;
    * fresh b: ``R_b = mean of the k largest cos_bj`` over the pool (``k = min(topk, filled)``).

    ``loss = (sum_existing CE_b + fresh_weight * sum_fresh R_b) / B``. Each rank computes the part of
    every sum that involves its own slots; the backward returns this rank's part of ``d loss / d
    probe``, which the embedding gather sums over ranks.
    """
    group, device = pool.group, probe.device
    batch = probe.shape[0]
    feats, filled_slots = pool.filled()
    feats = feats.to(device=device, dtype=probe.dtype)
    cos = (probe @ feats.t()).clamp(-1.0, 1.0)                                     # [B, n_f]
    existing = slots >= 0
    col = torch.searchsorted(filled_slots, slots.clamp_min(0)).clamp_(max=max(filled_slots.numel() - 1, 0))
    owned = existing & (filled_slots.numel() > 0)
    if filled_slots.numel():
        owned = owned & (filled_slots[col] == slots)
    rows = torch.arange(batch, device=device)
    target_cos = cos[rows, col] if filled_slots.numel() else probe.new_zeros(batch)
    target = margin.s * _margin_target(margin, target_cos)
    logits = margin.s * cos
    is_target = torch.zeros_like(cos, dtype=torch.bool)
    is_target[rows[owned], col[owned]] = True
    logits = torch.where(is_target, target.unsqueeze(1).expand_as(logits), logits)

    row_max = logits.detach().max(dim=1).values if cos.shape[1] else probe.new_full((batch,), -float("inf"))
    row_max = all_reduce_(row_max.clone(), op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sum_exp = sum_over_ranks(torch.exp(logits - shift.unsqueeze(1)).sum(dim=1), group)
    target_logit = sum_over_ranks(torch.where(owned, target, torch.zeros_like(target)), group)
    ce = shift + torch.log(sum_exp.clamp_min(torch.finfo(sum_exp.dtype).tiny)) - target_logit

    penalty, k_eff = _topk_similarity(cos, ~existing, topk, group)
    total = probe.sum() * 0.0  # keeps the graph connected when the pool is empty
    total = total + torch.where(existing, ce, torch.zeros_like(ce)).sum()
    total = total + fresh_weight * torch.where(~existing, penalty, torch.zeros_like(penalty)).sum()
    stats = {"existing": int(existing.sum()), "fresh": int((~existing).sum()), "topk": k_eff}
    return total / max(batch, 1), stats


def _margin_target(margin, cos: torch.Tensor) -> torch.Tensor:
    """``f(cos)`` with the margin's own derivative ``f'(cos)`` (``sin θ`` floored, as the sharded
    head does): autograd through ``acos`` would give NaN at ``cos = 1``, which happens when a probe
    feature equals its pool feature (early in training the gallery equals the probe)."""
    c = cos.detach()
    return margin.target(c) + margin.target_grad(c) * (cos - c)


def _topk_similarity(cos: torch.Tensor, rows: torch.Tensor, topk: int, group):
    """Mean of the ``k`` largest cosines per sample over every rank's slots, ``[B]`` (rows not in
    ``rows`` get 0), and ``k`` itself. Exact global top-k: local top-k candidates are all-gathered,
    every rank picks the same global top-k and sums the values of the ones it holds."""
    batch, local = cos.shape
    total_filled = int(all_reduce_(torch.tensor([local], device=cos.device), group=group))
    k = min(int(topk), total_filled)
    if k == 0:
        return cos.new_zeros(batch), 0
    take = min(k, local)
    values = cos.topk(take, dim=1).values if take else cos.new_zeros(batch, 0)
    padded = cos.new_full((batch, k), -float("inf"))
    padded[:, :take] = values.detach()
    world, rank = get_world_size(group), get_rank(group)
    everyone = gather_rows(padded.t().contiguous(), [k] * world, group).t()    # [B, W*k], rank-major
    picked = everyone.topk(k, dim=1).indices
    chosen = torch.zeros_like(everyone, dtype=torch.bool).scatter_(1, picked, True)
    mine = chosen[:, rank * k: rank * k + take] & rows.unsqueeze(1)
    partial = torch.where(mine, values, torch.zeros_like(values)).sum(dim=1)
    return sum_over_ranks(partial, group) / k, k


@torch.no_grad()
def ema_update_(gallery: nn.Module, probe: nn.Module, momentum: float) -> None:
    """``g <- momentum * g + (1 - momentum) * p`` for every parameter; buffers (BatchNorm
    statistics) are copied from the probe. The two modules must have the same structure."""
    for g, p in zip(gallery.parameters(), probe.parameters(), strict=True):
        g.mul_(momentum).add_(p.detach().to(g.dtype), alpha=1.0 - momentum)
    for g, p in zip(gallery.buffers(), probe.buffers(), strict=True):
        g.copy_(p)


class FFC(nn.Module):
    """FFC training model: ``forward(local_inputs, local_labels) -> loss`` (scalar, same on every rank).

    ``probe`` is the backbone being trained; ``gallery`` an EMA copy of it (``gallery_momentum``,
    default 0.99; its parameters have ``requires_grad=False`` and are in ``state_dict``). Each
    training forward (1) embeds the local batch with the probe and checks every rank's batch, (2) moves
    the gallery towards the probe and embeds the batch with it, (3) gathers the global batch, (4)
    computes :func:`pool_loss` against the pool as it was before this step, (5) applies
    :meth:`ClassPool.update` with the gallery features. Evaluation
    mode computes the loss without touching the gallery or the pool.

    Gradient semantics are those of :class:`~ffc_parallel.ShardedClassifier`: the local embeddings
    receive the gradient of the global-batch loss, so the probe's true gradient is the SUM over ranks.
    Under DeepSpeed, which AVERAGES gradients over the data-parallel ranks, the embedding gradient is
    multiplied by the data-parallel size (automatic; pass ``grad_multiplier=world_size`` under DDP).
    The pool holds no parameters and DeepSpeed broadcasts parameters only, so
    ``deepspeed.initialize(model=ffc, model_parameters=ffc.trainable_parameters(), ...)`` keeps every
    rank's pool shard; ZeRO stages 0-2 (ZeRO-3 partitions the probe, which the EMA needs whole).

    Args:
        backbone: ``nn.Module`` mapping local inputs to ``[b, embedding_dim]`` embeddings.
        pool_size: slots in the class pool (the paper's default is 30,000; or a fraction of the
            identities: ``pool_size=int(0.1 * num_identities)``).
        margin, scale: as for :class:`~ffc_parallel.ShardedClassifier` (default ArcFace with s=32).
        topk: neighbours in the fresh-identity penalty. fresh_weight: its weight.
        refresh_momentum: weight of the old feature when an existing identity is refreshed.
        grad_multiplier: factor on the embedding gradient (default: automatic, see above).
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, pool_size: int = 30_000, *, margin="arcface",
                 scale: float | None = 32.0, topk: int = 5, fresh_weight: float = 1.0,
                 gallery_momentum: float = 0.99, refresh_momentum: float = 0.5, grad_multiplier: float | None = None,
                 group=None, device=None):
        super().__init__()
        if not 0.0 <= gallery_momentum <= 1.0:
            raise ValueError(f"gallery_momentum must be in [0, 1], got {gallery_momentum}")
        if int(topk) < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.probe = backbone
        self.gallery = copy.deepcopy(backbone)
        for p in self.gallery.parameters():
            p.requires_grad_(False)
        self.embedding_dim, self.group = int(embedding_dim), group
        self.margin = resolve_margin(margin, scale)
        self.topk, self.fresh_weight, self.gallery_momentum = int(topk), float(fresh_weight), float(gallery_momentum)
        self.gradient_sum = GradientSum(self, group, grad_multiplier)
        if device is None:
            device = next(iter(backbone.parameters()), torch.empty(0)).device
        m = self.margin
        agree_on_config("ffc_parallel.FFC", {"embedding_dim": self.embedding_dim, "margin": (m.s, m.m1, m.m2, m.m3),
                                             "topk": self.topk, "fresh_weight": self.fresh_weight,
                                             "gallery_momentum": self.gallery_momentum}, group, device)
        self.pool = ClassPool(pool_size, embedding_dim, refresh_momentum=refresh_momentum, group=group, device=device)
        self.last_stats: dict = {}
        guard_norm_statistics(self)   # a refused batch leaves the probe's BatchNorm statistics as they were

    def trainable_parameters(self):
        """The probe's parameters (what the optimizer should get)."""
        return self.probe.parameters()

    def update_gallery(self) -> None:
        if any(partitioned(p) for p in self.probe.parameters()):
            raise RuntimeError("FFC under DeepSpeed ZeRO-3: the probe's parameters are partitioned, so the gallery's "
                               "EMA cannot read them; use ZeRO stage 0, 1 or 2")
        ema_update_(self.gallery, self.probe, self.gallery_momentum)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Probe embeddings ``[b, D]`` (what is evaluated and deployed)."""
        return self.probe(inputs)

    def _global_batch(self, local: torch.Tensor, labels: torch.Tensor):
        """Validate every rank's batch (one all-gather, same error everywhere) and return the sizes."""
        spec = BatchSpec("ffc_parallel.FFC", self.embedding_dim, "the pool's embedding_dim",
                         labels_name="identity labels", allow_empty=True)
        return [f["rows"] for f in check_batch(spec, local, labels, group=self.group)]

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probe = self.probe(inputs)
        labels = labels.to(device=probe.device, dtype=torch.long)
        sizes = self._global_batch(probe, labels)     # before the gallery moves: a refused batch changes nothing
        if self.training:
            self.update_gallery()
            probe = self.gradient_sum(probe)
        with torch.no_grad():
            self.gallery.train(self.training)
            gallery = self.gallery(inputs)
        probe_all = F.normalize(gather_rows(probe, sizes, self.group), dim=1)
        labels_all = gather_rows(labels, sizes, self.group)
        slots = self.pool.lookup(labels_all)
        loss, stats = pool_loss(probe_all, slots, self.pool, self.margin, self.topk, self.fresh_weight)
        if self.training:
            gallery_all = F.normalize(gather_rows(gallery.detach(), sizes, self.group), dim=1)
            stats.update(self.pool.update(gallery_all, labels_all))
        self.last_stats = stats
        return loss

    @torch.no_grad()
    def prefill(self, batches, progress: bool = False) -> int:
        """Put gallery features of ``(inputs, labels)`` batches into the pool before training (the
        paper fills ~10% of the identities with the randomly initialised gallery). Ranks may yield
        different numbers of batches. Returns the number of filled slots."""
        was_training = self.gallery.training
        self.gallery.train(False)
        for batch in lockstep(batches, self.group, progress=progress, desc="FFC pool prefill"):
            if batch is None:
                feats = torch.empty(0, self.embedding_dim, device=self.pool.features.device)
                labels = torch.empty(0, dtype=torch.long, device=feats.device)
            else:
                inputs, labels = batch
                feats = self.gallery(inputs)
                labels = labels.to(device=feats.device, dtype=torch.long)
            sizes = self._global_batch(feats, labels)
            self.pool.update(F.normalize(gather_rows(feats, sizes, self.group), dim=1),
                             gather_rows(labels, sizes, self.group))
        self.gallery.train(was_training)
        return self.pool.num_filled()
