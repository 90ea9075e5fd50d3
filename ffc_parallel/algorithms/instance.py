"""Million-way instance classification (self-supervised; AAAI 2021): every training image is its own
class of a :class:`~ffc_parallel.ShardedClassifier`. See ``docs/instance.md``.

* :func:`instance_classifier`: the head with the task's default temperature cosine softmax (τ = 0.15).
* :func:`contrastive_prior`: one pass of the randomly initialised backbone (BatchNorm in training
  mode) writes each image's unit feature into its class row, on the rank that owns the row.
* :func:`hardest_class_neighbours` / :class:`HardestClassSmoothing`: each class's top-K most
  similar classes by center cosine, computed shard against shard in chunks (never ``C x C``), and
  the soft targets ``1 - α`` on the image's class and ``α / K`` on each neighbour.

Evaluation of the learned features (kNN, linear probe) is in ``ffc_parallel/evaluation/probes.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.checks import BatchSpec, batch_sizes, check_batch
from ..distributed.collectives import all_reduce_, gather_rows
from ..distributed.init import get_rank, get_world_size
from ..distributed.lockstep import lockstep
from ..heads.classifier import ShardedClassifier, shard_range

DEFAULT_TEMPERATURE = 0.15


def instance_classifier(num_images: int, embedding_dim: int, temperature: float = DEFAULT_TEMPERATURE,
                        **kwargs) -> ShardedClassifier:
    """A :class:`ShardedClassifier` with one class per image and a temperature cosine softmax
    (``margin=None, scale=1/temperature``). ``kwargs`` go to the head (``sample_rate``, ``group``...)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kwargs.setdefault("margin", None)
    return ShardedClassifier(embedding_dim, num_images, scale=1.0 / temperature, **kwargs)


@torch.no_grad()
def contrastive_prior(backbone: nn.Module, batches, head: ShardedClassifier, progress: bool = True) -> int:
    """Initialise every class row of ``head`` with its image's feature (the contrastive prior).

    ``batches`` yields this rank's ``(inputs, image_ids)``: ``image_ids[b]`` are the images' class
    ids (global, ``[0, num_classes)``); ranks may hold different numbers of batches. The backbone runs
    in training mode (BatchNorm normalises with batch statistics, which spreads the features); its
    parameters and buffers (running statistics) are left exactly as they were. Each batch's unit
    features and ids are all-gathered over ``head.group`` and every rank copies the rows it owns.
    Returns the number of class rows written over all ranks (each class once if the data covers it).
    """
    head.require_device_rows("the contrastive prior")
    group, (start, stop) = head.group, head.class_range
    device, dim = head.weight.device, head.embedding_dim
    saved = {k: v.clone() for k, v in backbone.state_dict().items()}
    was_training = backbone.training
    backbone.train(True)
    written = torch.zeros(head.num_local, dtype=torch.bool, device=device)
    try:
        for batch in lockstep(batches, group, progress=progress, desc="contrastive prior"):
            if batch is None:
                feats = torch.empty(0, dim, device=device, dtype=head.weight.dtype)
                ids = torch.empty(0, dtype=torch.long, device=device)
            else:
                inputs, ids = batch
                feats = F.normalize(backbone(inputs).to(device=device, dtype=head.weight.dtype), dim=1)
                ids = ids.to(device=device, dtype=torch.long)
            spec = BatchSpec("ffc_parallel.contrastive_prior", dim, "the head's embedding_dim",
                             labels_name="image ids", label_range=(0, head.num_classes), allow_empty=True)
            sizes = [f["rows"] for f in check_batch(spec, feats, ids, group=group)]
            all_feats, all_ids = gather_rows(feats, sizes, group), gather_rows(ids, sizes, group)
            own = (all_ids >= start) & (all_ids < stop)
            rows = all_ids[own] - start
            head.weight.data[rows] = all_feats[own]
            written[rows] = True
    finally:
        backbone.load_state_dict(saved)
        backbone.train(was_training)
    return int(all_reduce_(written.sum().reshape(1), group=group))


