"""Per-rank bodies of the multi-rank long-tail and cross-batch-memory tests (run through run_ranks).

References are dense float64 PyTorch computations written here from the formulas, independently of
``ffc_parallel.losses``: full ``[C, D]`` weights, full logits, ``F.cross_entropy(weight=)``, BCE-based
sigmoid focal, explicit pair loops for the pair losses.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ffc_parallel as fp
from ffc_parallel.heads.classifier import init_class_rows
from ffc_parallel.losses import ShardedSigmoidFocal, configure_reweighting, shard_class_counts
from tests.reference import dense_logits, rel_err

MARGINS = {"arcface": ("arcface", (64.0, 1.0, 0.5, 0.0)), "cosface": ("cosface", (64.0, 1.0, 0.0, 0.4)),
           "softmax": (None, (16.0, 1.0, 0.0, 0.0))}


def long_tailed_labels(num_classes, seed, head_count=40, imbalance=20.0):
    """Data-set labels with ``n_c = head_count * imbalance^(-c / (C-1))`` (at least 1) per class."""
    counts = [max(1, int(head_count * imbalance ** (-c / max(num_classes - 1, 1)))) for c in range(num_classes)]
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def dense_class_weights(counts, method, gamma=1.0, beta=0.999):
    counts = counts.to(torch.float64)
    if method == "cs_ce":
        return (counts.min() / counts) ** gamma
    raw = (1 - beta) / (1 - beta ** counts)
    return raw / raw.sum() * counts.numel()


def dense_reweighted_loss(logits, labels, w_y, method, gamma, alpha, reduction):
    """The loss of ``method`` from full logits; ``w_y[B]`` are the label weights (ones if unweighted)."""
    norm = w_y.sum() if reduction == "weighted_mean" else torch.tensor(float(labels.numel()))
    if method in ("ce", "cs_ce", "cb_ce"):
        if reduction == "weighted_mean":
            full_w = torch.zeros(logits.shape[1], dtype=logits.dtype).index_put((labels,), w_y)
            return F.cross_entropy(logits, labels, weight=full_w)
        return (w_y * F.cross_entropy(logits, labels, reduction="none")).sum() / norm
    if method in ("focal", "cb_focal"):
        log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
        return (w_y * -(1 - log_p.exp()) ** gamma * log_p).sum() / norm
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)           # sigmoid focal
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * onehot + (1 - p) * (1 - onehot)
    elem = bce * (1 - p_t) ** gamma
    if alpha is not None:
        elem = elem * (alpha * onehot + (1 - alpha) * (1 - onehot))
    return (w_y * elem.sum(dim=1)).sum() / norm


def _local(tensor, batch_sizes, rank):
    start = sum(batch_sizes[:rank])
    return tensor[start: start + batch_sizes[rank]]


def _sampled_global_classes(head):
    """Global ids of the classes every rank used in its last forward (rank order), sorted."""
    rows = head.last_sampled_rows
    rows = torch.arange(head.num_local) if rows is None else rows
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = rows + head.class_range[0]
    if world == 1:
        return mine
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([mine.numel()]))
    padded = torch.full((max(int(c) for c in counts),), -1, dtype=torch.long)
    padded[: mine.numel()] = mine
    everyone = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everyone, padded)
    return torch.cat([e[: int(c)] for e, c in zip(everyone, counts)])


def reweighting_matches_dense(num_classes, dim, batch_sizes, methods, margins, chunk_sizes, sample_rate=1.0,
                              gamma=2.0, alpha=None, reduction="weighted_mean", filter_threshold=None, prior=None,
                              seed=0):
    """Loss, embedding grads and center grads of every re-weighting vs the dense float64 reference."""
    rank = fp.get_rank()
    g = torch.Generator().manual_seed(seed)
    data_labels = long_tailed_labels(num_classes, seed)
    counts = torch.bincount(data_labels, minlength=num_classes)
    total = sum(batch_sizes)
    x_all = torch.randn(total, dim, generator=g, dtype=torch.float64)
    y_all = data_labels[torch.randint(data_labels.numel(), (total,), generator=g)]
    full_w = init_class_rows(0, num_classes, dim, 0.01, seed).to(torch.float64)
    errors = {}
    for method in methods:
        weighted = method in ("cs_ce", "cb_ce", "cb_focal", "cb_sigmoid_focal")
        ref_method = {"cb_sigmoid_focal": "sigmoid_focal"}.get(method, method)
        class_w = (dense_class_weights(counts, "cs_ce" if method == "cs_ce" else "cb", gamma=1.0, beta=0.99)
                   if weighted else torch.ones(num_classes, dtype=torch.float64))
        for name in margins:
            margin, (s, m1, m2, m3) = MARGINS[name]
            for chunk in chunk_sizes:
                head = fp.ShardedClassifier(dim, num_classes, margin=margin, scale=s if margin is None else None,
                                            dtype=torch.float64, chunk_size=chunk, seed=seed,
                                            sample_rate=sample_rate, filter_threshold=filter_threshold)
                start, stop = head.class_range
                local_counts = shard_class_counts(data_labels, head.class_range)
                sigmoid = ref_method == "sigmoid_focal"
                configure_reweighting(head, {"cb_sigmoid_focal": "cb_ce", "sigmoid_focal": "ce"}.get(method, method),
                                      local_counts, gamma=1.0, beta=0.99, focal_gamma=gamma, reduction=reduction)
                if weighted:
                    assert rel_err(head.class_weight, class_w[start:stop]) < 1e-12, "class weights differ"
                x = _local(x_all, batch_sizes, rank).clone().requires_grad_()
                y = _local(y_all, batch_sizes, rank)
                loss = ShardedSigmoidFocal(gamma, alpha, reduction, prior)(head, x, y) if sigmoid else head(x, y)
                loss.backward()
                used = _sampled_global_classes(head).sort().values
                assert sample_rate == 1.0 or used.numel() < num_classes, "Partial FC sampled every class"
                remap = torch.full((num_classes,), -1, dtype=torch.long)
                remap[used] = torch.arange(used.numel())
                ref_x, ref_w = x_all.clone().requires_grad_(), full_w[used].clone().requires_grad_()
                logits = dense_logits(ref_x, ref_w, remap[y_all], s, m1, m2, m3, filter_threshold)
                if sigmoid and prior is not None:
                    logits = logits + math.log(prior / (1 - prior))
                ref = dense_reweighted_loss(logits, remap[y_all], class_w[y_all], ref_method, gamma, alpha, reduction)
                ref.backward()
                own = (used >= start) & (used < stop)
                grad_w_ref = torch.zeros(stop - start, dim, dtype=torch.float64)
                grad_w_ref[used[own] - start] = ref_w.grad[own]
                err = {"loss": rel_err(loss.detach(), ref.detach()),
                       "grad_x": rel_err(x.grad, _local(ref_x.grad, batch_sizes, rank)),
                       "grad_w": rel_err(head.weight.grad, grad_w_ref) if stop > start else 0.0}
                bad = {k: v for k, v in err.items() if not v < 1e-6}
                assert not bad, f"rank {rank} {method} margin={name} chunk={chunk} rate={sample_rate}: {bad}"
                errors[f"{method}/{name}/{chunk}"] = err
    return errors


def zero_weight_batch_raises_everywhere(num_classes, dim):
    """All labels of the global batch have weight 0: every rank raises the same clear error."""
    head = fp.ShardedClassifier(dim, num_classes, dtype=torch.float64)
    counts = torch.ones(head.num_local, dtype=torch.long)
    configure_reweighting(head, "cs_ce", counts)
    head.set_class_weight(torch.zeros(head.num_local, dtype=torch.float64))
    try:
        head(torch.randn(3, dim, dtype=torch.float64), torch.tensor([0, 1, num_classes - 1]))
        return None
    except ValueError as exc:
        return str(exc)


def class_weight_formulas(num_classes, seed=0):
    """Per-shard CS/CB weights equal the dense formulas; CB weights sum to C over all ranks."""
    from ffc_parallel.losses import cb_weights, cs_weights
    head = fp.ShardedClassifier(4, num_classes)
    labels = long_tailed_labels(num_classes, seed)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    local = shard_class_counts(labels, head.class_range)
    start, stop = head.class_range
    out = {}
    for gamma in (0.5, 1.0, 2.0):
        w = cs_weights(local, gamma)
        assert rel_err(w, (counts.min() / counts[start:stop]) ** gamma) < 1e-12
    for beta in (0.0, 0.9, 0.999, 0.999999):
        w = cb_weights(local, beta)
        ref = (1 - beta) / (1 - beta ** counts) if beta else torch.ones_like(counts)
        ref = ref / ref.sum() * num_classes
        assert rel_err(w, ref[start:stop]) < 1e-9, (beta, w, ref[start:stop])
        total = w.sum().reshape(1)
        if dist.is_initialized():
            dist.all_reduce(total)
        assert abs(float(total) - num_classes) < 1e-9
        out[str(beta)] = float(total)
    return out


# ---------------------------------------------------------------------------- cross-batch memory
def dense_pair_loss(name, anchor, anchor_label, refs, margin=0.5, alpha=2.0, beta=50.0, base=0.5, eps=0.1):
    """One anchor's pair loss against a list of (embedding, label) references, written with lists."""
    sims = [(torch.dot(anchor, e), anchor_label == label) for e, label in refs]
    if name == "contrastive":  # else multi_similarity
        total = anchor.new_zeros(())
        for s, same in sims:
            total = total + (1 - s if same else torch.clamp(s - margin, min=0.0))
        return total
    pos = [s for s, same in sims if same]
    neg = [s for s, same in sims if not same]
    if not pos or not neg:
        return anchor.new_zeros(())
    min_pos, max_neg = min(float(s.detach()) for s in pos), max(float(s.detach()) for s in neg)
    pos = [s for s in pos if float(s.detach()) - eps < max_neg]
    neg = [s for s in neg if float(s.detach()) + eps > min_pos]
    if not pos or not neg:
        return anchor.new_zeros(())
    return (torch.log(1 + sum(torch.exp(-alpha * (s - base)) for s in pos)) / alpha
            + torch.log(1 + sum(torch.exp(beta * (s - base)) for s in neg)) / beta)


