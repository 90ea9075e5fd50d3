"""``ffc-train --val-targets lfw,cfp_fp,agedb_30``: insightface's verification sets during and after training.

A target is a name, looked up as ``<name>.bin`` in the directory of ``--data-path`` (where insightface's
data sets keep ``lfw.bin`` next to ``train.rec``), or the path of a ``.bin`` file. Every ``--val-every``
steps and at the end of the run every rank embeds its share of each set's images
(:func:`~ffc_parallel.evaluation.verification.evaluate_verification`); every rank then holds the same
numbers. Rank 0 writes them to ``verification.csv`` (one row per step and target) and TensorBoard
(``val/<name>_acc``, ``val/<name>_acc_std``, ``val/<name>_tar_at_far_1e-3``); ``metrics.json`` gets the
last ones. ``--val-best-target NAME`` points ``checkpoints/best`` (written atomically, like ``latest``)
at the checkpoint of the step with the best accuracy on NAME, and ``checkpoints/best.json`` says which
step and accuracy that was.
"""
from __future__ import annotations

import json
from pathlib import Path

from ffc_parallel.checkpoint_files import atomic_write_bytes
from ffc_parallel.distributed.collectives import average_batchnorm_stats_
from ffc_parallel.evaluation.report import open_step_log
from ffc_parallel.evaluation.verification import evaluate_verification, load_verification_bin

COLUMNS = ("step", "target", "accuracy", "accuracy_std", "threshold", "tar_at_far_1e-3", "pairs")


def resolve_val_targets(opts) -> dict:
    """``{name: path}`` of ``--val-targets``; raises ``FileNotFoundError`` naming a missing file and
    ``ValueError`` for options that do not fit together (before any training)."""
    names = [t.strip() for t in (opts.val_targets or "").split(",") if t.strip()]
    if not names:
        if opts.val_best_target or opts.val_every:
            raise ValueError("--val-best-target / --val-every need --val-targets (e.g. lfw,cfp_fp,agedb_30)")
        return {}
    if opts.val_every < 0:
        raise ValueError(f"--val-every must be 0 (end of the run only) or a number of steps, got {opts.val_every}")
    data_dir = Path(opts.data_path) if opts.data_path else None
    if data_dir is not None and (data_dir.is_file() or data_dir.suffix == ".rec"):   # train.rec: its directory
        data_dir = data_dir.parent
    targets = {}
    for target in names:
        if target.endswith(".bin") or "/" in target:
            path = Path(target)
        elif data_dir is None:
            raise ValueError(f"--val-targets {target}: a name is looked up as {target}.bin next to --data-path, and "
                             f"--data {opts.data} has none; give the path of the .bin file")
        else:
            path = data_dir / f"{target}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"--val-targets {target}: verification set {path} not found")
        if path.stem in targets:
            raise ValueError(f"--val-targets: two targets are named {path.stem} ({targets[path.stem]}, {path})")
        targets[path.stem] = path
    if opts.val_best_target is not None and opts.val_best_target not in targets:
        raise ValueError(f"--val-best-target {opts.val_best_target} is not one of --val-targets "
                         f"({', '.join(targets)})")
    return targets


class Validation:
    """The run's verification sets, their log and the best checkpoint (``rank`` 0 writes the files)."""

    def __init__(self, opts, input_shape, out_dir: Path, rank: int, resume_step: int | None):
        self.sets = {name: load_verification_bin(path, name) for name, path in resolve_val_targets(opts).items()}
        self.opts, self.input_shape, self.rank = opts, input_shape, rank
        self.ckpt_dir, self.done_at, self.last = out_dir / "checkpoints", None, {}
        self.best = {}
        if not self.sets or rank != 0:
            return
        best = self.ckpt_dir / "best.json"
        if resume_step is not None and best.exists():
            self.best = json.loads(best.read_text())
        self.file, self.writer = open_step_log(out_dir / "verification.csv", COLUMNS, resume_step)

    def due(self, step: int) -> bool:
        return bool(self.sets) and self.opts.val_every > 0 and step % self.opts.val_every == 0

    def run(self, step: int, recipe, checkpoint, log) -> None:
        """Evaluate every set at ``step`` (collective: every rank calls); ``checkpoint()`` saves this step
        when it is the best so far on ``--val-best-target``."""
        if not self.sets or self.done_at == step:
            return
        average_batchnorm_stats_(recipe.model)   # one model in eval mode on every rank
        self.last = evaluate_verification(recipe.eval_backbone, self.sets, self.input_shape,
                                          self.opts.eval_batch_size, recipe.device)
        self.done_at = step
        for name, m in self.last.items():
            log.scalars("val", {f"{name}_acc": m["accuracy"], f"{name}_acc_std": m["accuracy_std"],
                                f"{name}_tar_at_far_1e-3": m["tar_at_far_1e-3"]}, step)
            if self.rank == 0:
                self.writer.writerow([step, name] + [m[c] for c in COLUMNS[2:]])
                self.file.flush()
        target = self.opts.val_best_target
        if target is None:
            return
        accuracy = self.last[target]["accuracy"]   # the same on every rank: so is the decision
        if self.best and accuracy <= self.best["accuracy"]:
            return
        checkpoint()
        self.best = {"target": target, "accuracy": accuracy, "step": step, "tag": f"step{step}"}
        if self.rank == 0:
            atomic_write_bytes(self.ckpt_dir / "best.json", lambda f: f.write(json.dumps(self.best).encode()))
            atomic_write_bytes(self.ckpt_dir / "best", lambda f: f.write(self.best["tag"].encode()))

    def report(self) -> dict:
        """For ``metrics.json``: ``verification`` (the last numbers of each set) and ``verification_best``."""
        if self.rank == 0 and self.sets:
            self.file.close()
        out = {"verification": self.last} if self.last else {}
        if self.best:
            out["verification_best"] = self.best
        return out
