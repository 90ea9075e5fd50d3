"""Per-rank bodies of the multi-rank head tests (run through ffc_parallel.testing.run_ranks)."""
import torch

import ffc_parallel as fp
from ffc_parallel.heads.classifier import init_class_rows
from tests.reference import dense_margin_loss, margin_target, rel_err

MARGINS = {
    "arcface": ("arcface", (64.0, 1.0, 0.5, 0.0)),
    "cosface": ("cosface", (64.0, 1.0, 0.0, 0.4)),
    "softmax": (None, (30.0, 1.0, 0.0, 0.0)),
    "combined": (fp.CombinedMargin(32.0, 1.2, 0.3, 0.2), (32.0, 1.2, 0.3, 0.2)),
    "wrapping": (fp.CombinedMargin(16.0, 2.0, 1.0, 0.0), (16.0, 2.0, 1.0, 0.0)),
}


def _global_batch(batch_sizes, dim, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(batch_sizes)
    return (torch.randn(total, dim, generator=g, dtype=torch.float64),
            torch.randint(num_classes, (total,), generator=g))


def _local(tensor, batch_sizes, rank):
    start = sum(batch_sizes[:rank])
    return tensor[start: start + batch_sizes[rank]]


def head_matches_dense(num_classes, dim, batch_sizes, margins, chunk_sizes, filter_threshold=None,
                       straight_through=False, seed=0, pieces=(1, 2, 3)):
    """Loss, embedding grads and center grads of the head vs the dense float64 reference."""
    rank, world = fp.get_rank(), fp.get_world_size()
    x_all, y_all = _global_batch(batch_sizes, dim, num_classes, seed)
    full_w = init_class_rows(0, num_classes, dim, 0.01, seed)
    errors = {}
    for name in margins:
        margin, (s, m1, m2, m3) = MARGINS[name]
        if straight_through and isinstance(margin, str):
            margin = fp.heads.resolve_margin(margin)
            margin = fp.CombinedMargin(margin.s, margin.m1, margin.m2, margin.m3, straight_through=True)
        ref_x = x_all.clone().requires_grad_()
        ref_w = full_w.to(torch.float64).requires_grad_()
        ref = dense_margin_loss(ref_x, ref_w, y_all, s, m1, m2, m3, filter_threshold, straight_through)
        ref.backward()
        for chunk, piece in [(c, p) for c in chunk_sizes for p in pieces]:
            head = fp.ShardedClassifier(dim, num_classes, margin=margin, scale=s if margin is None else None,
                                        filter_threshold=filter_threshold, dtype=torch.float64,
                                        chunk_size=chunk, seed=seed, gather_pieces=piece)
            start, stop = head.class_range
            assert torch.equal(head.weight.detach(), ref_w.detach()[start:stop]), "init depends on sharding"
            x = _local(x_all, batch_sizes, rank).clone().requires_grad_()
            loss = head(x, _local(y_all, batch_sizes, rank))
            loss.backward()
            err = {"loss": rel_err(loss.detach(), ref.detach()),
                   "grad_x": rel_err(x.grad, _local(ref_x.grad, batch_sizes, rank)),
                   "grad_w": rel_err(head.weight.grad, ref_w.grad[start:stop]) if stop > start else 0.0}
            bad = {k: v for k, v in err.items() if not v < 1e-5}
            assert not bad, f"rank {rank}/{world} margin={name} chunk={chunk} pieces={piece}: {bad}"
            errors[f"{name}/{chunk}/{piece}"] = err
    return errors


def partial_fc_matches_restricted_dense(num_classes, dim, batch_sizes, sample_rate, seed=0):
    """Partial FC equals the dense reference over the union of sampled classes; others get 0 grad."""
    import torch.distributed as dist

    rank, world = fp.get_rank(), fp.get_world_size()
    x_all, y_all = _global_batch(batch_sizes, dim, num_classes, seed)
    head = fp.ShardedClassifier(dim, num_classes, margin="arcface", sample_rate=sample_rate,
                                dtype=torch.float64, chunk_size=3, seed=seed, gather_pieces=3)
    start, stop = head.class_range
    x = _local(x_all, batch_sizes, rank).clone().requires_grad_()
    loss = head(x, _local(y_all, batch_sizes, rank))
    loss.backward()
    rows = head.last_sampled_rows
    positives = torch.unique(y_all[(y_all >= start) & (y_all < stop)] - start)
    assert rows.numel() == max(positives.numel(), int(sample_rate * head.num_local)), rows.numel()
    assert torch.isin(positives, rows).all(), "a positive class was not sampled"
    assert torch.equal(rows, rows.unique()), "sampled rows not sorted/unique"
    # Every rank's sampled global classes, in rank order.
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows.numel()]))
    padded = torch.full((max(int(c) for c in counts),), -1, dtype=torch.long)
    padded[: rows.numel()] = rows + start
    everyone = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everyone, padded)
    sampled = torch.cat([e[: int(c)] for e, c in zip(everyone, counts)])
    full_w = init_class_rows(0, num_classes, dim, 0.01, seed).to(torch.float64)
    ref_x, ref_w = x_all.clone().requires_grad_(), full_w[sampled].clone().requires_grad_()
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[sampled] = torch.arange(sampled.numel())
    ref = dense_margin_loss(ref_x, ref_w, remap[y_all], 64.0, 1.0, 0.5, 0.0)
    ref.backward()
    mine = slice(sum(int(c) for c in counts[:rank]), sum(int(c) for c in counts[: rank + 1]))
    grad_w = head.weight.grad
    unsampled = torch.ones(head.num_local, dtype=torch.bool)
    unsampled[rows] = False
    assert not grad_w[unsampled].any(), "an unsampled row got a gradient"
    err = {"loss": rel_err(loss.detach(), ref.detach()),
           "grad_x": rel_err(x.grad, _local(ref_x.grad, batch_sizes, rank)),
           "grad_w": rel_err(grad_w[rows], ref_w.grad[mine])}
    assert all(v < 1e-5 for v in err.values()), f"rank {rank}: {err}"
    # Reproducible: a fresh head with the same seed draws the same rows at the same step.
    again = fp.ShardedClassifier(dim, num_classes, sample_rate=sample_rate, dtype=torch.float64, seed=seed)
    again(x.detach(), _local(y_all, batch_sizes, rank))
    assert torch.equal(again.last_sampled_rows, rows)
    return {"rows": rows.numel(), **err}