def xbm_matches_dense_all(loss_names, **kwargs):
    """:func:`xbm_matches_dense` for each pair loss in one multi-rank run."""
    return {name: xbm_matches_dense(loss_name=name, **kwargs) for name in loss_names}


def xbm_matches_dense(step_batch_sizes, size, dim, warmup, weight, loss_name, num_labels=4, seed=0):
    """Several steps of CrossBatchMemory vs a list-based dense reference: loss, local gradients,
    memory contents (identical on every rank, oldest overwritten, current batch enqueued after)."""
    from ffc_parallel.losses import ContrastiveLoss, CrossBatchMemory, MultiSimilarityLoss
    rank, world = fp.get_rank(), fp.get_world_size()
    pair = {"contrastive": ContrastiveLoss(0.5), "multi_similarity": MultiSimilarityLoss()}[loss_name]
    xbm = CrossBatchMemory(size, dim, pair, weight=weight, warmup_steps=warmup, verify=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    memory = []   # reference: list of (embedding, label), oldest first
    losses = []
    for step, batch_sizes in enumerate(step_batch_sizes):
        total = sum(batch_sizes)
        x_all = torch.randn(total, dim, generator=g, dtype=torch.float64)
        y_all = torch.randint(num_labels, (total,), generator=g)
        ref_x = x_all.clone().requires_grad_()
        xn = F.normalize(ref_x, dim=1)
        ref = 0.0 * ref_x.sum()
        for i in range(total):
            others = [(xn[j], int(y_all[j])) for j in range(total) if j != i]
            ref = ref + dense_pair_loss(loss_name, xn[i], int(y_all[i]), others)
            if step >= warmup and memory:
                ref = ref + weight * dense_pair_loss(loss_name, xn[i], int(y_all[i]), memory)
        ref = ref / total
        ref.backward()
        if step >= warmup:
            memory = (memory + [(xn[j].detach(), int(y_all[j])) for j in range(total)])[-size:]
        x = _local(x_all, batch_sizes, rank).clone().requires_grad_()
        loss = xbm(x, _local(y_all, batch_sizes, rank))
        loss.backward()
        err = {"loss": rel_err(loss.detach(), ref.detach()),
               "grad": rel_err(x.grad, _local(ref_x.grad, batch_sizes, rank)) if x.numel() else 0.0}
        assert all(v < 1e-10 for v in err.values()), f"rank {rank}/{world} step {step}: {err}"
        mem_x, mem_y = xbm.memory()
        assert mem_y.tolist() == [label for _, label in memory], f"step {step}: memory labels/order differ"
        if memory:
            assert rel_err(mem_x, torch.stack([e for e, _ in memory])) < 1e-12, f"step {step}: memory differs"
        losses.append(float(loss.detach()))
    # A memory corrupted on one rank is detected on every rank.
    detected = None
    if world > 1:
        if rank == world - 1:
            xbm.embeddings[0, 0] += 1.0
        try:
            xbm.check_consistent()
        except RuntimeError as exc:
            detected = str(exc)
    return {"losses": losses, "detected": detected}


def reweighting_suite(runs, formulas_classes=None, zero_weight_classes=None):
    """Several :func:`reweighting_matches_dense` runs, the weight formulas and the zero-weight error
    in one multi-rank job (spawns are the expensive part)."""
    out = {"runs": [reweighting_matches_dense(**kwargs) for kwargs in runs]}
    if formulas_classes:
        out["formulas"] = class_weight_formulas(formulas_classes)
    if zero_weight_classes:
        out["zero_weight_error"] = zero_weight_batch_raises_everywhere(zero_weight_classes, 4)
    return out


# ---------------------------------------------------------------------------- mixup, CAM centers
def mixup_and_centers_match_dense(num_classes, dim, batch_sizes, seed=0):
    """Input and manifold mixup with the two-target ArcFace loss on the sharded head vs a dense
    reference (the same λ on every rank, partners local); and fetch_class_centers vs the full matrix."""
    import ffc_parallel.algorithms.mixup as mixup_module
    from ffc_parallel.algorithms.cam import fetch_class_centers
    from ffc_parallel.algorithms.mixup import Mixup
    rank = fp.get_rank()
    g = torch.Generator().manual_seed(seed)
    total = sum(batch_sizes)
    inputs = torch.randn(total, 6, generator=g, dtype=torch.float64)
    y_all = torch.randint(num_classes, (total,), generator=g)
    full_w = init_class_rows(0, num_classes, dim, 0.01, seed).to(torch.float64)
    for layers in (None, ["1"]):
        torch.manual_seed(1)
        backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, dim)).double()
        head = fp.ShardedClassifier(dim, num_classes, margin="arcface", dtype=torch.float64, seed=seed)
        mixup = Mixup(alpha=1.0, layers=layers, seed=5)
        x, y = _local(inputs, batch_sizes, rank), _local(y_all, batch_sizes, rank)
        loss = mixup.forward_loss(backbone, head, x, y, step=3)
        loss.backward()
        # Dense: every rank's λ (identical) and permutation (per rank) rebuilt from the same draws.
        lams, perms = [], []
        for r in range(len(batch_sizes)):
            saved = mixup_module.get_rank
            mixup_module.get_rank = lambda r=r: r
            plan = mixup.plan(3, batch_sizes[r])
            mixup_module.get_rank = saved
            lams.append(plan.lam)
            perms.append(plan.perm + sum(batch_sizes[:r]))
        assert len(set(lams)) == 1
        lam, perm = lams[0], torch.cat(perms)
        torch.manual_seed(1)
        ref_backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, dim)).double()
        ref_w = full_w.clone().requires_grad_()
        if layers is None:
            emb = ref_backbone(lam * inputs + (1 - lam) * inputs[perm])
        else:
            hidden = ref_backbone[1](ref_backbone[0](inputs))
            emb = ref_backbone[2](lam * hidden + (1 - lam) * hidden[perm])
        ref = (lam * F.cross_entropy(dense_logits(emb, ref_w, y_all, 64.0, 1.0, 0.5, 0.0), y_all)
               + (1 - lam) * F.cross_entropy(dense_logits(emb, ref_w, y_all[perm], 64.0, 1.0, 0.5, 0.0), y_all[perm]))
        ref.backward()
        start, stop = head.class_range
        assert rel_err(loss.detach(), ref.detach()) < 1e-10, (layers, float(loss), float(ref))
        assert rel_err(head.weight.grad, ref_w.grad[start:stop]) < 1e-8
        # The backbone's gradient is the SUM over ranks of the per-rank gradients (head semantics).
        for p, q in zip(backbone.parameters(), ref_backbone.parameters()):
            grad = p.grad.clone()
            if dist.is_initialized():
                dist.all_reduce(grad)
            assert rel_err(grad, q.grad) < 1e-8, layers
    centers = fetch_class_centers(head, torch.tensor([num_classes - 1, 0, 3, 3]))
    assert torch.equal(centers, full_w[[num_classes - 1, 0, 3, 3]])
    _samplers_take_rank_and_world_from_the_process_group()
    return float(loss)


def _samplers_take_rank_and_world_from_the_process_group():
    """Default samplers pick up rank and world size; their streams partition one epoch across ranks."""
    from ffc_parallel.data.samplers import ClassProbabilitySampler, InstanceBalancedSampler
    world = fp.get_world_size()
    labels = long_tailed_labels(9, seed=0)
    for sampler in (InstanceBalancedSampler(labels, seed=4), ClassProbabilitySampler(labels, "sqrt", seed=4)):
        sampler.set_epoch(2)
        mine = torch.tensor(list(sampler))
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        merged = torch.stack(everyone, dim=1).reshape(-1)
        size = sampler.epoch_size
        assert torch.equal(merged, sampler.global_epoch().repeat(2)[: merged.numel()]), type(sampler).__name__
        assert mine.numel() == -(-size // world)
        if isinstance(sampler, InstanceBalancedSampler):
            assert set(merged.tolist()) == set(range(size))
