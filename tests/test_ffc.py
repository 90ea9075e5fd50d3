"""FFC on one process: LRU and pool update rules worked by hand, the loss on a hand-computed example,
EMA exactness, state_dict round trip, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import ffc_parallel as fp
from ffc_parallel.algorithms.ffc import FFC, ClassPool, ema_update_, pool_loss
from tests.cases_ffc import ReferencePool, dense_pool_loss, ffc_train


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


def _update(pool, ids, feats=None):
    ids = torch.tensor(ids)
    if feats is None:
        feats = F.normalize(torch.ones(len(ids), pool.embedding_dim, dtype=torch.float64), dim=1)
    return pool.update(feats, ids)


def test_lru_eviction_by_hand():
    pool = ClassPool(3, 2, refresh_momentum=0.0, dtype=torch.float64)
    assert _update(pool, [5, 6]) == {"refreshed": 0, "inserted": 2, "dropped": 0, "evicted_here": 0}
    assert pool.ids.tolist() == [5, 6, -1] and pool.stamps.tolist() == [1, 1, -1]
    _update(pool, [7])                                     # the empty slot is used before any eviction
    assert pool.ids.tolist() == [5, 6, 7] and pool.stamps.tolist() == [1, 1, 2]
    _update(pool, [6])                                     # refresh: 6 becomes most recently used
    assert pool.stamps.tolist() == [1, 3, 2]
    assert _update(pool, [8])["evicted_here"] == 1         # 5 is least recently used
    assert pool.ids.tolist() == [8, 6, 7] and pool.lookup(torch.tensor([5, 8, 6])).tolist() == [-1, 0, 1]
    # 8 is refreshed; fresh 9, 10, 11 in order of appearance take LRU slots 2 (stamp 2) then 1 (stamp 3);
    # 11 finds no slot that this step's identities do not hold and is dropped.
    stats = _update(pool, [9, 8, 10, 11, 9])
    assert stats == {"refreshed": 1, "inserted": 2, "dropped": 1, "evicted_here": 2}
    assert pool.ids.tolist() == [8, 10, 9] and pool.stamps.tolist() == [5, 5, 5]
    assert pool.lookup(torch.tensor([11, 9, 10, 7, 6])).tolist() == [-1, 2, 1, -1, -1]


def test_ties_in_lru_go_to_the_lower_slot_and_large_identity_ids_work():
    pool = ClassPool(4, 2, dtype=torch.float64)
    big = 10**12
    _update(pool, [big + 3, big + 1, big + 2, big])        # all stamp 1, inserted in order of appearance
    assert pool.ids.tolist() == [big + 3, big + 1, big + 2, big]
    _update(pool, [big + 1, 7, 8])                         # two victims among stamp-1 slots 0, 2, 3
    assert pool.ids.tolist() == [7, big + 1, 8, big]


def test_refresh_and_insert_features():
    pool = ClassPool(2, 2, refresh_momentum=0.25, dtype=torch.float64)
    pool.update(_unit([1, 0], [1, 1]), torch.tensor([4, 4]))              # mean of two images of identity 4
    assert torch.allclose(pool.features[0], _unit([1 + 1 / math.sqrt(2), 1 / math.sqrt(2)])[0])
    old = pool.features[0].clone()
    pool.update(_unit([0, 1]), torch.tensor([4]))
    expected = F.normalize(0.25 * old + 0.75 * torch.tensor([0.0, 1.0], dtype=torch.float64), dim=0)
    assert torch.allclose(pool.features[0], expected, atol=1e-15)
    assert pool.ids.tolist() == [4, -1]


def test_reference_pool_agrees_on_a_long_random_stream():
    pool, ref = ClassPool(5, 3, dtype=torch.float64), ReferencePool(5, 3, 0.5)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        feats = F.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1)
        ids = torch.randint(9, (6,), generator=g)
        pool.update(feats, ids)
        ref.update(feats, ids)
        assert pool.ids.tolist() == ref.ids and pool.stamps.tolist() == ref.stamps
        assert torch.allclose(pool.features, ref.features, atol=1e-12)


def test_loss_on_a_hand_computed_example():
    # pool: identity 10 at (1, 0), identity 20 at (0, 1). Sample 0: label 10 at 45 degrees; sample 1: fresh.
    pool = ClassPool(3, 2, dtype=torch.float64)
    pool.update(_unit([1, 0], [0, 1]), torch.tensor([10, 20]))
    probe = _unit([1, 1], [3, 1])
    slots = pool.lookup(torch.tensor([10, 30]))
    assert slots.tolist() == [0, -1]
    c = 1 / math.sqrt(2)
    # plain cosine softmax, s = 2: both logits 2c, so CE = log 2; fresh: top-1 cosine = 3/sqrt(10)
    loss, stats = pool_loss(probe, slots, pool, fp.CombinedMargin(2.0), topk=1, fresh_weight=0.5)
    assert stats == {"existing": 1, "fresh": 1, "topk": 1}
    assert abs(float(loss) - (math.log(2) + 0.5 * 3 / math.sqrt(10)) / 2) < 1e-12
    # CosFace s = 2, m3 = 0.4: target 2(c - 0.4) vs other 2c; top-2 mean for the fresh sample
    loss, _ = pool_loss(probe, slots, pool, fp.CombinedMargin(2.0, 1.0, 0.0, 0.4), topk=2, fresh_weight=1.0)
    ce = math.log(math.exp(2 * (c - 0.4)) + math.exp(2 * c)) - 2 * (c - 0.4)
    assert abs(float(loss) - (ce + (3 + 1) / math.sqrt(10) / 2) / 2) < 1e-12


def test_loss_against_dense_reference_with_arcface_and_empty_pool():
    g = torch.Generator().manual_seed(1)
    pool = ClassPool(6, 4, dtype=torch.float64)
    probe = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 9, 2, 0])
    loss, _ = pool_loss(F.normalize(probe, dim=1), pool.lookup(labels), pool, fp.CombinedMargin(16, 1, 0.5, 0))
    loss.backward()                                         # empty pool: loss 0, graph still connected
    assert float(loss.detach()) == 0.0 and probe.grad is not None and float(probe.grad.abs().sum()) == 0.0
    pool.update(F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1), torch.tensor([0, 1, 3, 4]))
    probe.grad = None
    loss, _ = pool_loss(F.normalize(probe, dim=1), pool.lookup(labels), pool, fp.CombinedMargin(16, 1, 0.5, 0),
                        topk=3, fresh_weight=2.0)
    loss.backward()
    ref_probe = probe.detach().clone().requires_grad_()
    ref = dense_pool_loss(ref_probe, pool.features, pool.ids.tolist(), labels, 16, 1, 0.5, 0, 3, 2.0)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12) and torch.allclose(probe.grad, ref_probe.grad, rtol=1e-10, atol=1e-14)


def test_ema_gallery_exact():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)).double()
    model = FFC(backbone, 2, pool_size=4, gallery_momentum=0.9).double()
    assert all(not p.requires_grad for p in model.gallery.parameters())
    assert len(list(model.trainable_parameters())) == len(list(backbone.parameters()))
    expected = [p.detach().clone() for p in model.gallery.parameters()]
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.3)
    for step in range(4):
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(5, (6,))
        probe_now = [p.detach().clone() for p in model.probe.parameters()]
        loss = model(x, y)                       # the forward moves the gallery first: g = 0.9 g + 0.1 p
        expected = [0.9 * e + 0.1 * p for e, p in zip(expected, probe_now)]
        for g, e in zip(model.gallery.parameters(), expected):
            assert (g.detach() - e).abs().max() <= 1e-15 * e.abs().max(), f"step {step}: not the EMA"
        opt.zero_grad()
        loss.backward()
        assert all(g.grad is None for g in model.gallery.parameters())
        opt.step()
    model.eval()
    before = [p.detach().clone() for p in model.gallery.parameters()]
    ids_before = model.pool.ids.clone()
    model(torch.randn(6, 3, dtype=torch.float64), torch.randint(5, (6,)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.gallery.parameters()))
    assert torch.equal(ids_before, model.pool.ids), "evaluation must not change the pool"
    model.train()
    model.update_gallery()                       # buffers (BatchNorm statistics) are copied from the probe
    assert torch.equal(model.gallery[1].running_mean, model.probe[1].running_mean)
    assert torch.equal(model.gallery[1].num_batches_tracked, model.probe[1].num_batches_tracked)
    frozen, copy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema_update_(copy, frozen, 0.0)
    assert torch.equal(copy.weight, frozen.weight)


def test_state_dict_round_trip_restores_pool_gallery_and_index():
    torch.manual_seed(0)
    model = FFC(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double(),
                4, 7).double()
    state = model.state_dict()
    assert {"pool.features", "pool.ids", "pool.stamps", "pool.clock"} <= set(state)
    assert any(k.startswith("gallery.") for k in state)
    model.pool.update(F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1), torch.tensor([3, 4, 5]))
    other = FFC(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double(),
                4, 7).double()
    other.load_state_dict(model.state_dict())
    assert other.pool.lookup(torch.tensor([3, 4, 5, 6])).tolist() == model.pool.lookup(torch.tensor([3, 4, 5, 6])).tolist()


def test_uninterrupted_and_resumed_training_agree(tmp_path):
    straight = ffc_train([6], steps=5)
    resumed = ffc_train([6], steps=5, checkpoint_at=2, checkpoint_dir=str(tmp_path))
    assert straight == resumed


def test_grad_multiplier_scales_only_the_probe_gradient():
    grads = []
    for multiplier in (1.0, 3.0):
        torch.manual_seed(0)
        model = FFC(torch.nn.Linear(3, 2).double(), 2, pool_size=4, grad_multiplier=multiplier).double()
        x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 2])
        model(x, y)                                    # fills the pool
        loss = model(x, y)
        loss.backward()
        grads.append((float(loss.detach()), model.probe.weight.grad.clone()))
    assert grads[0][0] == grads[1][0] and torch.allclose(grads[1][1], 3 * grads[0][1], rtol=1e-14)
    assert grads[0][1].abs().sum() > 0 and torch.isfinite(grads[0][1]).all()


def test_arcface_gradient_is_finite_when_the_probe_equals_its_pool_feature():
    pool = ClassPool(2, 2, dtype=torch.float64)
    pool.update(_unit([1, 0], [0, 1]), torch.tensor([3, 4]))
    probe = _unit([1, 0]).requires_grad_()
    loss, _ = pool_loss(probe, pool.lookup(torch.tensor([3])), pool, fp.CombinedMargin(64, 1, 0.5, 0))
    loss.backward()
    assert torch.isfinite(probe.grad).all()


def test_bad_input():
    with pytest.raises(ValueError, match="pool_size"):
        ClassPool(0, 4)
    pool = ClassPool(3, 2)
    with pytest.raises(ValueError, match=">= 0"):
        pool.update(torch.ones(1, 2), torch.tensor([-1]))
    with pytest.raises(ValueError, match="expected features"):
        pool.update(torch.ones(2, 3), torch.tensor([1, 2]))
    model = FFC(torch.nn.Linear(3, 2), 2, pool_size=4)
    with pytest.raises(ValueError, match="identity labels must be >= 0"):
        model(torch.randn(2, 3), torch.tensor([0, -5]))
    with pytest.raises(ValueError, match="embedding dim is 2 but the pool's embedding_dim is 3"):
        FFC(torch.nn.Linear(3, 2), 3, pool_size=4)(torch.randn(2, 3), torch.tensor([0, 1]))
