"""Distributed long-tail samplers: partition across ranks, reseeding, exact length, class frequencies."""
import math

import pytest
import torch

from ffc_parallel.data.samplers import (ClassIndex, ClassProbabilitySampler, DeferredResampling,
                                        InstanceBalancedSampler, RandomOverSampler, RandomUnderSampler)

COUNTS = torch.tensor([400, 200, 120, 60, 30, 15, 8, 4, 2, 1, 0, 1])   # class 10 has no sample


def _labels(counts=COUNTS, seed=0):
    labels = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _chi2(observed, expected):
    keep = expected > 0
    assert not observed[~keep].any(), "a class of probability 0 was drawn"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def _assert_frequencies(sampled_labels, probs, other_probs=None):
    """Pearson chi-square against ``probs`` below a far-tail bound (df + 6 sqrt(2 df)); and, for power,
    far above it against a different formula."""
    observed = torch.bincount(sampled_labels, minlength=probs.numel()).double()
    stat, df = _chi2(observed, probs * observed.sum())
    assert stat < df + 6 * math.sqrt(2 * df), (stat, df)
    if other_probs is not None:
        wrong, _ = _chi2(observed, other_probs * observed.sum()) if (other_probs > 0).all() else (math.inf, 0)
        assert wrong > 10 * (df + 6 * math.sqrt(2 * df)), wrong


def _all_ranks(make, world):
    samplers = [make(rank) for rank in range(world)]
    return samplers, [list(s) for s in samplers]


def _probs(weights):
    weights = weights.double()
    return weights / weights.sum()


def test_class_index_is_csr_of_labels():
    labels = _labels()
    index = ClassIndex(labels)
    assert torch.equal(index.counts, COUNTS)
    for c in range(COUNTS.numel()):
        members = index.order[index.offsets[c]: index.offsets[c + 1]]
        assert torch.equal(members.sort().values, (labels == c).nonzero()[:, 0])
    drawn = index.draw(torch.tensor([0, 9, 11, 3] * 50), torch.Generator().manual_seed(1))
    assert torch.equal(labels[drawn], torch.tensor([0, 9, 11, 3] * 50))


@pytest.mark.parametrize("world,drop_last", [(1, False), (3, False), (4, True), (4, False)])
def test_ranks_are_disjoint_parts_of_one_epoch_with_equal_exact_length(world, drop_last):
    labels = _labels()
    makers = {
        "instance": lambda r: InstanceBalancedSampler(labels, rank=r, world_size=world, seed=3, drop_last=drop_last),
        "class": lambda r: ClassProbabilitySampler(labels, "class_balanced", num_samples=1001, rank=r,
                                                   world_size=world, seed=3, drop_last=drop_last),
        "over": lambda r: RandomOverSampler(labels, rank=r, world_size=world, seed=3, drop_last=drop_last),
        "under": lambda r: RandomUnderSampler(labels, target=5, rank=r, world_size=world, seed=3, drop_last=drop_last),
    }
    for name, make in makers.items():
        samplers, streams = _all_ranks(make, world)
        size = samplers[0].epoch_size
        per_rank = size // world if drop_last else math.ceil(size / world)
        assert all(len(s) == per_rank == len(stream) for s, stream in zip(samplers, streams)), name
        epoch = samplers[0].global_epoch()
        assert all(torch.equal(s.global_epoch(), epoch) for s in samplers), f"{name}: ranks disagree on the epoch"
        # Interleaving the ranks' streams gives back the global epoch (padded by wrapping / cut).
        merged = torch.tensor(streams).t().reshape(-1)
        expected = epoch.repeat(2)[: per_rank * world]
        assert torch.equal(merged, expected), name
    # Without replacement and no padding needed, the ranks' sets partition the data set.
    if world in (1, 4) and drop_last is False:
        samplers, streams = _all_ranks(lambda r: InstanceBalancedSampler(840, rank=r, world_size=world), world)
        assert sorted(sum(streams, [])) == list(range(840))


def test_reseeded_by_set_epoch_and_reproducible():
    labels = _labels()
    for sampler in (InstanceBalancedSampler(labels, rank=0, world_size=2),
                    ClassProbabilitySampler(labels, "sqrt", rank=0, world_size=2),
                    RandomOverSampler(labels, rank=0, world_size=2), RandomUnderSampler(labels, 4, rank=0, world_size=2)):
        first = list(sampler)
        assert list(sampler) == first, "the same epoch must give the same order"
        sampler.set_epoch(1)
        second = list(sampler)
        assert second != first, type(sampler).__name__
        sampler.set_epoch(0)
        assert list(sampler) == first


