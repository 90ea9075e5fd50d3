"""The head as a drop-in layer of a DeepSpeed user's own script: a DeepSpeedExamples-style script
(tests/dropin_script.py) under the DeepSpeed launcher, ``deepspeed --launcher openmpi`` and plain
``mpirun`` trains exactly like the dense single-process model; every misuse is one clear error on
every rank within seconds."""
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from ffc_parallel.testing import _free_port, _mpirun, run_command, run_ranks
from tests.reference import dense_margin_loss, rel_err
from tests.zero3 import GATHER_IS_SAFE

pytestmark = pytest.mark.deepspeed
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dropin_script.py"


def _config(tmp_path, world, stage, gas=1, micro=3):
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.05,
                                                        "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def _launch(cmd, tmp_path, world, timeout=150):
    out = tmp_path / "out"
    out.mkdir()
    run_command(cmd + ["--out", str(out)], cwd=ROOT, timeout=timeout,
                env={"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                     "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)})
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _dense_matches(results, gas):
    """Replay the global batches the ranks saw on one dense model (AdamW) and compare."""
    from tests.dropin_script import DIM, IN_DIM, NUM_CLASSES, SCALE, dataset

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(IN_DIM, 12), torch.nn.Tanh(), torch.nn.Linear(12, DIM))
    from ffc_parallel.heads.classifier import init_class_rows
    weight = torch.nn.Parameter(init_class_rows(0, NUM_CLASSES, DIM, 0.01, 0))
    opt = torch.optim.AdamW(list(backbone.parameters()) + [weight], lr=0.01, betas=(0.9, 0.99), weight_decay=0.05)
    x, y, _ = dataset().tensors
    micro_steps = len(results[0]["indices"])
    for start in range(0, micro_steps, gas):
        opt.zero_grad()
        for m in range(start, start + gas):
            index = torch.tensor(sum((r["indices"][m] for r in results), []))
            loss = dense_margin_loss(backbone(x[index]), weight, y[index], SCALE, 1.0, 0.0, 0.4)
            (loss / gas).backward()
            assert abs(results[0]["losses"][m] - loss.item()) < 1e-5 * loss.item(), (m, results[0]["losses"][m], loss.item())
        opt.step()
    for r in results:
        lo, hi = r["class_range"]
        assert rel_err(torch.tensor(r["centers"]), weight.detach()[lo:hi]) < 5e-5
        for mine, ref in zip(r["backbone"], backbone.parameters()):
            assert rel_err(torch.tensor(mine), ref.detach()) < 5e-5
    assert sorted(tuple(r["class_range"]) for r in results)[-1][1] == NUM_CLASSES


def test_deepspeed_launcher_zero2_with_accumulation(tmp_path):
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(SCRIPT), "--deepspeed_config", str(_config(tmp_path, 2, stage=2, gas=2))]
    _dense_matches(_launch(cmd, tmp_path, 2), gas=2)


def test_deepspeed_launcher_over_openmpi_zero3(tmp_path):   # ZeRO-2 where ZeRO-3 races under gloo (tests/zero3.py)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", str(hostfile), "--launcher", "openmpi",
           "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(SCRIPT), "--deepspeed_config", str(_config(tmp_path, 2, stage=3 if GATHER_IS_SAFE else 2))]
    _dense_matches(_launch(cmd, tmp_path, 2), gas=1)


@pytest.mark.parametrize("world,stage", [(2, 0), (4, 1)])
def test_plain_mpirun(tmp_path, world, stage):
    # --map-by slot: oversubscribed, Open MPI numbers local ranks in mapping order (rank 1 gets local rank 2
    # of 4 here), while the script's deepspeed.init_distributed() derives them from world ranks and asserts.
    cmd = [_mpirun(), "-np", str(world), "--oversubscribe", "--map-by", "slot", sys.executable, str(SCRIPT),
           "--master_port", str(_free_port()), "--deepspeed_config", str(_config(tmp_path, world, stage=stage, micro=2))]
    _dense_matches(_launch(cmd, tmp_path, world), gas=1)


