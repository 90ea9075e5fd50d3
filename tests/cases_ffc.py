"""FFC references and per-rank bodies of the multi-rank FFC tests (run through run_ranks).

The references are written from the rule in docs/ffc.md, independently of ffc_parallel.algorithms.ffc: a
plain-Python LRU pool (lists and dicts) and a dense float64 loss over the full pool matrix.
"""
import os

import torch
import torch.nn.functional as F

import ffc_parallel as fp
from ffc_parallel.algorithms.ffc import FFC, ClassPool, pool_loss
from tests.reference import margin_target, rel_err


class ReferencePool:
    """The documented pool update rule on one process, with Python lists."""

    def __init__(self, size, dim, refresh_momentum):
        self.size, self.m = size, refresh_momentum
        self.ids, self.stamps = [-1] * size, [-1] * size
        self.features = torch.zeros(size, dim, dtype=torch.float64)
        self.clock = 0

    def slot_of(self, identity):
        return self.ids.index(identity) if identity in self.ids else -1

    def update(self, features, identities):
        self.clock += 1
        order, groups = [], {}
        for b, u in enumerate(identities.tolist()):
            if u not in groups:
                order.append(u)
                groups[u] = []
            groups[u].append(features[b].double())
        means = {u: F.normalize(torch.stack(v).sum(0), dim=0) for u, v in groups.items()}
        fresh = []
        for u in order:
            s = self.slot_of(u)
            if s >= 0:
                self.features[s] = F.normalize(self.m * self.features[s] + (1 - self.m) * means[u], dim=0)
                self.stamps[s] = self.clock
            else:
                fresh.append(u)
        for u in fresh:
            free = [s for s in range(self.size) if self.stamps[s] < self.clock]
            if not free:
                break  # dropped
            victim = min(free, key=lambda s: (self.stamps[s], s))
            self.ids[victim], self.stamps[victim] = u, self.clock
            self.features[victim] = means[u]


def dense_pool_loss(probe, pool_features, pool_ids, labels, s, m1, m2, m3, topk, fresh_weight):
    """Dense float64 FFC loss: probe[B, D] (raw), full pool [P, D] with ids [P] (-1 empty)."""
    p = F.normalize(probe, dim=1)
    filled = [j for j, u in enumerate(pool_ids) if u >= 0]
    feats = pool_features[filled]
    ids = [pool_ids[j] for j in filled]
    cos = p @ feats.t()
    total = probe.sum() * 0
    for b, y in enumerate(labels.tolist()):
        if y in ids:
            t = ids.index(y)
            logits = s * cos[b]
            logits = torch.cat([logits[:t], margin_target(cos[b, t:t + 1], s, m1, m2, m3), logits[t + 1:]])
            total = total + torch.logsumexp(logits, 0) - logits[t]
        elif feats.shape[0]:
            k = min(topk, feats.shape[0])
            total = total + fresh_weight * cos[b].topk(k).values.mean()
    return total / probe.shape[0]


def _pool_batch(step, batch, dim, num_ids, seed):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1), \
        torch.randint(num_ids, (batch,), generator=g)


def pool_updates_match_reference(pool_size, dim, steps, batch, num_ids, refresh_momentum=0.5, seed=0):
    """Slot-sharded pool vs the Python reference after every update; lookups agree on all ranks."""
    pool = ClassPool(pool_size, dim, refresh_momentum=refresh_momentum, dtype=torch.float64)
    ref = ReferencePool(pool_size, dim, refresh_momentum)
    lookups = []
    for step in range(steps):
        feats, ids = _pool_batch(step, batch, dim, num_ids, seed)
        probe_ids = torch.arange(num_ids)
        slots = pool.lookup(probe_ids)
        assert slots.tolist() == [ref.slot_of(u) for u in probe_ids.tolist()], f"step {step}: lookup differs"
        lookups.append(slots.tolist())
        pool.update(feats, ids)
        ref.update(feats, ids)
        full = pool.full_state()
        assert full["ids"].tolist() == ref.ids, f"step {step}: ids {full['ids'].tolist()} != {ref.ids}"
        assert full["stamps"].tolist() == ref.stamps, f"step {step}: stamps differ"
        assert rel_err(full["features"], ref.features) < 1e-12, f"step {step}: features differ"
        assert int(full["clock"]) == ref.clock
    n_local = pool.slot_range[1] - pool.slot_range[0]
    assert pool.features.shape == (n_local, dim), "a rank holds more than its slots"
    return {"lookups": lookups, "ids": ref.ids, "slot_range": list(pool.slot_range)}


