"""Which DeepSpeed releases work with this torch: the survey behind setup.cfg's DeepSpeed range.

    python benchmarks/deepspeed_versions.py 0.16.0 0.18.9 0.19.8 [--out results.json] [--venvs DIR]

For each version: a virtual environment under ``--venvs`` with ``torch==2.13.0`` (or ``FFC_TORCH_SPEC``) and
that DeepSpeed, then, on 4 gloo ranks with plain DeepSpeed (a small MLP, AdamW): does it import; do ZeRO 1, 2
and 3 train and save; does a same-world-size resume continue the run (parameters after two more steps equal
to the uninterrupted run's); does DeepSpeed's universal checkpoint (``ds_to_universal``) load at 3 ranks and
continue the run; how many of ``--zero3-repeats`` identical 2-rank ZeRO-3 runs deviate from the others. Writes
one JSON record per version (``--out``, merged into an existing file). Slow (about two minutes a version on 2
CPU cores): a tool for the next range bump, not a CI step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLOBAL = 12   # samples a step at every world size


# ---------------------------------------------------------------------- per-rank bodies (run_ranks)
def _engine(stage, universal=False):
    import importlib

    import deepspeed
    import torch
    import torch.distributed as dist

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    world = dist.get_world_size()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    config = {"train_micro_batch_size_per_gpu": GLOBAL // world, "gradient_accumulation_steps": 1,
              "train_batch_size": GLOBAL, "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0,
              "checkpoint": {"load_universal": universal}}
    return deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)[0]


def _step(engine, step):
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(GLOBAL, 5, generator=torch.Generator().manual_seed(step))
    b = GLOBAL // world
    engine.backward(engine(x[rank * b:(rank + 1) * b]).pow(2).mean())
    engine.step()


def _params(engine):
    from deepspeed.utils import safe_get_full_fp32_param
    return [round(float(safe_get_full_fp32_param(p).double().sum()), 9) for p in engine.module.parameters()]


def save(ckpt, stage):
    from deepspeed.checkpoint import constants as c

    engine = _engine(stage)
    for step in range(3):
        _step(engine, step)
    engine.save_checkpoint(ckpt, tag="t", client_state={
        c.UNIVERSAL_CHECKPOINT_INFO: {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
    _step(engine, 3)
    _step(engine, 4)
    return _params(engine)


def repeat_losses(steps=8):
    """ZeRO-3, 2 ranks, accumulation 2: the losses of ``steps`` micro-batches (the same in every run of a
    deterministic DeepSpeed)."""
    import torch
    import torch.distributed as dist

    engine = _engine(3)
    losses = []
    for step in range(steps):
        x = torch.randn(GLOBAL // dist.get_world_size(), 5, generator=torch.Generator().manual_seed(step * 10 + dist.get_rank()))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(round(float(loss), 6))
    return losses


def load(ckpt, stage, universal):
    engine = _engine(stage, universal)
    engine.load_checkpoint(ckpt, tag="t_universal" if universal else "t")
    _step(engine, 3)
    _step(engine, 4)
    return _params(engine)


# ---------------------------------------------------------------------- one version, inside its venv
def _error(text) -> str:
    lines = [line for line in str(text).splitlines() if "Error" in line]
    return (lines[-1] if lines else str(text)[-200:]).strip()[:200]


def survey(work: Path, repeats: int) -> dict:
    """Run in the version's own interpreter: the checks of the module docstring."""
    sys.path.insert(0, str(ROOT))
    from ffc_parallel.testing import run_ranks

    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return {"imports": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    record = {"imports": True, "deepspeed": deepspeed.__version__}
    env = {"LOCAL_SIZE": "4"}   # DeepSpeed's CPU accelerator otherwise asks numactl for the device count
    for stage in (1, 2, 3):
        ckpt = work / f"zero{stage}"
        shutil.rmtree(ckpt, ignore_errors=True)
        result = {}
        try:
            reference = run_ranks("benchmarks.deepspeed_versions:save", 4, timeout=300, env=env,
                                  kwargs=dict(ckpt=str(ckpt), stage=stage))[0]
            result["train"] = True
        except Exception as exc:  # noqa: BLE001
            record[f"zero{stage}"] = {"train": False, "error": _error(exc)}
            continue
        try:
            same = run_ranks("benchmarks.deepspeed_versions:load", 4, timeout=300, env=env,
                             kwargs=dict(ckpt=str(ckpt), stage=stage, universal=False))[0]
            result["resume"] = same == reference
        except Exception as exc:  # noqa: BLE001
            result["resume"], result["resume_error"] = False, _error(exc)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(ckpt / "t"), "--output_folder", str(ckpt / "t_universal")],
                              capture_output=True, text=True)
        if proc.returncode:
            result["universal"], result["universal_error"] = False, _error(proc.stderr)
        else:
            try:
                other = run_ranks("benchmarks.deepspeed_versions:load", 3, timeout=300, env=dict(env, LOCAL_SIZE="3"),
                                  kwargs=dict(ckpt=str(ckpt), stage=stage, universal=True))[0]
                result["universal"] = all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(other, reference))
                if not result["universal"]:
                    result["universal_error"] = f"parameters after two steps {other} vs uninterrupted {reference}"
            except Exception as exc:  # noqa: BLE001
                result["universal"], result["universal_error"] = False, _error(exc)
        record[f"zero{stage}"] = result
    runs = [tuple(run_ranks("benchmarks.deepspeed_versions:repeat_losses", 2, timeout=300, env=env)[0])
            for _ in range(repeats)]
    majority = max(set(runs), key=runs.count) if runs else None
    record["zero3_repeats"] = {"runs": repeats, "deviating": sum(run != majority for run in runs)}
    return record


def _venv_python(venvs: Path, version: str) -> Path:
    venv = venvs / f"deepspeed-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + [os.environ.get("FFC_TORCH_SPEC", "torch==2.13.0")], check=True)
        subprocess.run(pip + [f"deepspeed=={version}", "numpy", "tqdm", "pyyaml", "mpi4py"], check=True)
    return python


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help="DeepSpeed versions to survey")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/deepspeed_versions.json"))
    parser.add_argument("--venvs", default="/tmp/ffc_deepspeed_venvs", help="where the virtual environments go")
    parser.add_argument("--zero3-repeats", type=int, default=8,
                        help="repeat a 2-rank ZeRO-3 run this often and count runs whose losses deviate "
                             "(ZeRO-3's gather races under gloo before 0.19.8)")
    parser.add_argument("--survey-here", metavar="WORKDIR", help=argparse.SUPPRESS)   # the child's entry
    args = parser.parse_args(argv)
    if args.survey_here:
        print(json.dumps(survey(Path(args.survey_here), args.zero3_repeats)))
        return 0
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for version in args.versions:
        python = _venv_python(Path(args.venvs), version)
        work = Path(args.venvs) / f"work-{version}"
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--survey-here", str(work),
                               "--zero3-repeats", str(args.zero3_repeats)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        lines = proc.stdout.strip().splitlines()
        record = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": _error(proc.stderr)}
        record["torch"] = os.environ.get("FFC_TORCH_SPEC", "torch==2.13.0")
        results[version] = record
        print(version, json.dumps(record), flush=True)
        out.write_text(json.dumps(dict(sorted(results.items(), key=lambda kv: [int(p) for p in kv[0].split(".")])),
                                  indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