@torch.no_grad()
def hardest_class_neighbours(weight: torch.Tensor, num_classes: int, k: int, group=None,
                             row_chunk: int = 4096, col_chunk: int = 1024, progress: bool = False):
    """Top-``k`` most similar OTHER classes of each local class by center cosine (collective).

    ``weight[num_local, D]`` is this rank's shard of ``[num_classes, D]`` (rows
    ``shard_range(num_classes, W, rank)``). In round t every rank contributes its rows
    ``[t*col_chunk, (t+1)*col_chunk)`` to one all-gather; each rank scores its own rows against the
    gathered ones ``row_chunk`` rows at a time and keeps a running top-k. Peak extra memory is
    ``W * col_chunk * D`` gathered rows plus a ``[row_chunk, W * col_chunk]`` score block.
    Returns ``(similarity[num_local, k], class_ids[num_local, k])``, best first.
    """
    world, rank = get_world_size(group), get_rank(group)
    if not 1 <= k < num_classes:
        raise ValueError(f"k must be in [1, num_classes - 1] = [1, {num_classes - 1}], got {k}")
    ranges = [shard_range(num_classes, world, r) for r in range(world)]
    start = ranges[rank][0]
    n, device = weight.shape[0], weight.device
    wn = F.normalize(weight.detach().float(), dim=1)
    best = torch.full((n, k), -float("inf"), device=device)
    best_ids = torch.full((n, k), -1, dtype=torch.long, device=device)
    own_ids = torch.arange(start, start + n, device=device)
    rounds = math.ceil(max(b - a for a, b in ranges) / col_chunk)
    steps = range(rounds)
    if progress and rank == 0:
        from tqdm import tqdm
        steps = tqdm(steps, desc="hardest-class neighbours", unit="round")
    for t in steps:
        lo = t * col_chunk
        piece = wn.new_zeros(col_chunk, wn.shape[1])
        mine = wn[lo: lo + col_chunk]
        piece[: mine.shape[0]] = mine
        cand = gather_rows(piece, [col_chunk] * world, group)                     # [W*c, D]
        cand_ids = torch.cat([torch.arange(a + lo, a + lo + col_chunk, device=device) for a, _ in ranges])
        valid = torch.cat([torch.arange(lo, lo + col_chunk, device=device) < (b - a) for a, b in ranges])
        for r0 in range(0, n, row_chunk):
            r1 = min(n, r0 + row_chunk)
            sims = wn[r0:r1] @ cand.t()
            bad = ~valid.unsqueeze(0) | (cand_ids.unsqueeze(0) == own_ids[r0:r1].unsqueeze(1))
            sims.masked_fill_(bad, -float("inf"))
            merged, pick = torch.cat([best[r0:r1], sims], 1).topk(k, dim=1)
            best_ids[r0:r1] = torch.cat([best_ids[r0:r1], cand_ids.expand(r1 - r0, -1)], 1).gather(1, pick)
            best[r0:r1] = merged
    return best, best_ids


class HardestClassSmoothing:
    """Hardest-class label smoothing for instance classification on a sharded head.

    ``refresh()`` (collective) recomputes each local class's ``k`` nearest other classes from the
    head's current centers; :meth:`maybe_refresh` does it every ``refresh_every`` epochs.
    ``soft_targets(local_labels)`` (collective) returns ``(classes[b, k], probs[b, k])`` with
    ``probs = alpha / k``, to pass as ``head(x, labels, soft_targets=...)``: the label keeps
    ``1 - alpha``. Only the owner of a class holds its neighbours (``[num_local, k]``); a step
    fetches the rows of its global batch with one all-reduce of ``B * k`` integers.
    """

    def __init__(self, head: ShardedClassifier, k: int = 5, alpha: float = 0.2, refresh_every: int = 1,
                 row_chunk: int = 4096, col_chunk: int = 1024):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if int(refresh_every) < 1:
            raise ValueError(f"refresh_every must be >= 1 epochs, got {refresh_every}")
        head.require_device_rows("HardestClassSmoothing")
        self.head, self.k, self.alpha, self.refresh_every = head, int(k), float(alpha), int(refresh_every)
        self.row_chunk, self.col_chunk = row_chunk, col_chunk
        self.neighbours: torch.Tensor | None = None   # [num_local, k] global class ids
        self.refreshed_at: int | None = None

    def refresh(self, progress: bool = False) -> None:
        _, self.neighbours = hardest_class_neighbours(self.head.weight, self.head.num_classes, self.k,
                                                      self.head.group, self.row_chunk, self.col_chunk, progress)

    def maybe_refresh(self, epoch: int, progress: bool = False) -> bool:
        """Refresh at epochs 0, refresh_every, 2*refresh_every, ... (once per such epoch), and at any
        epoch while no neighbours are held (after a resume: they are not checkpointed)."""
        due = epoch % self.refresh_every == 0 or self.neighbours is None
        if not due or self.refreshed_at == epoch:
            return False
        self.refresh(progress)
        self.refreshed_at = epoch
        return True

    def soft_targets(self, local_labels: torch.Tensor):
        """``(classes[b, k], probs[b, k])`` for this rank's labels ``[b]`` (collective)."""
        if self.neighbours is None:
            raise RuntimeError("HardestClassSmoothing: call refresh() (or maybe_refresh(epoch)) before soft_targets()")
        head, device = self.head, self.head.weight.device
        labels = local_labels.to(device=device, dtype=torch.long)
        sizes = batch_sizes(labels.shape[0], head.group, device)
        everyone = gather_rows(labels, sizes, head.group)
        start, stop = head.class_range
        own = (everyone >= start) & (everyone < stop)
        table = torch.zeros(everyone.shape[0], self.k, dtype=torch.long, device=device)
        table[own] = self.neighbours[everyone[own] - start]
        all_reduce_(table, group=head.group)
        offset = sum(sizes[: head.rank])
        classes = table[offset: offset + labels.shape[0]]
        dtype = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
        probs = torch.full(classes.shape, self.alpha / self.k, dtype=dtype, device=device)
        return classes, probs