def predict_matches_dense(num_classes, dim, batch_sizes, k, seed=0):
    rank = fp.get_rank()
    x_all, _ = _global_batch(batch_sizes, dim, num_classes, seed)
    head = fp.ShardedClassifier(dim, num_classes, dtype=torch.float64, chunk_size=4, seed=seed)
    full_w = init_class_rows(0, num_classes, dim, 0.01, seed).to(torch.float64)
    scores, ids = head.predict(_local(x_all, batch_sizes, rank), k=k)
    cos = torch.nn.functional.normalize(_local(x_all, batch_sizes, rank), dim=1) @ \
        torch.nn.functional.normalize(full_w, dim=1).t()
    ref_scores, ref_ids = cos.topk(k, dim=1)
    assert torch.equal(ids, ref_ids), (ids, ref_ids)
    assert rel_err(scores, ref_scores) < 1e-12
    return ids.tolist()


BAD_INPUTS = {
    "label_too_large": "labels must be in [0, 13), got values in [",  # ..., 13],
    "label_negative": "got values in [-1,",
    "float_labels": "labels must be an integer tensor",
    "wrong_dim": "embedding dim is 7 but the head's embedding_dim is 6",
    "nan": "1 non-finite (NaN/inf) values in the embeddings",
    "inf": "non-finite (NaN/inf) values in the embeddings",
    "length_mismatch": "5 embeddings but 4 labels",
    "one_dim_embeddings": "embeddings must be a 2-D floating-point tensor",
    "two_dim_labels": "labels must be a 1-D tensor",
    "soft_target_out_of_range": "soft target classes must be in [0, 13), got [0, 99]",
    "soft_target_bad_probs": "soft target probabilities must be finite, >= 0 and sum to at most 1",
    "soft_target_k_mismatch": "soft_targets has K=3 but rank 0 has K=2",
}


def bad_inputs_raise_everywhere(kinds, bad_rank=1):
    """For each kind, rank ``bad_rank`` passes a bad input; every rank must raise the same ValueError,
    then the head must still train on good input (nothing lost, no collective left pending)."""
    return {kind: _bad_input_round(kind, bad_rank) for kind in kinds}


