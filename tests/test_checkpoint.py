"""Checkpoints on real processes, through the user's own DeepSpeed engine (fp.save_checkpoint /
fp.load_checkpoint) and through fp.initialize's: loading at another world size (4->2, 4->3, 2->3 with
the offline tool, 1->4) restores the centers, their optimizer state AND the backbone's ZeRO
optimizer state (DeepSpeed's universal checkpoint), and continues the uninterrupted trajectory;
exact resume, crash safety, backbone export."""
from pathlib import Path

import pytest
import torch

from ffc_parallel.testing import run_ranks
from tests.zero3 import needs_safe_gather

pytestmark = pytest.mark.deepspeed


def _exported_backbone_matches(ckpt, ref, tmp_path, route):
    from ffc_parallel.cli.export import main as export
    from tests.cases_engine import make_backbone

    out = tmp_path / "backbone.pt"
    assert export([ckpt, str(out)]) == 0
    state = torch.load(out)
    if route == "drop_in":   # the user's module without its head: features.*
        state = {k[len("features."):]: v for k, v in state.items()}
    backbone = make_backbone()
    backbone.load_state_dict(state)
    saved = torch.load(Path(ref) / "rank0.pt")["backbone"]
    for mine, theirs in zip(backbone.parameters(), saved):
        assert torch.equal(mine.detach(), theirs)


def _close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("route,stage,optimizer,save_world,load_worlds,offline",
                         [("drop_in", 1, "adamw", 4, [2, 3], False), ("fp", 2, "adamw", 2, [3], True),
                          pytest.param("drop_in", 3, "adamw", 1, [4], False, marks=needs_safe_gather),
                          ("fp", 0, "sgd", 2, [3], False)])
def test_load_at_another_world_size_restores_centers_and_both_optimizer_states(tmp_path, route, stage, optimizer,
                                                                                save_world, load_worlds, offline):
    from ffc_parallel import deepspeed_bridge

    ckpt, ref = str(tmp_path / "ckpt"), str(tmp_path / "ref")
    common = dict(reference=ref, route=route, stage=stage, optimizer=optimizer)
    uninterrupted = run_ranks("tests.cases_checkpoint:save_after_training", save_world, timeout=300,
                              kwargs=dict(ckpt=ckpt, **common))[0]
    _exported_backbone_matches(ckpt, ref, tmp_path, route)
    universal = stage == 3 or deepspeed_bridge.version() >= deepspeed_bridge._UNIVERSAL_ZERO12_FROM
    for world in load_worlds:
        source = ckpt
        if offline:
            from ffc_parallel.cli.reshard import main as reshard
            source = str(tmp_path / f"resharded{world}")
            assert reshard([ckpt, source, "--world-size", str(world), "--quiet"]) == 0
        if not universal and stage > 0:   # this DeepSpeed cannot: a clear error on every rank, nothing loaded
            with pytest.raises(Exception, match="needs DeepSpeed >= 0.19.7"):
                run_ranks("tests.cases_checkpoint:load_matches_saved", world, timeout=300,
                          kwargs=dict(ckpt=source, **common))
            continue
        results = run_ranks("tests.cases_checkpoint:load_matches_saved", world, timeout=300,
                            kwargs=dict(ckpt=source, **common))
        assert sum(r["rows"] for r in results) == 23
        assert len({tuple(r["losses"]) for r in results}) == 1
        assert _close(results[0]["losses"], uninterrupted), (results[0]["losses"], uninterrupted)


@pytest.mark.parametrize("route,stage", [("drop_in", 1), pytest.param("fp", 3, marks=needs_safe_gather)])
def test_resume_at_same_world_size_continues_the_exact_loss_trajectory(tmp_path, route, stage):
    kwargs = dict(ckpt=str(tmp_path / "ckpt"), route=route, stage=stage, optimizer="adamw")
    uninterrupted = run_ranks("tests.cases_checkpoint:resume_continues_trajectory", 2, timeout=300,
                              kwargs=dict(kwargs, phase="first"))
    resumed = run_ranks("tests.cases_checkpoint:resume_continues_trajectory", 2, timeout=300,
                        kwargs=dict(kwargs, phase="resume"))
    assert resumed == uninterrupted


@pytest.mark.parametrize("route", ["drop_in", "fp"])
def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path, route):
    tags = run_ranks("tests.cases_checkpoint:crash_during_save_keeps_previous", 2, timeout=300,
                     kwargs=dict(ckpt=str(tmp_path / "ckpt"), route=route))
    assert tags == ["global_step1", "global_step1"]


def test_tools_refuse_a_directory_without_checkpoint(tmp_path, capsys):
    from ffc_parallel.cli.export import main as export
    from ffc_parallel.cli.reshard import main as reshard

    assert reshard([str(tmp_path), str(tmp_path / "out"), "--world-size", "2"]) == 2
    assert export([str(tmp_path), str(tmp_path / "b.pt")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
