"""Instance classification on 1, 2 and 4 real processes: the contrastive prior equals a
single-process pass, and the hardest-class neighbours and the smoothed loss on the sharded head equal
the dense reference."""
import pytest
import torch
import torch.nn.functional as F

from ffc_parallel.testing import run_ranks
from tests.cases_instance import prior_backbone, prior_batches, smoothing_matches_dense

SMOOTHING = dict(num_classes=19, dim=6, k=3, alpha=0.2, chunks=[(4096, 1024), (1, 2), (3, 5)])


def _single_process_prior(world, num_images, dim_in, dim, seed=0):
    """Each rank's batches run through the backbone (train mode) in one process, rank by rank."""
    backbone = prior_backbone(dim_in, dim, seed).train()
    centers = torch.full((num_images, dim), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for rank in range(world):
            for inputs, ids in prior_batches(rank, world, num_images, dim_in, seed):
                centers[ids] = F.normalize(backbone(inputs), dim=1)
    return centers


def test_smoothing_one_process():
    smoothing_matches_dense(batch_sizes=[7], **SMOOTHING)


@pytest.mark.parametrize("world", [2, 4])
def test_prior_and_smoothing_on_w_ranks(world):
    prior = dict(num_images=23, dim_in=5, dim=4)
    results = run_ranks("tests.cases_instance:instance_checks", world, timeout=120, kwargs=dict(
        prior_kwargs=prior, smoothing_kwargs=dict(batch_sizes=[3, 1, 4, 0][:world], **SMOOTHING)))
    expected = _single_process_prior(world, **prior)
    fresh_bn = prior_backbone(5, 4, 0)[1].running_mean
    for r in (r["prior"] for r in results):
        assert r["written"] == 23
        assert torch.allclose(torch.tensor(r["centers"], dtype=torch.float64), expected, rtol=0, atol=1e-12)
        assert torch.equal(torch.tensor(r["running_mean"], dtype=torch.float64), fresh_bn), "BN statistics changed"
    assert len({r["prior"]["batches"] for r in results}) > 1, "ranks should hold different numbers of batches"