def _bad_input_round(kind, bad_rank):
    rank = fp.get_rank()
    head = fp.ShardedClassifier(6, 13, margin="cosface")
    x, y = torch.randn(5, 6), torch.randint(13, (5,))
    bx, by = x.clone(), y.clone()
    if rank == bad_rank:
        if kind == "label_too_large":
            by[2] = 13
            assert by.max() == 13
        elif kind == "label_negative":
            by[0] = -1
        elif kind == "float_labels":
            by = by.float()
        elif kind == "wrong_dim":
            bx = torch.randn(5, 7)
        elif kind == "nan":
            bx[1, 3] = float("nan")
        elif kind == "inf":
            bx[4] = float("inf")
        elif kind == "length_mismatch":
            by = by[:4]
        elif kind == "one_dim_embeddings":
            bx = bx[:, 0]
        elif kind == "two_dim_labels":
            by = by.view(5, 1)
    soft = (torch.zeros(5, 2, dtype=torch.long), torch.full((5, 2), 0.1))
    if rank == bad_rank and kind.startswith("soft_target"):
        if kind == "soft_target_out_of_range":
            soft[0][3, 1] = 99
        elif kind == "soft_target_bad_probs":
            soft[1][0, 0] = 0.95
        else:
            soft = (torch.zeros(5, 3, dtype=torch.long), torch.full((5, 3), 0.1))
    try:
        head(bx, by, soft_targets=soft if kind.startswith("soft_target") else None)
        message = None
    except ValueError as exc:
        message = str(exc)
    loss = head(x, y)
    loss.backward()
    return {"message": message, "recovered": bool(torch.isfinite(loss))}


def launcher_info():
    info = fp.init_distributed(verbose=False)
    head = fp.ShardedClassifier(4, 10)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(info.rank))
    loss = head(x, torch.tensor([0, 5, 9]))
    return {"rank": info.rank, "world": info.world_size, "launcher": info.launcher,
            "local_rank": info.local_rank, "backend": info.backend, "loss": float(loss)}


def soft_targets_and_class_weights_match_dense(num_classes, dim, batch_sizes, k, seed=0):
    """Soft targets (label smoothing over chosen classes) and sharded class weights vs dense."""
    rank = fp.get_rank()
    x_all, y_all = _global_batch(batch_sizes, dim, num_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    extra = torch.randint(num_classes, (y_all.numel(), k), generator=g)
    extra[0, 0] = y_all[0]  # a soft target on the label itself
    probs = torch.rand(y_all.numel(), k, generator=g, dtype=torch.float64) * (0.4 / k)
    class_w = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.2
    full_w = init_class_rows(0, num_classes, dim, 0.01, seed).to(torch.float64)
    ref_x, ref_w = x_all.clone().requires_grad_(), full_w.clone().requires_grad_()
    cos = torch.nn.functional.normalize(ref_x, dim=1) @ torch.nn.functional.normalize(ref_w, dim=1).t()
    rows = torch.arange(y_all.numel())
    logits = (64.0 * cos).index_put((rows, y_all), margin_target(cos[rows, y_all], 64.0, 1.0, 0.5, 0.0))
    logp = torch.log_softmax(logits, dim=1)
    q = torch.cat([1 - probs.sum(1, keepdim=True), probs], dim=1)
    ll = (q * logp.gather(1, torch.cat([y_all[:, None], extra], dim=1))).sum(1)
    wy = class_w[y_all]
    ref = -(wy * ll).sum() / wy.sum()
    ref.backward()
    for chunk, pieces in ((None, 1), (3, 2)):
        head = fp.ShardedClassifier(dim, num_classes, margin="arcface", dtype=torch.float64, chunk_size=chunk,
                                    seed=seed, gather_pieces=pieces)
        start, stop = head.class_range
        head.set_class_weight(class_w[start:stop])
        x = _local(x_all, batch_sizes, rank).clone().requires_grad_()
        loss = head(x, _local(y_all, batch_sizes, rank),
                    soft_targets=(_local(extra, batch_sizes, rank), _local(probs, batch_sizes, rank)))
        loss.backward()
        err = {"loss": rel_err(loss.detach(), ref.detach()),
               "grad_x": rel_err(x.grad, _local(ref_x.grad, batch_sizes, rank)),
               "grad_w": rel_err(head.weight.grad, ref_w.grad[start:stop]) if stop > start else 0.0}
        assert all(v < 1e-5 for v in err.values()), f"rank {rank} chunk {chunk}: {err}"
    # Partial FC keeps every soft-target class among the sampled rows.
    pfc = fp.ShardedClassifier(dim, num_classes, sample_rate=0.1, dtype=torch.float64, seed=seed)
    pfc(_local(x_all, batch_sizes, rank), _local(y_all, batch_sizes, rank),
        soft_targets=(_local(extra, batch_sizes, rank), _local(probs, batch_sizes, rank)))
    start, stop = pfc.class_range
    wanted = torch.cat([y_all, extra.flatten()])
    wanted = wanted[(wanted >= start) & (wanted < stop)].unique() - start
    assert torch.isin(wanted, pfc.last_sampled_rows).all()
    return err
