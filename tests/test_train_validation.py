"""ffc-train --val-targets / --val-every / --val-best-target: options refused before training, and a 2-rank run
(DeepSpeed launcher), then resumed, whose numbers equal one process evaluating the saved backbone on the same .bin."""
import csv
import json
from pathlib import Path

import pytest

from ffc_parallel.cli.train import TrainOptions, main
from ffc_parallel.cli.validation import resolve_val_targets
from ffc_parallel.evaluation.verification import write_verification_bin
from ffc_parallel.testing import run_ranks


def _tiny_bin(path: Path) -> None:
    """Pairs of the synthetic data's unseen images (1 channel, 8 x 8): same (consecutive images of one
    identity, 4 per identity) and different (4 apart)."""
    from ffc_parallel.data import build_data
    x, ids = build_data("synthetic", num_identities=300, synthetic_mode="image", image_size=8,
                        unseen_identities=20, eval_ids_per_bucket=10, seed=0).unseen
    same = [(x[i], x[i + 1], bool(ids[i] == ids[i + 1])) for i in range(0, 50, 2)]
    different = [(x[i], x[i + 4], bool(ids[i] == ids[i + 4])) for i in range(0, 75, 3)]
    write_verification_bin(path, [pair for two in zip(same, different) for pair in two])   # every fold has both


