"""What a training run leaves behind: ``metrics.csv`` and TensorBoard (:class:`RunLog`), ``metrics.json``, PNG plots
(rendered headless) and a one-screen summary."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from .metrics import BUCKET_NAMES


def open_step_log(path: Path, columns, resume_step: int | None):
    """``(file, csv writer)`` of a log whose first column is the step, started anew with its header; a
    resumed run (``resume_step``) keeps the rows up to the checkpoint's step and drops the later ones
    (logged before a crash, then logged again by the resumed run)."""
    kept = []
    if resume_step is not None and path.exists():
        with open(path, newline="") as f:
            kept = [row for row in list(csv.reader(f))[1:] if row and int(row[0]) <= resume_step]
    file = open(path, "w", newline="")
    writer = csv.writer(file)
    writer.writerows([list(columns)] + kept)
    file.flush()
    return file, writer


class RunLog:
    """Rank 0's log rows: ``metrics.csv`` and TensorBoard scalars (other ranks log nothing).

    ``resume_step``: a resumed run keeps the rows up to the checkpoint's step and drops the later ones
    (logged before a crash, then logged again by the resumed run)."""

    COLUMNS = ("step", "epoch", "loss", "lr", "loss_scale", "samples_per_s", "elapsed_s", "skipped_images")

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.file, self.writer = open_step_log(out_dir / "metrics.csv", self.COLUMNS, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            print("ffc-train: tensorboard not installed, TensorBoard logging off (pip install tensorboard)",
                  file=sys.stderr)

    def row(self, **values) -> None:
        if not self.enabled:
            return
        self.writer.writerow([values[c] for c in self.COLUMNS])
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "loss_scale", "samples_per_s", "skipped_images"):
                self.tb.add_scalar(f"train/{key}", values[key], values["step"])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.enabled and self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_log(csv_path) -> dict[str, list[float]]:
    """The columns of a training log CSV as float lists (empty cells become NaN)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = rows[0].keys() if rows else []
    return {c: [float(r[c]) if r[c] not in ("", None) else math.nan for r in rows] for c in cols}


def smoothing_window(rows: int) -> int:
    """Log rows averaged by loss.png's moving average: a tenth of the rows, at least 3 (fewer rows: none)."""
    return 0 if rows < 3 else max(3, rows // 10)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_plots(out_dir, log: dict[str, list[float]], metrics: dict, curves: dict) -> list[Path]:
    """``loss.png``, ``lr.png``, ``bucket_accuracy.png``, ``roc.png`` under ``out_dir``; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)

    steps = log.get("step", [])
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        window = smoothing_window(len(steps))
        if window:   # under the raw line, wide and pale, so both show
            ax.plot(steps, _smooth(log["loss"], window), lw=3.0, alpha=0.45, color="tab:orange",
                    label=f"moving average of {window} log rows")
        ax.plot(steps, log["loss"], lw=0.9, marker="." if len(steps) <= 200 else None, ms=3, color="tab:blue",
                label="loss (each log row: mean over --log-every steps)")
        ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
        ax.legend()
        save(fig, "loss.png")
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(steps, log["lr"])
        ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
        save(fig, "lr.png")

    accs = [metrics.get(f"acc_{b}") for b in BUCKET_NAMES]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    bars = ax.bar(BUCKET_NAMES, [a if a is not None else 0 for a in accs], color=["#c44", "#e93", "#4a4"])
    for bar, a in zip(bars, accs):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, "n/a" if a is None else f"{a:.1%}",
                ha="center", va="bottom")
    ax.set(ylim=(0, 1.1), ylabel="top-1 accuracy (held-out images)",
           title="Accuracy by class frequency")
    save(fig, "bucket_accuracy.png")

    if curves.get("fpr"):
        fig, ax = plt.subplots(figsize=(5, 4))
        fpr = [max(f, 1e-6) for f in curves["fpr"]]
        ax.plot(fpr, curves["tpr"], lw=1.6, label=f"AUC {metrics.get('roc_auc', float('nan')):.3f}")
        ax.set_xscale("log")
        ax.set(xlim=(1e-5, 1), ylim=(0, 1.01), xlabel="false accept rate", ylabel="true accept rate",
               title="Verification ROC (unseen identities)")
        ax.legend(loc="lower right")
        save(fig, "roc.png")
    return paths


SUMMARY_ROWS = (  # (key, label, percent?)
    ("top1_seen", "top-1, held-out images of training ids", True),
    ("top5_seen", "top-5, held-out images of training ids", True),
    ("acc_head", "  top-1 on head classes (many images)", True),
    ("acc_medium", "  top-1 on medium classes", True),
    ("acc_tail", "  top-1 on tail classes (few images)", True),
    ("top1_test", "top-1, your test set (--eval-data-path)", True),
    ("top5_test", "top-5, your test set (--eval-data-path)", True),
    ("tar_at_far_1e-3", "TAR @ FAR=1e-3, unseen ids", True),
    ("tar_at_far_1e-4", "TAR @ FAR=1e-4, unseen ids", True),
    ("roc_auc", "ROC AUC, unseen ids", False),
    ("recall_at_1", "Recall@1, unseen ids", True),
    ("recall_at_5", "Recall@5, unseen ids", True),
    ("knn_top1", "kNN top-1 (k=20), held-out labelled images", True),
    ("linear_probe_top1", "linear-probe top-1, held-out labelled images", True),
)


def summary_text(metrics: dict, out_dir) -> str:
    """A one-screen summary of a finished run (with the untrained model's numbers when evaluated)."""
    before = metrics.get("before_training") or {}

    def fmt(value, percent):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "n/a"
        return f"{value:.1%}" if percent else f"{value:.4f}"

    lines = ["=" * 72, f" ffc-train: {metrics.get('description', '')}",
             f" {metrics.get('world_size')} ranks, {metrics.get('steps')} steps ({metrics.get('epochs')} epochs) in "
             f"{metrics.get('train_seconds', 0):.0f} s, {metrics.get('samples_per_s', 0):,.0f} samples/s; loss "
             f"{metrics.get('loss_first', math.nan):.2f} -> {metrics.get('loss_last', math.nan):.2f}",
             "-" * 72, f" {'metric':<44}{'trained':>12}{'untrained' if before else '':>14}"]
    for key, label, percent in SUMMARY_ROWS:
        if key not in metrics and key not in before:
            continue  # not measured for this task (e.g. no classifier of training ids under FFC)
        untrained = fmt(before.get(key), percent) if before else ""
        lines.append(f" {label:<44}{fmt(metrics.get(key), percent):>12}{untrained:>14}")
    for name, m in (metrics.get("verification") or {}).items():
        lines.append(f" {name + ' (.bin): 10-fold accuracy':<44}{m['accuracy']:>11.2%} +- {m['accuracy_std']:.2%}")
    lines += ["-" * 72,
              (f" {metrics['seen_images']} held-out images of training ids; " if "seen_images" in metrics else
               f" {metrics.get('probe_images')} held-out labelled images (half bank, half queries); ")
              + f"{metrics.get('unseen_images')} images of unseen ids ({metrics.get('verification_pairs', 0):,} pairs)",
              f" outputs: {out_dir}/metrics.json, metrics.csv, plots/*.png, tensorboard/, checkpoints/",
              "=" * 72]
    return "\n".join(lines)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics_json(path, metrics: dict) -> None:
    """``metrics`` as indented JSON (NaN written as null)."""
    Path(path).write_text(json.dumps(_finite_or_none(metrics), indent=2, sort_keys=True) + "\n")
