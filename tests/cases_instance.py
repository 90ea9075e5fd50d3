"""Instance-classification references and per-rank bodies (run through run_ranks).

References are dense float64 single-process computations written from the formulas: the full
``[C, D]`` center matrix, a full ``C x C`` cosine matrix for the neighbours, full logits with
explicit soft targets, and the backbone run over each rank's batches in one process.
"""
import torch
import torch.nn.functional as F

import ffc_parallel as fp
from ffc_parallel.distributed.collectives import gather_rows
from ffc_parallel.algorithms.instance import HardestClassSmoothing, contrastive_prior, instance_classifier
from ffc_parallel.heads.classifier import init_class_rows
from tests.reference import rel_err


def prior_backbone(dim_in, dim, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim_in, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
                               torch.nn.Linear(12, dim)).double()


def prior_batches(rank, world, num_images, dim_in, seed):
    """Rank r's batches ``(inputs, image_ids)``: a disjoint share of the images, batch size 2 + r
    (so ranks hold different numbers of batches), never a batch of one (BatchNorm needs two)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, dim_in, generator=g, dtype=torch.float64)
    ids = torch.randperm(num_images, generator=g)[rank::world]
    size = 2 + rank
    cuts = list(range(0, ids.numel(), size))
    if ids.numel() - cuts[-1] == 1 and len(cuts) > 1:
        cuts.pop()
    bounds = cuts[1:] + [ids.numel()]
    return [(x[ids[a:b]], ids[a:b]) for a, b in zip(cuts, bounds)]


def prior_matches_single_process(num_images, dim_in, dim, seed=0):
    """Run the contrastive prior; return the assembled center matrix and the BN statistics after."""
    rank, world = fp.get_rank(), fp.get_world_size()
    backbone = prior_backbone(dim_in, dim, seed)
    head = instance_classifier(num_images, dim, dtype=torch.float64, seed=seed)
    written = contrastive_prior(backbone, prior_batches(rank, world, num_images, dim_in, seed), head, progress=False)
    sizes = [fp.shard_range(num_images, world, r)[1] - fp.shard_range(num_images, world, r)[0] for r in range(world)]
    full = gather_rows(head.weight.detach(), sizes)
    return {"centers": full.tolist(), "written": written, "running_mean": backbone[1].running_mean.tolist(),
            "batches": len(prior_batches(rank, world, num_images, dim_in, seed))}


def dense_neighbours(centers, k):
    wn = F.normalize(centers, dim=1)
    cos = wn @ wn.t()
    cos.fill_diagonal_(-float("inf"))
    return cos.topk(k, dim=1).indices


def dense_smoothed_loss(x, centers, labels, neighbours, alpha, temperature):
    """mean_b -sum_t q_bt log softmax(cos / temperature)_bt with q = 1 - alpha on the label and
    alpha / K on each of the label's K neighbours."""
    logits = (F.normalize(x, dim=1) @ F.normalize(centers, dim=1).t()) / temperature
    q = torch.zeros_like(logits)
    k = neighbours.shape[1]
    rows = torch.arange(x.shape[0])
    q[rows, labels] = 1 - alpha
    for t in range(k):
        q[rows, neighbours[labels, t]] += alpha / k
    return -(q * torch.log_softmax(logits, dim=1)).sum(1).mean()


def smoothing_matches_dense(num_classes, dim, batch_sizes, k, alpha, chunks, seed=0, temperature=0.15):
    """Neighbours and the smoothed loss (value, embedding and center gradients) vs the dense reference."""
    rank = fp.get_rank()
    g = torch.Generator().manual_seed(seed + 1)
    total = sum(batch_sizes)
    x_all = torch.randn(total, dim, generator=g, dtype=torch.float64)
    y_all = torch.randint(num_classes, (total,), generator=g)
    centers = init_class_rows(0, num_classes, dim, 0.01, seed).double()
    nbrs = dense_neighbours(centers, k)
    ref_x, ref_w = x_all.clone().requires_grad_(), centers.clone().requires_grad_()
    ref = dense_smoothed_loss(ref_x, ref_w, y_all, nbrs, alpha, temperature)
    ref.backward()
    lo = sum(batch_sizes[:rank])
    errors = {}
    for row_chunk, col_chunk in chunks:
        head = instance_classifier(num_classes, dim, temperature, dtype=torch.float64, seed=seed)
        assert abs(head.margin.s - 1 / temperature) < 1e-12 and not head.margin.is_angular and head.margin.m3 == 0
        start, stop = head.class_range
        smoothing = HardestClassSmoothing(head, k=k, alpha=alpha, row_chunk=row_chunk, col_chunk=col_chunk)
        smoothing.refresh()
        assert torch.equal(smoothing.neighbours, nbrs[start:stop]), f"rank {rank}: neighbours differ ({row_chunk}, {col_chunk})"
        x = x_all[lo: lo + batch_sizes[rank]].clone().requires_grad_()
        y = y_all[lo: lo + batch_sizes[rank]]
        loss = head(x, y, soft_targets=smoothing.soft_targets(y))
        loss.backward()
        err = {"loss": rel_err(loss.detach(), ref.detach()), "grad_x": rel_err(x.grad, ref_x.grad[lo: lo + batch_sizes[rank]]),
               "grad_w": rel_err(head.weight.grad, ref_w.grad[start:stop]) if stop > start else 0.0}
        assert all(v < 1e-9 for v in err.values()), f"rank {rank} chunks ({row_chunk}, {col_chunk}): {err}"
        errors[f"{row_chunk}/{col_chunk}"] = err
    return errors


def instance_checks(prior_kwargs, smoothing_kwargs):
    """One spawn for both multi-rank checks (keeps the suite fast)."""
    return {"prior": prior_matches_single_process(**prior_kwargs), "smoothing": smoothing_matches_dense(**smoothing_kwargs)}