def test_targets_are_found_next_to_the_data_or_refused_naming_the_file(tmp_path, capsys):
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "lfw.bin").write_bytes(b"")
    other = tmp_path / "elsewhere" / "mine.bin"
    other.parent.mkdir()
    other.write_bytes(b"")
    opts = TrainOptions(data="recordio", data_path=str(tmp_path / "train.rec"), val_targets=f"lfw,{other}",
                        val_best_target="mine")
    assert resolve_val_targets(opts) == {"lfw": tmp_path / "lfw.bin", "mine": other}
    assert resolve_val_targets(TrainOptions(data="imagefolder", data_path=str(tmp_path), val_targets="lfw")) == \
        {"lfw": tmp_path / "lfw.bin"}
    with pytest.raises(FileNotFoundError, match=f"--val-targets cfp_fp: verification set {tmp_path}/cfp_fp.bin"):
        resolve_val_targets(TrainOptions(data="recordio", data_path=str(tmp_path), val_targets="lfw,cfp_fp"))
    with pytest.raises(ValueError, match="--data synthetic has none; give the path"):
        resolve_val_targets(TrainOptions(val_targets="lfw"))
    with pytest.raises(ValueError, match="--val-best-target agedb_30 is not one of --val-targets"):
        resolve_val_targets(TrainOptions(data_path=str(tmp_path), val_targets="lfw", val_best_target="agedb_30"))
    with pytest.raises(ValueError, match="need --val-targets"):
        resolve_val_targets(TrainOptions(val_every=5))
    # the command line refuses before training, exit code 2
    assert main(["--data", "imagefolder", "--data-path", str(tmp_path), "--val-targets", "agedb_30"]) == 2
    assert f"{tmp_path}/agedb_30.bin not found" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_two_ranks_validate_during_training_and_keep_the_best(tmp_path):
    from ffc_parallel.cli.export import backbone_spec, backbone_state_dict
    from ffc_parallel.evaluation.verification import evaluate_verification, load_verification_bin
    from ffc_parallel.models import build_backbone

    _tiny_bin(tmp_path / "tiny.bin")
    out = tmp_path / "run"
    argv = ["--num-identities", "300", "--synthetic-mode", "image", "--image-size", "8", "--backbone", "resnet",
            "--unseen-identities", "20", "--eval-ids-per-bucket", "10", "--batch-size", "16", "--embedding-dim", "16",
            "--max-steps", "4", "--log-every", "2", "--warmup-steps", "2", "--output-dir", str(out),
            "--val-targets", str(tmp_path / "tiny.bin"), "--val-every", "2", "--val-best-target", "tiny",
            "--eval-batch-size", "16"]
    metrics = run_ranks("tests.cases_train:train_run", world_size=2, launcher="deepspeed", timeout=240,
                        kwargs=dict(argv=argv))[0]
    assert _rows(out) == [("2", "tiny"), ("4", "tiny")]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/tiny_acc")] == [2, 4]

    argv[argv.index("--max-steps") + 1] = "6"   # resumed: the rows up to step 4 kept, best.json read again
    metrics = run_ranks("tests.cases_train:train_run", world_size=2, launcher="deepspeed", timeout=240,
                        kwargs=dict(argv=argv + ["--resume"]))[0]
    with open(out / "verification.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["target"]) for r in rows] == [("2", "tiny"), ("4", "tiny"), ("6", "tiny")]
    assert metrics["verification"]["tiny"]["accuracy"] == float(rows[-1]["accuracy"])
    assert metrics["verification"]["tiny"]["pairs"] == 50

    vset = {"tiny": load_verification_bin(tmp_path / "tiny.bin")}
    for row in rows:   # one process, the checkpoint of that step, the same .bin
        tag_dir = out / "checkpoints" / f"step{row['step']}"
        spec = backbone_spec(tag_dir)
        backbone = build_backbone(spec["name"], spec["input_shape"], spec["embedding_dim"])
        backbone.load_state_dict(backbone_state_dict(tag_dir))
        alone = evaluate_verification(backbone, vset, spec["input_shape"], batch_size=64)["tiny"]
        assert alone["accuracy"] == pytest.approx(float(row["accuracy"]), abs=1e-12)
        assert alone["accuracy_std"] == pytest.approx(float(row["accuracy_std"]), abs=1e-12)
        assert alone["tar_at_far_1e-3"] == pytest.approx(float(row["tar_at_far_1e-3"]), abs=1e-12)

    best_step = max(rows, key=lambda r: (float(r["accuracy"]), -int(r["step"])))["step"]   # the first of equals
    assert (out / "checkpoints" / "best").read_text() == f"step{best_step}"
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["step"] == int(best_step) and metrics["verification_best"] == best


def _rows(out: Path) -> list:
    with open(out / "verification.csv", newline="") as f:
        return [(r["step"], r["target"]) for r in csv.DictReader(f)]


_ALLOCATOR_PROBE = """
import ctypes, sys
import torch
from ffc_parallel.cli.train import set_host_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
took = set_host_allocator(sys.argv[1])
big = torch.empty(8 << 20, dtype=torch.uint8)
del big                      # glibc's default raises its mapping threshold to a freed mapped block's size
before = libc.mallinfo2().hblkhd
block = torch.empty(2 << 20, dtype=torch.uint8)
print(took, libc.mallinfo2().hblkhd - before)
"""


def test_help_lists_every_option(capsys):
    """``ffc-train --help`` formats every option's help (argparse reads a lone ``%`` as a format) and exits 0."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{name.replace('_', '-')}" in out for name in TrainOptions.__dataclass_fields__)


def test_host_allocator_auto_maps_blocks_for_a_store_on_a_cpu_only():
    """``--host-allocator auto`` (the default): mapped for centers in a host or disk store on a CPU run,
    glibc's default for centers on the device or a head on an accelerator; an explicit mode is kept."""
    from ffc_parallel.cli.train import TrainOptions, host_allocator_mode
    assert TrainOptions().host_allocator == "auto"
    assert host_allocator_mode("auto", "disk:/nvme/store", "cpu") == "mapped"
    assert host_allocator_mode("auto", "host", "cpu") == "mapped"
    assert host_allocator_mode("auto", "device", "cpu") == "default"
    assert host_allocator_mode("auto", "disk:/nvme/store", "cuda") == "default"
    assert host_allocator_mode("default", "disk:/nvme/store", "cpu") == "default"
    assert host_allocator_mode("mapped", "device", "cuda") == "mapped"


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt and mallinfo2")
def test_host_allocator_mapped_maps_a_2_mib_block_that_the_default_puts_in_the_heap(capsys):
    """``--host-allocator mapped``: after an 8 MiB block was freed, a 2 MiB tensor is a mapping of its own
    (glibc's mapped bytes grow by it); with glibc's default it comes from the heap (they do not). An
    unknown value is refused with the option's name."""
    import subprocess
    import sys
    out = {}
    for mode in ("default", "mapped"):
        run = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE, mode], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr
        took, mapped = run.stdout.split()
        out[mode] = (took, int(mapped))
    assert out["default"] == ("False", 0)
    assert out["mapped"][0] == "True" and out["mapped"][1] >= 2 << 20
    with pytest.raises(SystemExit):
        main(["--host-allocator", "jemalloc", "--max-steps", "1"])
    assert "--host-allocator: invalid choice: 'jemalloc'" in capsys.readouterr().err
