"""Cross-batch memory: hand-computed values, ring-buffer order, warm-up, and 2/4 real ranks vs a dense
list-based reference (loss, gradients, memory identical on every rank)."""
import pytest
import torch

from ffc_parallel.losses import ContrastiveLoss, CrossBatchMemory
from ffc_parallel.testing import run_ranks

POINTS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1])


def test_batch_term_by_hand_then_memory_term_after_warmup():
    xbm = CrossBatchMemory(size=8, dim=2, weight=0.5, warmup_steps=1, dtype=torch.float64)
    # Step 0 (warm-up): only the batch term; per-anchor contrastive 0.4, 0.7, 1.3, 1.0 -> mean 0.85.
    assert abs(float(xbm(POINTS, LABELS)) - 0.85) < 1e-12
    assert xbm.filled == 0, "nothing is enqueued during warm-up"
    # Step 1: memory still empty (this batch is enqueued AFTER its memory term) -> 0.85 again.
    assert abs(float(xbm(POINTS, LABELS)) - 0.85) < 1e-12
    assert xbm.filled == 4
    # Step 2: memory = the 4 points. Against memory each anchor also meets itself (a real earlier
    # sample, not a self pair): a: 0 + 0.4 | b: 0.4 + 0 + 0.3 | c: 0.3 + 0 + 1 | d: 1 + 0
    # memory term = (0.4 + 0.7 + 1.3 + 1.0) / 4 = 0.85 -> loss = 0.85 + 0.5 * 0.85.
    assert abs(float(xbm(POINTS, LABELS)) - 0.85 * 1.5) < 1e-12


def test_ring_buffer_overwrites_the_oldest():
    xbm = CrossBatchMemory(size=5, dim=1, dtype=torch.float64, normalize=False)
    rows = torch.arange(12, dtype=torch.float64).unsqueeze(1)
    xbm.enqueue(rows[0:2], torch.tensor([0, 1]))
    xbm.enqueue(rows[2:4], torch.tensor([2, 3]))
    assert xbm.memory()[1].tolist() == [0, 1, 2, 3]
    xbm.enqueue(rows[4:7], torch.tensor([4, 5, 6]))
    emb, labels = xbm.memory()
    assert labels.tolist() == [2, 3, 4, 5, 6] and emb[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert xbm.labels.tolist() == [5, 6, 2, 3, 4], "slots 0 and 1 (the oldest) must be overwritten"
    xbm.enqueue(rows[5:12], torch.arange(5, 12))   # more rows than slots: the last 5 survive
    assert xbm.memory()[1].tolist() == [7, 8, 9, 10, 11]
    xbm.enqueue(rows[:1], torch.tensor([0]))
    assert xbm.memory()[1].tolist() == [8, 9, 10, 11, 0]


def test_state_survives_state_dict_and_bad_input_is_rejected():
    xbm = CrossBatchMemory(size=6, dim=2, dtype=torch.float64)
    xbm(POINTS, LABELS)
    xbm(POINTS, LABELS)
    copy = CrossBatchMemory(size=6, dim=2, dtype=torch.float64)
    copy.load_state_dict(xbm.state_dict())
    assert copy.step == 2 and copy.filled == 6 and torch.equal(copy.memory()[1], xbm.memory()[1])
    with pytest.raises(ValueError, match="embedding dim is 3 but the memory.s dim is 2"):
        xbm(torch.randn(4, 3), LABELS)
    with pytest.raises(ValueError, match="4 embeddings but 3 labels"):
        xbm(POINTS, LABELS[:3])
    assert isinstance(xbm.pair_loss, ContrastiveLoss) and xbm.pair_loss.margin == 0.5


@pytest.mark.parametrize("world", [2, 4])
def test_multi_rank_memory_matches_dense_reference(world):
    steps = [[3, 1, 2, 0][:world], [2, 2, 1, 1][:world], [1, 3, 0, 2][:world], [2, 1, 2, 1][:world]]
    runs = run_ranks("tests.cases_longtail:xbm_matches_dense_all", world, timeout=120, kwargs=dict(
        loss_names=["contrastive", "multi_similarity"], step_batch_sizes=steps, size=7, dim=3, warmup=1, weight=0.7))
    for loss_name in ("contrastive", "multi_similarity"):
        results = [run[loss_name] for run in runs]
        assert len({tuple(r["losses"]) for r in results}) == 1, "the loss differs across ranks"
        messages = {r["detected"] for r in results}
        assert len(messages) == 1 and "differs from rank 0" in messages.pop(), "corrupted memory not detected"


def test_single_rank_multi_similarity_matches_dense_reference():
    from tests.cases_longtail import xbm_matches_dense
    xbm_matches_dense([[5], [4], [6], [3]], size=8, dim=3, warmup=1, weight=0.7, loss_name="multi_similarity")
