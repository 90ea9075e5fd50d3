"""Both DeepSpeed routes (the head inside a user's module under plain deepspeed.initialize, and
fp.initialize) on 2 and 4 real processes (gloo, DeepSpeed CPU) against dense single-process training."""
import pytest

from ffc_parallel.testing import run_ranks
from tests.zero3 import STAGES, needs_safe_gather

pytestmark = pytest.mark.deepspeed


def _configs(route, dtype="fp32", **extra):
    return [dict(route=route, stage=stage, optimizer=optimizer, gas=gas, dtype=dtype, **extra)
            for stage in STAGES for optimizer in ("sgd", "adamw") for gas in (1, 2)]


# The drop-in route as users launch it: the DeepSpeed launcher (2 ranks) and plain mpirun (4 ranks).
@pytest.mark.parametrize("route,world,launcher", [("drop_in", 2, "deepspeed"), ("drop_in", 4, "mpirun"),
                                                  ("fp", 2, "torchrun"), ("fp", 4, "torchrun")])
def test_trajectory_equals_dense_every_zero_stage_optimizer_and_accumulation(route, world, launcher):
    configs = _configs(route)
    for i, config in enumerate(configs):   # a DeepSpeed schedule for half of them
        config["scheduler"] = i % 2 == 1
    results = run_ranks("tests.cases_engine:trajectories_match_dense", world, launcher=launcher, timeout=500,
                        kwargs=dict(configs=configs))
    assert len(results[0]) == len(configs)


def test_hybrid_model_under_plain_deepspeed_initialize_equals_dense():
    run_ranks("tests.cases_engine:trajectories_match_dense", 2, timeout=300,
              kwargs=dict(configs=[dict(c, route="hybrid") for c in _configs("hybrid")[::2]]))


def test_fp_initialize_default_model_parameters_equals_dense():
    run_ranks("tests.cases_engine:trajectories_match_dense", 2, timeout=300,
              kwargs=dict(configs=[dict(c, model_parameters="default") for c in _configs("fp")[::3]]))


@pytest.mark.parametrize("route", ["drop_in", "fp"])
def test_bf16_backbone_follows_dense_fp32_loosely(route):
    run_ranks("tests.cases_engine:trajectories_match_dense", 2, timeout=300,
              kwargs=dict(configs=[dict(route=route, stage=stage, optimizer="sgd", gas=2, dtype="bf16")
                                   for stage in STAGES]))


@pytest.mark.parametrize("route", ["drop_in", "fp"])
def test_partial_fc_updates_only_sampled_rows_with_accumulation(route):
    touched = run_ranks("tests.cases_engine:partial_fc_touches_only_sampled_rows", 2, timeout=200,
                        kwargs=dict(route=route))
    assert all(t > 0 for t in touched)


def test_fp_initialize_clips_the_global_norm_of_backbone_and_all_centers():
    run_ranks("tests.cases_engine:trajectories_match_dense", 2, timeout=300,
              kwargs=dict(configs=[dict(route="fp", stage=stage, optimizer="sgd", gas=1, dtype="fp32", clip=0.05)
                                   for stage in STAGES]))


@pytest.mark.parametrize("route,stage", [("drop_in", 1), pytest.param("drop_in", 3, marks=needs_safe_gather), ("fp", 2)])
def test_fp16_overflow_only_in_one_ranks_centers_skips_every_rank_and_backs_off_one_scale(route, stage):
    scales = run_ranks("tests.cases_engine:fp16_overflow_on_one_rank_skips_everywhere", 2, timeout=300,
                       kwargs=dict(route=route, stage=stage))
    assert scales[0] == scales[1]


@pytest.mark.parametrize("route", ["drop_in", "fp"])
def test_fp16_at_zero_stage_0_is_refused_with_a_clear_error(route):
    message = run_ranks("tests.cases_engine:fp16_at_zero_stage_0_is_refused", 1, timeout=200,
                        kwargs=dict(route=route))[0]
    assert message is not None and "ZeRO stage 1" in message, message


@pytest.mark.timeout(150)
def test_loss_fn_mixup_and_cross_batch_memory_follow_the_dense_trajectory():
    reports = run_ranks("tests.cases_engine:loss_fn_trajectories_match_dense", 2, timeout=120)
    assert reports[0]["mixup"] < 1e-5 and reports[1]["xbm"] < 1e-5


def test_fp_initialize_engine_mirrors_deepspeeds_api(tmp_path):
    results = run_ranks("tests.cases_engine:fp_engine_mirrors_deepspeed_api", 2, timeout=200,
                        kwargs=dict(ckpt=str(tmp_path / "ckpt")))
    for r in results:
        assert r["saved"] is True and not r["latest_written"]
        assert "config was given twice" in r["both"]
        assert r["embedding_shape"] == [3, 5]
        assert r["centers_restored"] and r["module_only_kept_optimizer_state"]
