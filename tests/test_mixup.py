"""Input and manifold mixup: λ shared by all ranks, exact mixing, hooks by module name, two-target
losses on the margin head vs a dense reference on 2 real ranks, fine-tuning switch."""
import numpy as np
import pytest
import torch
from torch import nn

import ffc_parallel as fp
from ffc_parallel.algorithms.mixup import Mixup
from ffc_parallel.testing import run_ranks


def _backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                         nn.Linear(8, 5)).double()


def test_lambda_is_beta_distributed_and_the_same_for_every_rank(monkeypatch):
    for alpha in (1.0, 0.2):
        mixup = Mixup(alpha=alpha, seed=7)
        lams = np.array([mixup.plan(step, 4).lam for step in range(4000)])
        var = 1.0 / (4 * (2 * alpha + 1))            # Beta(α, α): mean 1/2, variance 1/(4(2α+1))
        assert abs(lams.mean() - 0.5) < 4 * np.sqrt(var / 4000)
        assert abs(lams.var() - var) < 0.1 * var
    plans = []
    for rank in (0, 3):
        monkeypatch.setattr("ffc_parallel.algorithms.mixup.get_rank", lambda rank=rank: rank)
        plans.append(Mixup(seed=1, layers=["input", "2"]).plan(5, 16))
    assert plans[0].lam == plans[1].lam and plans[0].layer == plans[1].layer, "λ and layer must not depend on rank"
    assert not torch.equal(plans[0].perm, plans[1].perm), "partners are drawn per rank"
    assert sorted(plans[0].perm.tolist()) == list(range(16))


def test_input_mixup_mixes_inputs_exactly():
    backbone, mixup = _backbone(), Mixup(alpha=1.0, seed=3)
    x = torch.randn(6, 6, dtype=torch.float64)
    emb, plan = mixup.forward_embeddings(backbone, x, step=11)
    assert plan.layer == "input"
    expected = backbone(plan.lam * x + (1 - plan.lam) * x[plan.perm])
    assert torch.allclose(emb, expected)


def test_manifold_mixup_mixes_the_named_layer_and_removes_its_hook():
    backbone, mixup = _backbone(), Mixup(alpha=1.0, layers=["2.0"], seed=3)
    x = torch.randn(6, 6, dtype=torch.float64)
    emb, plan = mixup.forward_embeddings(backbone, x, step=4)
    hidden = backbone[2][0](backbone[1](backbone[0](x)))
    hidden = plan.lam * hidden + (1 - plan.lam) * hidden[plan.perm]
    assert torch.allclose(emb, backbone[3](backbone[2][1](hidden)))
    assert torch.allclose(backbone(x), backbone[3](backbone[2](backbone[1](backbone[0](x))))), "hook left behind"
    with pytest.raises(ValueError, match="no module 'layer9'"):
        Mixup(layers=["layer9"]).forward_embeddings(backbone, x, step=0)


def test_fine_tuning_after_mixup_switches_it_off():
    mixup = Mixup(stop_epoch=3)
    assert [mixup.active(e) for e in range(5)] == [True, True, True, False, False]
    assert Mixup().active(10_000)


def test_two_target_loss_single_process_equals_two_head_calls():
    head = fp.ShardedClassifier(5, 7, margin="cosface", dtype=torch.float64)
    mixup = Mixup(seed=2)
    emb = torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 3])
    plan = mixup.plan(0, 4)
    loss = Mixup.two_target_loss(head, emb, labels, plan)
    assert torch.allclose(loss, plan.lam * head(emb, labels) + (1 - plan.lam) * head(emb, labels[plan.perm]))


def test_two_target_loss_on_two_ranks_matches_dense_reference():
    # The same 2-rank job also checks fetch_class_centers and that samplers built without rank/world
    # arguments read them from the process group (tests/cases_longtail.py).
    run_ranks("tests.cases_longtail:mixup_and_centers_match_dense", 2, timeout=120,
              kwargs=dict(num_classes=11, dim=5, batch_sizes=[4, 3]))
