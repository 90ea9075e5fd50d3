"""fp.initialize / HybridModel on 2 and 4 real processes (gloo, DeepSpeed CPU) vs dense single-process training."""
import pytest

from ffc_parallel.testing import run_ranks

FP32_CONFIGS = [[stage, optimizer, gas, "fp32"] for stage in (0, 1, 2, 3) for optimizer in ("sgd", "adamw")
                for gas in (1, 2)]


@pytest.mark.parametrize("world", [2, 4])
def test_trajectory_equals_dense_every_zero_stage_optimizer_and_accumulation(world):
    results = run_ranks("tests.cases_engine:trajectories_match_dense", world, timeout=400,
                        kwargs=dict(configs=FP32_CONFIGS))
    assert set(results[0]) == {f"{s}/{o}/{g}/fp32" for s, o, g, _ in FP32_CONFIGS}


def test_bf16_backbone_follows_dense_fp32_loosely():
    run_ranks("tests.cases_engine:trajectories_match_dense", 2, timeout=300,
              kwargs=dict(configs=[[stage, "sgd", 2, "bf16"] for stage in (0, 1, 2, 3)]))


def test_partial_fc_updates_only_sampled_rows_with_accumulation():
    touched = run_ranks("tests.cases_engine:partial_fc_touches_only_sampled_rows", 2, timeout=200)
    assert all(t > 0 for t in touched)


def test_raw_deepspeed_initialize_refused_on_two_ranks_names_fp_initialize():
    messages = run_ranks("tests.cases_engine:raw_deepspeed_initialize", 2, timeout=200)
    assert all(m is not None and "ffc_parallel.initialize" in m for m in messages), messages


def test_raw_deepspeed_initialize_works_on_one_rank():
    assert run_ranks("tests.cases_engine:raw_deepspeed_initialize", 1, timeout=200) == [None]


def test_gradient_clipping_uses_the_global_norm_of_backbone_and_all_centers():
    run_ranks("tests.cases_engine:trajectories_match_dense", 2, timeout=300,
              kwargs=dict(configs=[[stage, "sgd", 1, "fp32", 0.05] for stage in (0, 1, 2, 3)]))


@pytest.mark.parametrize("stage", [1, 3])
def test_fp16_overflow_on_one_rank_skips_every_rank_and_backs_off_one_scale(stage):
    scales = run_ranks("tests.cases_engine:fp16_overflow_on_one_rank_skips_everywhere", 2, timeout=300,
                       kwargs=dict(stage=stage))
    assert scales[0] == scales[1]


def test_fp16_at_zero_stage_0_is_refused_with_a_clear_error():
    message = run_ranks("tests.cases_engine:fp16_at_zero_stage_0_is_refused", 1, timeout=200)[0]
    assert message is not None and "ZeRO stage 1" in message, message


@pytest.mark.timeout(120)
def test_loss_fn_mixup_and_cross_batch_memory_follow_the_dense_trajectory():
    reports = run_ranks("tests.cases_engine:loss_fn_trajectories_match_dense", 2, timeout=100)
    assert reports[0]["mixup"] < 1e-5 and reports[1]["xbm"] < 1e-5
