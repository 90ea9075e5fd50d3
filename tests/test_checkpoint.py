"""Checkpoints on real processes: resharding 4->2, 4->3, 2->3 (offline tool), 1->4, exact resume, crash
safety, backbone export."""
from pathlib import Path

import pytest
import torch

from ffc_parallel.testing import run_ranks


def _exported_backbone_matches(ckpt, ref, tmp_path):
    from ffc_parallel.cli.export import main as export
    from tests.cases_engine import make_backbone

    out = tmp_path / "backbone.pt"
    assert export([ckpt, str(out)]) == 0
    backbone = make_backbone()
    backbone.load_state_dict(torch.load(out))
    saved = torch.load(Path(ref) / "rank0.pt")["backbone"]
    for mine, theirs in zip(backbone.parameters(), saved):
        assert torch.equal(mine.detach(), theirs)


@pytest.mark.parametrize("stage,optimizer,save_world,load_worlds,offline",
                         [(1, "adamw", 4, [2, 3], False), (0, "sgd", 2, [3], True), (3, "sgd", 1, [4], False)])
def test_load_at_another_world_size_reshards_centers_and_state(tmp_path, stage, optimizer, save_world, load_worlds,
                                                               offline):
    ckpt, ref = str(tmp_path / "ckpt"), str(tmp_path / "ref")
    run_ranks("tests.cases_checkpoint:save_after_training", save_world, timeout=300,
              kwargs=dict(ckpt=ckpt, reference=ref, stage=stage, optimizer=optimizer))
    _exported_backbone_matches(ckpt, ref, tmp_path)
    for world in load_worlds:
        source = ckpt
        if offline:
            from ffc_parallel.cli.reshard import main as reshard
            source = str(tmp_path / f"resharded{world}")
            assert reshard([ckpt, source, "--world-size", str(world), "--quiet"]) == 0
        results = run_ranks("tests.cases_checkpoint:load_matches_saved", world, timeout=300,
                            kwargs=dict(ckpt=source, reference=ref, stage=stage, optimizer=optimizer))
        assert sum(r["rows"] for r in results) == 23
        assert len({r["loss"] for r in results}) == 1


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_at_same_world_size_continues_the_exact_loss_trajectory(tmp_path, stage):
    kwargs = dict(ckpt=str(tmp_path / "ckpt"), stage=stage, optimizer="adamw")
    uninterrupted = run_ranks("tests.cases_checkpoint:resume_continues_trajectory", 2, timeout=300,
                              kwargs=dict(kwargs, phase="first"))
    resumed = run_ranks("tests.cases_checkpoint:resume_continues_trajectory", 2, timeout=300,
                        kwargs=dict(kwargs, phase="resume"))
    assert resumed == uninterrupted


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    tags = run_ranks("tests.cases_checkpoint:crash_during_save_keeps_previous", 2, timeout=300,
                     kwargs=dict(ckpt=str(tmp_path / "ckpt")))
    assert tags == ["global_step1", "global_step1"]


def test_tools_refuse_a_directory_without_checkpoint(tmp_path, capsys):
    from ffc_parallel.cli.export import main as export
    from ffc_parallel.cli.reshard import main as reshard

    assert reshard([str(tmp_path), str(tmp_path / "out"), "--world-size", "2"]) == 2
    assert export([str(tmp_path), str(tmp_path / "b.pt")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