def pool_loss_matches_dense(pool_size, dim, batch_sizes, num_ids, margins, topk=3, fresh_weight=0.7,
                            empty_slots=2, seed=0):
    """Loss and probe gradients of pool_loss vs the dense float64 reference, sharded pool."""
    rank = fp.get_rank()
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(pool_size, dim, generator=g, dtype=torch.float64), dim=1)
    ids = torch.randperm(num_ids, generator=g)[:pool_size]
    ids[torch.randperm(pool_size, generator=g)[:empty_slots]] = -1
    total = sum(batch_sizes)
    probe = torch.randn(total, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(num_ids, (total,), generator=g)
    out = {}
    for name, (margin, (s, m1, m2, m3)) in margins.items():
        pool = ClassPool(pool_size, dim, dtype=torch.float64)
        pool.load_full_state({"features": feats, "ids": ids, "stamps": torch.zeros(pool_size, dtype=torch.long),
                              "clock": torch.tensor(1)})
        lo = sum(batch_sizes[:rank])
        x = probe[lo: lo + batch_sizes[rank]].clone().requires_grad_()
        y = labels[lo: lo + batch_sizes[rank]]
        x_all = F.normalize(fp.distributed.collectives.gather_rows(x, batch_sizes), dim=1)
        y_all = fp.distributed.collectives.gather_rows(y, batch_sizes)
        loss, stats = pool_loss(x_all, pool.lookup(y_all), pool, fp.heads.resolve_margin(margin, s), topk, fresh_weight)
        loss.backward()
        ref_x = probe.clone().requires_grad_()
        ref = dense_pool_loss(ref_x, feats, ids.tolist(), labels, s, m1, m2, m3, topk, fresh_weight)
        ref.backward()
        err = {"loss": rel_err(loss.detach(), ref.detach()), "grad": rel_err(x.grad, ref_x.grad[lo: lo + batch_sizes[rank]])}
        assert err["loss"] < 1e-10 and err["grad"] < 1e-9, f"rank {rank} {name}: {err}"
        assert stats["existing"] > 0 and stats["fresh"] > 0, stats
        out[name] = err
    return out


def _ffc_model(dim_in, dim, pool_size, seed, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(dim_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim)).to(dtype)
    return FFC(backbone, dim, pool_size, **kwargs).to(dtype)


def _ffc_batch(step, batch_sizes, dim_in, num_ids, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed * 7919 + step)
    total = sum(batch_sizes)
    return torch.randn(total, dim_in, generator=g, dtype=dtype), torch.randint(num_ids, (total,), generator=g)


def ffc_train(batch_sizes, steps, dim_in=6, dim=4, pool_size=7, num_ids=12, seed=0, lr=0.5,
              checkpoint_at=None, checkpoint_dir=None, momentum=0.9, dtype="float64"):
    """Train FFC for ``steps`` SGD steps on a fixed global batch stream split by ``batch_sizes``.

    The probe's gradient is summed over ranks (the head's gradient semantics). With ``checkpoint_at``,
    the model and optimizer are saved after that step, rebuilt from scratch and loaded. Returns the
    losses, the assembled pool and the parameters (JSON) for comparison across world sizes.
    """
    import torch.distributed as dist

    rank, world = fp.get_rank(), fp.get_world_size()
    dtype = getattr(torch, dtype)
    model = _ffc_model(dim_in, dim, pool_size, seed, dtype, topk=2, scale=8.0, gallery_momentum=0.9)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        x_all, y_all = _ffc_batch(step, batch_sizes, dim_in, num_ids, seed, dtype)
        lo = sum(batch_sizes[:rank])
        loss = model(x_all[lo: lo + batch_sizes[rank]], y_all[lo: lo + batch_sizes[rank]])
        opt.zero_grad()
        loss.backward()
        if world > 1:
            for p in model.trainable_parameters():
                dist.all_reduce(p.grad)
        opt.step()
        losses.append(float(loss.detach()))
        if checkpoint_at is not None and step == checkpoint_at:
            path = os.path.join(checkpoint_dir, f"rank{rank}.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
            model = _ffc_model(dim_in, dim, pool_size, seed + 1, dtype, topk=2, scale=8.0, gallery_momentum=0.9)
            opt = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=momentum)
            state = torch.load(path)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
    full = model.pool.full_state()
    return {"losses": losses, "pool_ids": full["ids"].tolist(), "pool_stamps": full["stamps"].tolist(),
            "pool_features": full["features"].tolist(),
            "probe": [p.detach().flatten().tolist() for p in model.probe.parameters()],
            "gallery": [p.detach().flatten().tolist() for p in model.gallery.parameters()]}


def ffc_bad_labels(bad_rank=1):
    """A negative identity on one rank: the same ValueError on every rank, then the model still works."""
    rank = fp.get_rank()
    model = _ffc_model(6, 4, 5, 0)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = torch.tensor([1, -2 if rank == bad_rank else 2, 3])
    try:
        model(x, y)
        message = None
    except ValueError as exc:
        message = str(exc)
    loss = model(x, torch.tensor([1, 2, 3]))
    return {"message": message, "recovered": bool(torch.isfinite(loss))}


def pool_checks(pool_kwargs, loss_kwargs, bad_rank):
    """One spawn for the pool rules, the loss vs dense and bad input (keeps the suite fast)."""
    return {"pool": pool_updates_match_reference(**pool_kwargs), "loss": pool_loss_matches_dense(**loss_kwargs),
            "bad": ffc_bad_labels(bad_rank)}



def ffc_deepspeed_train(batch_sizes, steps, stage, dim_in=6, dim=4, pool_size=7, num_ids=12, seed=0, lr=0.5):
    """FFC given to deepspeed.initialize (SGD momentum 0.9, ZeRO ``stage``, fp32, no clipping: DeepSpeed's
    default ``gradient_clipping`` is 1.0); FFC finds DeepSpeed's averaging itself (no ``grad_multiplier``);
    the same data stream as ffc_train."""
    import importlib

    import deepspeed

    # Skip DeepSpeed's JIT-compiled CPU shm all-reduce (inference only; a build killed mid-way leaves a
    # file lock that hangs every later start), as tests/cases_engine.py does.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    rank, world = fp.get_rank(), fp.get_world_size()
    model = _ffc_model(dim_in, dim, pool_size, seed, torch.float32, topk=2, scale=8.0, gallery_momentum=0.9)
    config = {"train_micro_batch_size_per_gpu": batch_sizes[rank], "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": lr, "momentum": 0.9}}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.trainable_parameters()), config=config)
    losses = []
    for step in range(steps):
        x_all, y_all = _ffc_batch(step, batch_sizes, dim_in, num_ids, seed, torch.float32)
        lo = sum(batch_sizes[:rank])
        loss = engine(x_all[lo: lo + batch_sizes[rank]], y_all[lo: lo + batch_sizes[rank]])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    full = model.pool.full_state()
    return {"losses": losses, "pool_ids": full["ids"].tolist(), "pool_features": full["features"].tolist(),
            "probe": [p.detach().flatten().tolist() for p in model.probe.parameters()],
            "gallery": [p.detach().flatten().tolist() for p in model.gallery.parameters()]}
