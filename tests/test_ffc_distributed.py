"""FFC on 2 and 4 real processes: the slot-sharded pool equals the single-process reference after
every update (so every rank's view is the same pool), the loss and probe gradients equal the dense
reference, training on W ranks equals training on one, checkpoint/resume, and bad input."""
import pytest

from ffc_parallel.testing import run_ranks
from tests.cases_ffc import ffc_train, pool_loss_matches_dense

MARGINS = {"arcface": ["arcface", [32.0, 1.0, 0.5, 0.0]], "cosface": ["cosface", [32.0, 1.0, 0.0, 0.4]],
           "softmax": [None, [10.0, 1.0, 0.0, 0.0]]}


def _close(a, b, tol):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


def test_pool_loss_equals_dense_reference_one_process():
    pool_loss_matches_dense(pool_size=9, dim=5, batch_sizes=[9], num_ids=14, margins=MARGINS)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_pool_rules_loss_and_bad_input(world):
    # pool of 7 slots over 4 ranks: uneven shards (2, 2, 2, 1); 11 identities, batches of 5 with repeats
    results = run_ranks("tests.cases_ffc:pool_checks", world, timeout=120, kwargs=dict(
        pool_kwargs=dict(pool_size=7, dim=3, steps=12, batch=5, num_ids=11),
        loss_kwargs=dict(pool_size=9, dim=5, batch_sizes=[4, 2, 3, 0][:world], num_ids=14, margins=MARGINS),
        bad_rank=world - 1))
    pools = [r["pool"] for r in results]
    assert all(p["lookups"] == pools[0]["lookups"] for p in pools), "ranks disagree on identity -> slot"
    ranges = [p["slot_range"] for p in pools]
    assert ranges[0][0] == 0 and ranges[-1][1] == 7 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    messages = [r["bad"]["message"] for r in results]
    assert messages[0] and f"rank {world - 1}" in messages[0] and len(set(messages)) == 1
    assert all(r["bad"]["recovered"] for r in results)


@pytest.mark.parametrize("world", [2, 4])
def test_training_on_w_ranks_equals_one_process_and_resumes(world, tmp_path):
    batch_sizes = [3, 2, 4, 1] if world == 4 else [4, 6]
    reference = ffc_train([sum(batch_sizes)], steps=6)
    results = run_ranks("tests.cases_ffc:ffc_train", world, timeout=120,
                        kwargs=dict(batch_sizes=batch_sizes, steps=6, checkpoint_at=2, checkpoint_dir=str(tmp_path)))
    for r in results:
        assert _close(r["losses"], reference["losses"], 1e-9), (r["losses"], reference["losses"])
        assert r["pool_ids"] == reference["pool_ids"] and r["pool_stamps"] == reference["pool_stamps"]
        assert _close(r["pool_features"], reference["pool_features"], 1e-9)
        assert _close(r["probe"], reference["probe"], 1e-9) and _close(r["gallery"], reference["gallery"], 1e-9)
    assert len(set(r["losses"][-1] for r in results)) == 1



def test_deepspeed_zero1_on_two_ranks_equals_one_process():
    reference = ffc_train([10], steps=4, dtype="float32")
    results = run_ranks("tests.cases_ffc:ffc_deepspeed_train", 2, timeout=420,
                        kwargs=dict(batch_sizes=[5, 5], steps=4, stage=1))
    for r in results:
        assert _close(r["losses"], reference["losses"], 1e-5), (r["losses"], reference["losses"])
        assert r["pool_ids"] == reference["pool_ids"]
        assert _close(r["pool_features"], reference["pool_features"], 1e-5)
        assert _close(r["probe"], reference["probe"], 1e-5) and _close(r["gallery"], reference["gallery"], 1e-5)