# ---------------------------------------------------------------------- misuse: one clear error everywhere
def _all_raise(target, match, world=2, kwargs=None, within=60):
    started = time.monotonic()
    messages = run_ranks(f"tests.cases_misuse:{target}", world, timeout=within + 30, kwargs=kwargs)
    assert time.monotonic() - started < within, f"{target} took {time.monotonic() - started:.0f} s"
    matches = (match,) if isinstance(match, str) else match
    assert all(m is not None and any(x in m for x in matches) for m in messages), messages
    return messages


@pytest.mark.parametrize("route", ["drop_in", "fp"])
def test_a_refused_batch_leaves_every_parameter_and_buffer(route):
    # A NaN image on one rank: before, the backbone's BatchNorm statistics were already NaN when the head refused.
    started = time.monotonic()
    results = run_ranks("tests.cases_misuse:refused_batch_leaves_the_model", 2, timeout=90, kwargs=dict(route=route))
    assert time.monotonic() - started < 60
    assert len({r["message"] for r in results}) == 1 and "rank 1: 10 non-finite" in results[0]["message"], results
    assert all(r["unchanged"] for r in results), results


@pytest.mark.parametrize("route,stage", [("fp", 1), ("fp", 3), ("drop_in", 0)])
def test_head_weight_handed_to_deepspeeds_optimizer(route, stage):
    _all_raise("head_weight_given_to_deepspeed", "was handed to DeepSpeed's optimizer", kwargs=dict(route=route, stage=stage))


@pytest.mark.parametrize("stage,error", [(1, "KeyError"), (3, "AttributeError")])
def test_head_weight_handed_to_plain_deepspeed_zero_fails_on_every_rank(stage, error):
    # ZeRO 1-3 index the parameters they are given among the module's own while deepspeed.initialize runs,
    # before any code of ours: DeepSpeed's own error at once (ZeRO-1/2: on the ranks whose partition holds
    # the centers; the others get ours at the first forward). docs/deepspeed.md says so.
    _all_raise("head_weight_given_to_deepspeed", (error, "was handed to DeepSpeed's optimizer"),
               kwargs=dict(route="drop_in", stage=stage))


def test_head_weight_in_a_client_optimizer():
    _all_raise("head_weight_in_a_client_optimizer", "was handed to DeepSpeed's optimizer")


def test_head_on_a_group_other_than_deepspeeds_data_parallel_group():
    _all_raise("head_on_another_group", "build the head on DeepSpeed's data-parallel group")


def test_one_head_in_two_engines():
    _all_raise("head_in_two_engines", "inside the models of two DeepSpeed engines")


def test_head_outside_the_model_given_to_deepspeed():
    _all_raise("head_outside_the_engines_model", "whose model does not contain it")


def test_an_optimizer_the_centers_cannot_follow():
    _all_raise("unsupported_optimizer", "can follow SGD, Adam and AdamW")


def test_deepspeeds_own_checkpoint_never_silently_loses_the_rows(tmp_path):
    results = run_ranks("tests.cases_misuse:plain_deepspeed_checkpoint_without_shards", 2, timeout=120,
                        kwargs=dict(ckpt=str(tmp_path / "ckpt")))
    assert all("ffc_parallel.load_checkpoint" in r["forward"] for r in results), results
    assert all("holds no class shards" in r["fp_load"] for r in results), results


def test_shards_of_another_class_count_are_refused(tmp_path):
    _all_raise("shards_of_another_class_count", "a head of 9 classes x 5 in the checkpoint but a head of 12",
               kwargs=dict(ckpt=str(tmp_path / "ckpt")))


def test_state_dict_holds_a_marker_not_part_of_the_classifier():
    from tests.cases_misuse import state_dict_never_holds_rows

    report = state_dict_never_holds_rows()
    assert report["keys"] == ["classifier._extra_state"] and not report["weight_in_parameters"]
    assert "ffc_parallel.load_checkpoint" in report["error"]
    assert "9 classes x 5 but this head has 10 x 5" in report["mismatch"]
