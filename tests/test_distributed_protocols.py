"""The rank protocols of ``ffc_parallel.distributed`` (checks, lockstep, autograd collectives) on 1 and 3
real processes: the same error on every rank, no rank left waiting, gradients as each contract states."""
import time

import pytest
import torch

from ffc_parallel.distributed.checks import BatchSpec, batch_fields, batch_problems, check_batch
from ffc_parallel.testing import run_ranks


def test_batch_problems_name_the_rank_and_the_fault():
    spec = BatchSpec("Thing", 4, "the thing's dim", labels_name="ids", label_range=(0, 10), count_nonfinite=True)
    x = torch.tensor([[0.0, float("nan"), 0.0]])
    found = batch_problems(2, batch_fields(x, torch.tensor([3.0, 11.0]), count_nonfinite=True), spec)
    assert found == ["rank 2: embedding dim is 3 but the thing's dim is 4", "rank 2: 1 embeddings but 2 ids",
                     "rank 2: ids must be an integer tensor (class ids), not floating point or bool",
                     "rank 2: 1 non-finite (NaN/inf) values in the embeddings"]
    assert batch_problems(0, batch_fields(torch.ones(2, 4), torch.tensor([0, 10])), spec) == [
        "rank 0: ids must be in [0, 10), got values in [0, 10]"]
    unbounded = BatchSpec("Thing", 4, label_range=(0, None))
    assert "ids" not in " ".join(batch_problems(0, batch_fields(torch.ones(1, 4), torch.tensor([10**12])), unbounded))
    with pytest.raises(ValueError, match="Thing: bad input: the global batch is empty on every rank"):
        check_batch(unbounded, torch.ones(0, 4), torch.zeros(0, dtype=torch.long))


def protocols_on_every_rank():
    """Per rank: the error text of a bad batch on the last rank, lockstep's batches, sum_over_ranks'
    value and gradient."""
    import torch.distributed as dist

    from ffc_parallel.distributed.collectives import sum_over_ranks
    from ffc_parallel.distributed.lockstep import lockstep

    rank, world = dist.get_rank(), dist.get_world_size()
    spec = BatchSpec("Thing", 2, "the thing's dim", label_range=(0, 5))
    labels = torch.tensor([1, 9 if rank == world - 1 else 2])
    try:
        check_batch(spec, torch.ones(2, 2), labels)
        message = None
    except ValueError as exc:
        message = str(exc)
    seen = [b for b in lockstep(range(rank + 1))]          # rank r holds r + 1 batches
    x = torch.full((1,), float(rank + 1), requires_grad=True)
    total = sum_over_ranks(x * 2.0)
    total.sum().backward()
    return {"message": message, "seen": seen, "total": float(total), "grad": float(x.grad)}


@pytest.mark.parametrize("world", [1, 3])
def test_protocols_agree_on_every_rank(world):
    started = time.monotonic()
    results = run_ranks("tests.test_distributed_protocols:protocols_on_every_rank", world, timeout=60)
    assert time.monotonic() - started < 30, "a refusal must not wait for a timeout"
    assert len({r["message"] for r in results}) == 1
    assert results[0]["message"] == f"Thing: bad input: rank {world - 1}: labels must be in [0, 5), got values in [1, 9]"
    for rank, r in enumerate(results):
        assert r["seen"] == list(range(rank + 1)) + [None] * (world - 1 - rank)
        assert r["total"] == 2.0 * sum(range(1, world + 1)) and r["grad"] == 2.0   # backward: identity


def disagreeing_configurations():
    """Per rank: the error each collective object raises when the last rank was built differently."""
    import torch.distributed as dist

    import ffc_parallel as fp

    last = dist.get_rank() == dist.get_world_size() - 1
    builders = {
        "head": lambda: fp.ShardedClassifier(4, 12 if last else 10, margin="arcface"),
        "head_margin": lambda: fp.ShardedClassifier(4, 10, margin="cosface" if last else "arcface"),
        "pool": lambda: fp.ClassPool(8, 4, refresh_momentum=0.3 if last else 0.5),
        "xbm": lambda: fp.losses.CrossBatchMemory(16, 4, warmup_steps=1 if last else 0),
        "sampler": lambda: fp.data.ClassProbabilitySampler(torch.arange(20) % (5 if last else 4), seed=1),
    }
    out = {}
    for name, build in builders.items():
        try:
            build()
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    out["agreeing"] = fp.ShardedClassifier(4, 10).num_local   # and the next collective object still works
    return out


def test_ranks_built_with_different_configurations_are_refused_everywhere():
    started = time.monotonic()
    results = run_ranks("tests.test_distributed_protocols:disagreeing_configurations", 2, timeout=60)
    assert time.monotonic() - started < 30, "a refusal must not wait for a timeout"
    expected = {"head": "num_classes is 10 on rank 0 but 12 on rank 1", "head_margin": "margin m2 is 0.5 on rank 0",
                "pool": "refresh_momentum is 0.5 on rank 0 but 0.3 on rank 1",
                "xbm": "warmup_steps is 0 on rank 0 but 1 on rank 1", "sampler": "label_sum"}
    for name, text in expected.items():
        messages = {r[name] for r in results}
        assert len(messages) == 1 and text in messages.pop(), (name, [r[name] for r in results])
    assert [r["agreeing"] for r in results] == [5, 5]
