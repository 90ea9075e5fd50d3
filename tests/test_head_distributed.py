"""The class-sharded head on 1, 2 and 4 real processes (gloo) vs the dense float64 reference."""
import pytest

from ffc_parallel.testing import run_ranks
from tests.cases_head import BAD_INPUTS, MARGINS

ALL_MARGINS = list(MARGINS)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_uneven_classes_and_batches_every_margin_every_chunk(world):
    batch_sizes = [5, 3, 6, 1][:world]
    run_ranks("tests.cases_head:head_matches_dense", world, timeout=120, kwargs=dict(
        num_classes=23, dim=8, batch_sizes=batch_sizes, margins=ALL_MARGINS, chunk_sizes=[None, 1, 4, 7]))


@pytest.mark.parametrize("world", [2, 4])
def test_even_classes_and_batches_with_interclass_filter(world):
    run_ranks("tests.cases_head:head_matches_dense", world, timeout=120, kwargs=dict(
        num_classes=24, dim=6, batch_sizes=[4] * world, margins=["arcface", "cosface"],
        chunk_sizes=[None, 5], filter_threshold=0.1))


def test_straight_through_arcface_and_fewer_classes_than_ranks():
    # num_classes=3 on 4 ranks: rank 3 owns no class and must still take part in every collective.
    run_ranks("tests.cases_head:head_matches_dense", 4, timeout=120, kwargs=dict(
        num_classes=3, dim=5, batch_sizes=[2, 0, 3, 1], margins=["arcface"], chunk_sizes=[None, 2],
        straight_through=True))


@pytest.mark.parametrize("world,sample_rate", [(1, 0.3), (2, 0.25), (4, 0.5)])
def test_partial_fc_equals_dense_restricted_to_sampled_classes(world, sample_rate):
    results = run_ranks("tests.cases_head:partial_fc_matches_restricted_dense", world, timeout=120,
                        kwargs=dict(num_classes=101, dim=8, batch_sizes=[6, 2, 5, 3][:world],
                                    sample_rate=sample_rate))
    assert all(r["rows"] >= int(sample_rate * (101 // world)) for r in results)


@pytest.mark.parametrize("world", [2, 4])
def test_predict_is_global_top_k(world):
    run_ranks("tests.cases_head:predict_matches_dense", world, timeout=90,
              kwargs=dict(num_classes=29, dim=7, batch_sizes=[3, 4, 1, 2][:world], k=5))


def test_bad_input_same_error_on_every_rank_then_recovers():
    results = run_ranks("tests.cases_head:bad_inputs_raise_everywhere", 2, timeout=60,
                        kwargs=dict(kinds=list(BAD_INPUTS)))
    for kind, expected in BAD_INPUTS.items():
        messages = [r[kind]["message"] for r in results]
        assert messages[0] is not None, f"{kind}: no error raised"
        assert expected in messages[0], f"{kind}: {messages[0]!r}"
        if kind == "label_too_large":
            assert messages[0].endswith(", 13]"), messages[0]
        assert "rank 1" in messages[0]
        assert len(set(messages)) == 1, f"{kind}: ranks disagree: {messages}"
        assert all(r[kind]["recovered"] for r in results)


def test_bad_label_on_last_of_four_ranks():
    results = run_ranks("tests.cases_head:bad_inputs_raise_everywhere", 4, timeout=60,
                        kwargs=dict(kinds=["label_too_large"], bad_rank=3))
    assert len({r["label_too_large"]["message"] for r in results}) == 1
    assert "rank 3" in results[0]["label_too_large"]["message"]


@pytest.mark.parametrize("world", [2, 4])
def test_mpirun_discovery(world):
    results = run_ranks("tests.cases_head:launcher_info", world, launcher="mpirun", timeout=90)
    assert [r["rank"] for r in results] == list(range(world))
    assert {r["world"] for r in results} == {world}
    assert all(r["launcher"].startswith("mpirun") for r in results)
    assert sorted(r["local_rank"] for r in results) == list(range(world))
    assert len({r["loss"] for r in results}) == 1


def test_torchrun_style_variables():
    results = run_ranks("tests.cases_head:launcher_info", 2, timeout=60)
    assert [r["launcher"] for r in results] == ["torchrun/env"] * 2
    assert results[0]["loss"] == results[1]["loss"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_soft_targets_and_sharded_class_weights(world):
    run_ranks("tests.cases_head:soft_targets_and_class_weights_match_dense", world, timeout=120,
              kwargs=dict(num_classes=19, dim=6, batch_sizes=[4, 2, 5, 3][:world], k=3))
