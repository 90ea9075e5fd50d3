"""Single-process tests: FFC's dual loader, the instance head's defaults and schedule, kNN and
linear-probe evaluation against hand-worked examples, and bad input."""
import math

import pytest
import torch

from ffc_parallel.data.dual_loader import DualBatchSampler, dual_loader, labels_of
from ffc_parallel.algorithms.instance import HardestClassSmoothing, contrastive_prior, instance_classifier
from ffc_parallel.evaluation import knn_accuracy, linear_probe_accuracy

# 12 identities with 1..6 images each (a long tail), labels interleaved and not contiguous ids
COUNTS = [6, 1, 3, 1, 2, 5, 1, 4, 2, 1, 3, 1]
LABELS = torch.cat([torch.full((c,), 100 + 7 * i) for i, c in enumerate(COUNTS)])[torch.randperm(30, generator=torch.Generator().manual_seed(0))]


def _groups(identity_part):
    """Split an identity part into its runs of images of one identity."""
    out = []
    for i in identity_part.tolist():
        if out and int(LABELS[out[-1][0]]) == int(LABELS[i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dual_sampler_identities_uniform_two_images_disjoint_ranks(world):
    id_batch, inst_batch = 2, 3
    samplers = [DualBatchSampler(LABELS, id_batch, inst_batch, rank=r, world_size=world, seed=5) for r in range(world)]
    assert len({len(s) for s in samplers}) == 1 and len(samplers[0]) == 30 // (world * inst_batch)
    epoch_ids, epoch_images = [], []
    for s in samplers:
        ids_seen, images = [], []
        for (identity_part, instance_part), batch in zip(s.parts(), s):
            assert batch == identity_part.tolist() + instance_part.tolist()
            groups, instances = _groups(identity_part), instance_part.tolist()
            assert len(groups) == id_batch
            for g in groups:
                identity = int(LABELS[g[0]])
                assert len(set(g)) == min(2, COUNTS[(identity - 100) // 7]), "two distinct images per identity"
                assert all(int(LABELS[i]) == identity for i in g)
                ids_seen.append(identity)
            assert len(instances) == inst_batch
            images += instances
        epoch_ids.append(ids_seen)
        epoch_images.append(images)
    per_pass = 12 // world
    first_passes = [ids[:per_pass] for ids in epoch_ids]
    union = [u for p in first_passes for u in p]
    assert len(union) == len(set(union)), "ranks must see disjoint identities within a pass"
    all_images = [i for imgs in epoch_images for i in imgs]
    assert len(all_images) == len(set(all_images)), "instance images must be disjoint over ranks and steps"


def test_dual_sampler_reseeds_per_epoch_and_is_reproducible():
    s = DualBatchSampler(LABELS, 2, 3, rank=0, world_size=1, seed=1)
    first = list(s)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    counts = torch.zeros(12)
    for epoch in range(30):                      # identities are drawn uniformly, whatever their size
        s.set_epoch(epoch)
        for identity_part, _ in s.parts():
            for g in _groups(identity_part):
                counts[(int(LABELS[g[0]]) - 100) // 7] += 1
    assert counts.min() == counts.max() == 50, counts   # 300 steps = 50 whole passes


def test_dual_loader_over_a_dataset_and_labels_of():
    class Data(torch.utils.data.Dataset):
        targets = LABELS.tolist()

        def __len__(self):
            return 30

        def __getitem__(self, i):
            return torch.tensor([float(i)]), int(LABELS[i])

    loader = dual_loader(Data(), 2, 4, rank=0, world_size=1)
    x, y = next(iter(loader))
    assert x.shape == (len(y), 1) and torch.equal(LABELS[x[:, 0].long()], y)
    assert torch.equal(labels_of(Data()), LABELS)
    with pytest.raises(ValueError, match="exposes no per-item labels"):
        labels_of(torch.utils.data.TensorDataset(torch.zeros(3)))
    with pytest.raises(ValueError, match="too few"):
        DualBatchSampler(LABELS, 1, 31, rank=0, world_size=1)
    with pytest.raises(ValueError, match="lower id_batch_size"):
        DualBatchSampler(LABELS, 7, 1, rank=0, world_size=2)


def test_knn_by_hand():
    train = torch.tensor([[1.0, 0.0], [math.cos(0.3), math.sin(0.3)], [math.cos(1.2), math.sin(1.2)]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[math.cos(1.0), math.sin(1.0)]])
    # cosines to the test point: cos(1.0)=0.540, cos(0.7)=0.765, cos(0.2)=0.980. k=1: class 1.
    assert knn_accuracy(train, labels, test, torch.tensor([1]), k=1) == 1.0
    # k=3, temperature 10: weights ~equal, two votes beat one -> class 0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), k=3, temperature=10.0) == 1.0
    # k=3, temperature 0.1: exp(9.80) > exp(5.40) + exp(7.65) -> class 1
    assert math.exp(9.80) > math.exp(5.40) + math.exp(7.65)
    assert knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=0.1) == 1.0


def test_linear_probe_separates_blobs_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 8, generator=g)
    assert linear_probe_accuracy(x[:60], y[:60], x[60:], y[60:]) == 1.0
    noise = torch.randn(90, 8, generator=g)
    assert linear_probe_accuracy(noise[:60], y[:60], noise[60:], y[60:]) < 0.7


def test_instance_head_defaults_schedule_and_errors():
    head = instance_classifier(10, 4)
    assert head.num_classes == 10 and abs(head.margin.s - 1 / 0.15) < 1e-12 and not head.margin.is_angular
    smoothing = HardestClassSmoothing(head, k=2, alpha=0.2, refresh_every=2)
    with pytest.raises(RuntimeError, match="refresh"):
        smoothing.soft_targets(torch.tensor([1]))
    assert [smoothing.maybe_refresh(e) for e in (0, 0, 1, 2, 3, 4)] == [True, False, False, True, False, True]
    classes, probs = smoothing.soft_targets(torch.tensor([3, 3, 0]))
    assert classes.shape == (3, 2) and torch.equal(classes[0], classes[1]) and (classes[0] != 3).all()
    assert torch.allclose(probs, torch.full((3, 2), 0.1))
    with pytest.raises(ValueError, match="k must be"):
        HardestClassSmoothing(head, k=10).refresh()
    with pytest.raises(ValueError, match="temperature"):
        instance_classifier(10, 4, temperature=0)
    with pytest.raises(ValueError, match=r"image ids must be in \[0, 10\)"):
        contrastive_prior(torch.nn.Linear(3, 4), [(torch.randn(2, 3), torch.tensor([4, 10]))], head, progress=False)