@pytest.mark.parametrize("scheme", ["class_balanced", "sqrt", "instance", 0.25])
def test_class_frequencies_follow_the_formula(scheme):
    labels = _labels()
    sampler = ClassProbabilitySampler(labels, scheme, num_samples=40_000, rank=0, world_size=1, seed=11)
    formula = {"class_balanced": (COUNTS > 0).double(), "sqrt": COUNTS.double() ** 0.5,
               "instance": COUNTS.double(), 0.25: COUNTS.double() ** 0.25}[scheme]
    other = COUNTS.double() if scheme != "instance" else (COUNTS > 0).double()
    _assert_frequencies(labels[sampler.global_epoch()], _probs(formula), _probs(other))


def test_progressive_frequencies_move_from_instance_to_class_balanced():
    labels = _labels()
    total = 8
    sampler = ClassProbabilitySampler(labels, "progressive", num_samples=40_000, total_epochs=total, world_size=1,
                                      rank=0)
    instance, balanced = _probs(COUNTS), _probs(COUNTS > 0)
    for epoch in (0, 2, 5, 8, 11):
        sampler.set_epoch(epoch)
        t = min(epoch, total) / total
        expected = t * balanced + (1 - t) * instance
        assert torch.allclose(sampler.probabilities(), expected)
        _assert_frequencies(labels[sampler.global_epoch()], expected)


def test_instances_inside_a_class_are_uniform():
    labels = _labels()
    sampler = ClassProbabilitySampler(labels, "class_balanced", num_samples=30_000, world_size=1, rank=0, seed=5)
    drawn = sampler.global_epoch()
    of_class_1 = drawn[labels[drawn] == 1]
    members = (labels == 1).nonzero()[:, 0]
    observed = (of_class_1.unsqueeze(1) == members.unsqueeze(0)).sum(0).double()
    stat, df = _chi2(observed, torch.full_like(observed, observed.sum() / members.numel()))
    assert stat < df + 6 * math.sqrt(2 * df)


def test_over_and_under_sampling_counts():
    labels = _labels()
    over = RandomOverSampler(labels, world_size=1, rank=0)
    epoch = over.global_epoch()
    assert torch.equal(torch.bincount(labels[epoch], minlength=12), torch.where(COUNTS > 0, 400, 0))
    assert torch.isin(torch.arange(labels.numel()), epoch).all(), "over-sampling must keep every sample"
    under = RandomUnderSampler(labels, world_size=1, rank=0)
    assert under.target == 1
    under = RandomUnderSampler(labels, target=10, world_size=1, rank=0)
    subsets = []
    for e in range(2):
        under.set_epoch(e)
        epoch = under.global_epoch()
        assert epoch.unique().numel() == epoch.numel(), "under-sampling draws without replacement"
        assert torch.equal(torch.bincount(labels[epoch], minlength=12), COUNTS.clamp_max(10))
        subsets.append(set(epoch.tolist()))
    assert subsets[0] != subsets[1], "a new subset every epoch"


def test_millions_of_classes_vectorised():
    g = torch.Generator().manual_seed(0)
    num_classes = 2_000_000
    labels = torch.cat([torch.arange(num_classes), torch.randint(1000, (500_000,), generator=g)])
    sampler = ClassProbabilitySampler(labels, "class_balanced", num_samples=200_000, rank=1, world_size=4)
    indices = torch.tensor(list(sampler))
    assert indices.numel() == 50_000
    # Class-balanced over 2M classes: the 1000 head classes hold 20% of the data but ~0.05% of the draws.
    assert (labels[indices] < 1000).double().mean() < 0.003
    sampler = ClassProbabilitySampler(labels, "progressive", total_epochs=10, num_samples=100_000, world_size=1, rank=0)
    assert sampler.global_epoch().numel() == 100_000


def test_bad_arguments_have_clear_errors():
    labels = _labels()
    with pytest.raises(ValueError, match="unknown sampling scheme"):
        ClassProbabilitySampler(labels, "balanced", world_size=1, rank=0)
    with pytest.raises(ValueError, match="total_epochs"):
        ClassProbabilitySampler(labels, "progressive", world_size=1, rank=0)
    with pytest.raises(ValueError, match="integer class ids"):
        ClassIndex(labels.float())
    with pytest.raises(ValueError, match="rank must be in"):
        InstanceBalancedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="leaves nothing"):
        InstanceBalancedSampler(3, rank=0, world_size=4, drop_last=True)


def test_deferred_resampling_switches_at_the_epoch():
    labels = _labels()
    before = InstanceBalancedSampler(labels, world_size=1, rank=0)
    after = ClassProbabilitySampler(labels, "class_balanced", world_size=1, rank=0)
    drs = DeferredResampling(3, before, after)
    assert drs.sampler(2) is before and before.epoch == 2
    assert drs.sampler(3) is after and after.epoch == 3 and drs.switches_at(3) and not drs.switches_at(4)
    assert drs.sampler(7) is after and after.epoch == 7
