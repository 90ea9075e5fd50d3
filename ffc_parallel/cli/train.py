"""``ffc-train``: train a backbone with a class-sharded margin-softmax head, then evaluate it.

    deepspeed --num_gpus 2 --module ffc_parallel.cli.train --config my_run.yaml --epochs 5
    mpirun -np 4 ffc-train --data imagefolder --data-path /data/faces --backbone resnet
    ffc-train --max-steps 20                          # a single process
    ffc-train --head ffc --pool-size 0.1              # FFC's class pool instead of a classifier
    ffc-train --task instance                         # one class per image (self-supervised)
    ffc-train --reweight cb_ce --drw-epoch 2 --sampler sqrt --drs-epoch 2 --xbm-size 4096

Options come from (last wins) the defaults below, a YAML/JSON ``--config`` file with the same keys
(underscores), and command-line flags. The DeepSpeed config (``--deepspeed-config``) supplies
precision, ZeRO and clipping; ``ffc-train`` sets its batch size, accumulation, optimizer and schedule
from the options. Writes under ``--output-dir``: ``metrics.json``, ``metrics.csv`` (the training log),
``tensorboard/``, ``plots/*.png``, ``checkpoints/``, and ``decoded/`` (image files decoded once, ``--decode-cache``).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ffc_parallel.data.samplers import SAMPLERS
from ffc_parallel.losses.pairs import PAIR_LOSSES
from ffc_parallel.losses.reweight import REWEIGHTING
from ffc_parallel.optim.center_store import parse_center_storage


def _opt(default, help: str, section: str, choices=None, kind=None):
    """An option; ``kind`` (default: the default's type) parses its values."""
    kind = kind or (type(default) if default is not None else str)
    return field(default=default, metadata={"help": help, "section": section, "choices": choices, "type": kind})


@dataclass
class TrainOptions:
    """Every ``ffc-train`` option (config-file key = field name; flag = ``--field-name``)."""

    # data
    data: str = _opt("synthetic", "data source", "data", ("synthetic", "digits", "imagefolder", "recordio"))
    data_path: str = _opt(None, "ImageFolder root, or the directory / train.rec of a RecordIO data set", "data")
    num_identities: int = _opt(10_000, "synthetic: training identities (10k to 10M+)", "data")
    synthetic_mode: str = _opt("vector", "synthetic: render feature vectors or images", "data", ("vector", "image"))
    feature_dim: int = _opt(64, "synthetic vectors: input dimension", "data")
    image_size: int = _opt(16, "image side in pixels (synthetic images, ImageFolder, RecordIO)", "data")
    channels: int = _opt(1, "image channels: 1 (grey) or 3 (RGB)", "data")
    label_noise: float = _opt(0.02, "synthetic: fraction of wrong training labels", "data")
    max_images: int = _opt(200, "synthetic: most images of one identity (the long tail's head)", "data")
    unseen_identities: int = _opt(300, "synthetic: unseen identities for verification / retrieval", "data")
    eval_ids_per_bucket: int = _opt(300, "synthetic: held-out identities per frequency bucket", "data")
    unseen_fraction: float = _opt(0.1, "real data: fraction of classes kept out of training", "data")
    max_eval_images: int = _opt(4000, "real data: cap on each evaluation set", "data")
    bucket_edges: list = _opt((20, 100), "class-frequency buckets: tail < a <= medium <= b < head", "data")
    num_workers: int = _opt(None, "DataLoader workers per rank decoding image files (default: 0 below 4 CPUs per "
                                  "rank, else CPUs per rank - 2, at most 8)", "data", kind=int)
    decode_cache: str = _opt("auto", "image files: a directory where they are decoded once into a uint8 memory-mapped "
                                     "array read by every epoch; none: decode on every access; auto: "
                                     "<output-dir>/decoded when the array takes at most 4 GiB", "data")
    eval_data_path: str = _opt(None, "image files: your test set (ImageFolder root or RecordIO of the same kind as "
                                     "--data-path, class names matching training); top-1/top-5 in metrics.json as "
                                     "top1_test / top5_test", "data")
    no_flip: bool = _opt(False, "image files: no random horizontal flip of the training images (default: half)", "data")
    on_bad_image: str = _opt("fail", "an image file that does not decode: fail (every rank stops, the file named) or "
                             "skip (another image of its class instead, counted in the log)", "data", ("fail", "skip"))
    # model
    backbone: str = _opt("mlp", "mlp, resnet, insightface's r18 / r34 / r50 / r100 / r200 / mbf, or a "
                                "torchvision/timm model name", "model")
    gradient_checkpointing: bool = _opt(False, "r18 ... r200: recompute each stage in the backward pass (less "
                                               "activation memory, about one more forward of compute)", "model")
    embedding_dim: int = _opt(128, "embedding (and class center) dimension", "model")
    margin: str = _opt("arcface", "arcface, cosface, none, or 's,m1,m2,m3' (CombinedMargin)", "model")
    scale: float = _opt(None, "softmax scale s (default: 16 below 10,000 classes, else 64; FFC: 32)", "model",
                        kind=float)
    sample_rate: float = _opt(1.0, "Partial FC: fraction of each rank's classes per step", "model")
    center_storage: str = _opt("device", "where the class centers and their optimizer state live: device, host "
                                         "(host memory) or disk:/local/nvme/dir (memory-mapped files; only the "
                                         "rows of a step on the device)", "model")
    center_dtype: str = _opt("fp32", "dtype of the class centers (bf16/fp16 keep an fp32 master copy unless "
                                     "--no-center-master-weights)", "model", ("fp32", "bf16", "fp16"))
    no_center_master_weights: bool = _opt(False, "bf16/fp16 centers without their fp32 master copy (4 bytes less "
                                                 "per weight; updates smaller than the half precision are lost)",
                                          "model")
    negative_sampling: str = _opt("uniform", "Partial FC negatives: uniform rows, or blocks of --sample-block "
                                             "consecutive rows (whole pages for a disk store)", "model",
                                  ("uniform", "block"))
    sample_block: int = _opt(None, "rows per block of --negative-sampling block (default: 64 KiB of centers)",
                             "model", kind=int)
    task: str = _opt("classify", "classify identities, or instance classification (one class per image, "
                                 "self-supervised)", "model", ("classify", "instance"))
    head: str = _opt("sharded", "class-sharded classifier, or FFC's dynamic class pool", "model", ("sharded", "ffc"))
    # FFC (--head ffc)
    pool_size: float = _opt(30_000.0, "FFC: class-pool slots, or a fraction of the identities if <= 1", "ffc")
    gallery_momentum: float = _opt(0.99, "FFC: EMA momentum of the gallery network", "ffc")
    ffc_identities: int = _opt(None, "FFC dual loader: identities per rank and step, 2 images each (default "
                                     "batch_size/4); the rest of the batch is uniform images", "ffc", kind=int)
    prefill_fraction: float = _opt(0.1, "FFC: fraction of the pool filled with gallery features before training",
                                   "ffc")
    # instance classification (--task instance)
    temperature: float = _opt(0.15, "instance: cosine-softmax temperature", "instance")
    smoothing_neighbours: int = _opt(5, "instance: K of hardest-class label smoothing (0: off)", "instance")
    smoothing_alpha: float = _opt(0.2, "instance: target mass spread over the K hardest classes", "instance")
    no_contrastive_prior: bool = _opt(False, "instance: keep the random class rows (skip the contrastive prior)",
                                      "instance")
    view_noise: float = _opt(0.2, "instance: Gaussian noise of a random view (input units)", "instance")
    view_shift: int = _opt(2, "instance: random translation of a view in pixels (images)", "instance")
    # long-tail tricks and cross-batch memory (--task classify, sharded head)
    reweight: str = _opt("ce", "re-weighting of the loss", "long-tail", REWEIGHTING)
    reweight_beta: float = _opt(0.999, "cb_ce / cb_focal: class-balanced beta", "long-tail")
    reweight_gamma: float = _opt(1.0, "cs_ce: weights (n_min / n_c)^gamma", "long-tail")
    focal_gamma: float = _opt(2.0, "focal, cb_focal, sigmoid_focal: focusing gamma", "long-tail")
    drw_epoch: int = _opt(None, "DRW: apply the --reweight class weights from this epoch on", "long-tail", kind=int)
    sampler: str = _opt("instance", "re-sampling of the training data (instance: plain shuffling)", "long-tail",
                        SAMPLERS)
    drs_epoch: int = _opt(None, "DRS: plain shuffling before this epoch, --sampler from it on", "long-tail", kind=int)
    cam_epoch: int = _opt(None, "CAM-based balanced sampling from this epoch: class-balanced draws, a draw of class c "
                                "CAM-transformed with probability 1 - n_c / max n (images, --backbone resnet)",
                          "long-tail", kind=int)
    mixup_alpha: float = _opt(0.0, "mixup: lambda ~ Beta(alpha, alpha) (0: off)", "long-tail")
    mixup_layers: str = _opt(None, "manifold mixup: comma-separated backbone module names ('input' = input "
                                   "mixup; default input only)", "long-tail")
    mixup_stop_epoch: int = _opt(None, "mixup off from this epoch on (fine-tuning after mixup)", "long-tail", kind=int)
    xbm_size: int = _opt(0, "cross-batch memory slots (0: off); its pair loss is added to the head's", "xbm")
    xbm_weight: float = _opt(1.0, "weight of the memory term", "xbm")
    xbm_warmup: int = _opt(0, "micro-batches before the memory is used and filled", "xbm")
    xbm_loss: str = _opt("contrastive", "pair loss of the batch and memory terms", "xbm", tuple(PAIR_LOSSES))
    xbm_margin: float = _opt(0.5, "contrastive pair loss margin", "xbm")
    # optimizer and schedule
    optimizer: str = _opt("sgd", "optimizer of backbone and centers", "optim", ("sgd", "adam", "adamw"))
    lr: float = _opt(0.1, "peak learning rate", "optim")
    momentum: float = _opt(0.9, "SGD momentum", "optim")
    weight_decay: float = _opt(5e-4, "weight decay", "optim")
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", "optim", ("cosine", "linear", "constant"))
    warmup_steps: int = _opt(50, "linear warmup steps", "optim")
    gradient_clipping: float = _opt(None, "clip the global gradient norm (backbone + every center shard once) "
                                          "at this value, 0 = off (default: the DeepSpeed config's value; "
                                          "DeepSpeed 0.19 itself defaults to 1.0)", "optim", kind=float)
    # run
    epochs: int = _opt(3, "passes over the training data", "run")
    max_steps: int = _opt(None, "stop after this many optimizer steps (default: all epochs)", "run", kind=int)
    batch_size: int = _opt(256, "micro-batch per rank", "run")
    gradient_accumulation: int = _opt(1, "micro-batches per optimizer step", "run")
    deepspeed_config: str = _opt(None, "DeepSpeed JSON config (default: fp32, ZeRO stage 0)", "run")
    output_dir: str = _opt("runs/quickstart", "where logs, plots, metrics and checkpoints go", "run")
    host_allocator: str = _opt("auto", "glibc's heap: mapped (blocks of 1 MiB or more mapped on their own and "
                                       "unmapped when freed: the peak RSS follows the live tensors ffc-plan "
                                       "counts, 0.02 GB less at 5e5 rows a step, but every such block "
                                       "faults in fresh: no slower with memory free, up to a tenth slower with a disk store "
                                       "larger than memory), default (glibc's own), or auto: mapped for centers "
                                       "in a host or disk store on a CPU run, else default; docs/benchmarks.md",
                               "run", ("auto", "default", "mapped"))
    resume: bool = _opt(False, "continue from the latest checkpoint in output_dir/checkpoints", "run")
    checkpoint_every: int = _opt(0, "also checkpoint every N optimizer steps (0: end of each epoch only)", "run")
    log_every: int = _opt(10, "optimizer steps between log rows", "run")
    eval_batch_size: int = _opt(512, "batch size of the final evaluation", "run")
    eval_before: bool = _opt(False, "also evaluate the untrained model (metrics.json: before_training)", "run")
    val_targets: str = _opt(None, "insightface verification sets: names (<name>.bin next to --data-path) or .bin "
                                  "paths, comma-separated, e.g. lfw,cfp_fp,agedb_30", "run")
    val_every: int = _opt(0, "also evaluate --val-targets every N optimizer steps (0: at the end only)", "run")
    val_best_target: str = _opt(None, "keep checkpoints/best at the step with the best accuracy on this target", "run")
    seed: int = _opt(0, "seed of data, initialisation and sampling", "run")


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}


def status_bytes(field: str = "VmHWM") -> int | None:
    """A memory figure of this process from ``/proc/self/status`` in bytes: ``VmHWM`` (peak resident
    memory), ``VmRSS`` (resident now); None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_allocator_mode(option: str, center_storage: str, device_type: str) -> str:
    """The glibc mode ``--host-allocator option`` asks for: ``auto`` is ``mapped`` where the class centers
    live in a host or disk store (``center_storage``) and the head computes on a CPU (``device_type``):
    there the step's row tensors are host tensors of a few MiB made every step, which glibc's default
    heap keeps (the RSS then runs 0.07-0.08 GB over what ffc-plan counts, 0.05 GB mapped: memory a disk
    store's page cache lacks); otherwise ``default``."""
    if option != "auto":
        return option
    stored = parse_center_storage(center_storage)[0] != "device"
    return "mapped" if stored and device_type == "cpu" else "default"


def set_host_allocator(mode: str) -> bool:
    """``"mapped"``: glibc maps every block of 1 MiB or more on its own and unmaps it when it is freed
    (``mallopt(M_MMAP_THRESHOLD)``), and keeps the heap's top until 256 MiB of it are free
    (``M_TRIM_THRESHOLD``), as ``MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=268435456`` would.
    With glibc's default the threshold rises to the largest block freed (up to 32 MiB), and the heap
    keeps the step's freed index tensors: the RSS runs 0.1 GB over the live memory at 5e5 rows per step.
    Returns whether the setting took (False for ``"default"``, or where the C library is not glibc)."""
    if mode == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def release_free_heap() -> None:
    """Hand the memory glibc keeps free back to the system (``malloc_trim``; nothing elsewhere), so that the
    RSS read next is the live memory: the setup's freed blocks, which training reuses without the RSS
    growing, moved the RSS before training by 0.13 GB between runs of one command."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def reset_peak_rss() -> bool:
    """Start this process's ``VmHWM`` again from its current RSS (Linux >= 4.0: ``/proc/self/clear_refs``),
    so that the next peak is the training's, not the setup's; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _parse_value(name: str, value):
    f = FIELDS[name]
    if value is None:
        return None
    kind = f.metadata["type"]
    if name == "bucket_edges":
        vals = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
        if len(vals) != 2 or not 0 < vals[0] <= vals[1]:
            raise ValueError(f"bucket_edges must be two increasing counts like 20,100, got {value!r}")
        return vals
    if kind is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    return value


def load_config_file(path) -> dict:
    """A flat mapping of option names from a ``.yaml``/``.yml``/``.json`` file (sections are flattened)."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # optional sections: {data: {...}, model: {...}}
            flat.update(value)
        else:
            flat[key] = value
    flat = {k.replace("-", "_"): v for k, v in flat.items()}
    unknown = sorted(set(flat) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    return flat


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffc-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    groups = {}
    for f in dataclasses.fields(TrainOptions):
        section = f.metadata["section"]
        group = groups.setdefault(section, parser.add_argument_group(section))
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action="store_const", const=True, default=None,
                               help=f"{f.metadata['help']} (default: off)")
        else:
            group.add_argument(flag, default=None, help=f"{f.metadata['help']} (default: {f.default})",
                               choices=f.metadata["choices"])
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    return parser


def parse_options(argv=None) -> TrainOptions:
    """Defaults < ``--config`` file < flags."""
    args = build_parser().parse_args(argv)
    values = {}
    if args.config:
        values.update(load_config_file(args.config))
    values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    return TrainOptions(**{k: _parse_value(k, v) for k, v in values.items()})


def decode_cache(opts: TrainOptions) -> dict:
    """``build_data``'s decode-cache arguments of ``--decode-cache``."""
    if opts.decode_cache == "none":
        return {}
    if opts.decode_cache == "auto":
        return {"decode_cache": Path(opts.output_dir) / "decoded", "decode_cache_limit": 4 << 30}
    return {"decode_cache": Path(opts.decode_cache)}


# ---------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(opts: TrainOptions, total_steps: int) -> dict:
    """The user's DeepSpeed config (or fp32 / stage 0) with batch, optimizer and schedule from ``opts``."""
    config = json.loads(Path(opts.deepspeed_config).read_text()) if opts.deepspeed_config else {
        "zero_optimization": {"stage": 0}}
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = opts.batch_size
    config["gradient_accumulation_steps"] = opts.gradient_accumulation
    params = {"lr": opts.lr, "weight_decay": opts.weight_decay}
    if opts.optimizer == "sgd":
        params["momentum"] = opts.momentum
        config["optimizer"] = {"type": "SGD", "params": params}
    else:
        config["optimizer"] = {"type": "AdamW" if opts.optimizer == "adamw" else "Adam", "params": params}
        if opts.optimizer == "adam":
            params["adam_w_mode"] = False
    if config.get("zero_optimization", {}).get("stage", 0) > 0:
        config.setdefault("zero_allow_untested_optimizer", True)
    if opts.gradient_clipping is not None:
        config["gradient_clipping"] = opts.gradient_clipping
    warmup = max(2, min(opts.warmup_steps, max(2, total_steps - 1)))
    total = max(total_steps, warmup + 1)
    if opts.schedule == "cosine":
        config["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.01}}
    elif opts.schedule == "linear":
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_lr": 0.0, "warmup_max_lr": opts.lr}}
    else:
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_num_steps": warmup, "warmup_type": "linear", "warmup_min_lr": 0.0, "warmup_max_lr": opts.lr}}
    config.setdefault("steps_per_print", 10 ** 9)  # ffc-train logs progress itself
    return config


# ---------------------------------------------------------------------- the run
def check_resumable(opts: TrainOptions) -> None:
    """With ``--resume``, raise unless ``output_dir/checkpoints`` holds a complete checkpoint."""
    ckpt_dir = Path(opts.output_dir) / "checkpoints"
    if opts.resume and not (ckpt_dir / "latest").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir} (train without --resume first)")


def build_engine(opts: TrainOptions, model, backbone, total_steps: int):
    """``fp.initialize`` on ``model`` (a ``HybridModel`` or an ``FFC``) with the run's DeepSpeed config."""
    import ffc_parallel as fp
    engine, _, _, _ = fp.initialize(model=model, config=deepspeed_config(opts, total_steps))
    # DeepSpeed's bf16/fp16 casts parameters but not BatchNorm running statistics, which CPU kernels
    # refuse to mix with low-precision weights: give the floating-point buffers the parameters' dtype.
    dtype = next(backbone.parameters()).dtype
    for buf in backbone.buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            buf.data = buf.data.to(dtype)
    return engine


class EpochPlan:
    """Optimizer steps of every epoch (re-samplers and DRS change an epoch's length) and the map
    from a global step to ``(epoch, step in epoch)``."""

    def __init__(self, steps_per_epoch: list[int], max_steps: int | None):
        if not steps_per_epoch or min(steps_per_epoch) == 0:
            raise ValueError(f"an epoch has fewer micro-batches than one optimizer step needs (steps per epoch: "
                             f"{steps_per_epoch}): lower --batch-size or --gradient-accumulation")
        self.ends = np.cumsum(steps_per_epoch).tolist()
        self.steps_per_epoch = steps_per_epoch
        self.total = min(self.ends[-1], max_steps) if max_steps is not None else self.ends[-1]

    def locate(self, step: int) -> tuple[int, int]:
        epoch = int(np.searchsorted(self.ends, step, side="right"))
        return epoch, step - (self.ends[epoch - 1] if epoch else 0)

    def epochs_done(self, step: int) -> float:
        if step >= self.ends[-1]:
            return float(len(self.ends))
        epoch, within = self.locate(step)
        return epoch + within / self.steps_per_epoch[epoch]


def train(opts: TrainOptions) -> dict | None:
    """Train and evaluate; returns the metrics on rank 0 (None elsewhere)."""
    import ffc_parallel as fp
    from ffc_parallel.cli.recipe import Recipe, check_options
    from ffc_parallel.cli.validation import Validation
    from ffc_parallel.data import build_data
    from ffc_parallel.distributed.collectives import average_batchnorm_stats_
    from ffc_parallel.evaluation.report import RunLog, read_log, summary_text, write_metrics_json, write_plots

    check_options(opts)
    info = fp.init_distributed()
    rank, world = info.rank, info.world_size
    device = info.device
    out_dir = Path(opts.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2) + "\n")

    check_resumable(opts)
    allocator = host_allocator_mode(opts.host_allocator, opts.center_storage, torch.device(device).type)
    allocator_took = set_host_allocator(allocator)
    if allocator != "default" and rank == 0:
        print(f"ffc-train: --host-allocator {opts.host_allocator}: {allocator}, " + (
            "glibc maps blocks of 1 MiB or more on their own" if allocator_took else "not glibc's malloc, ignored"),
            file=sys.stderr)
    torch.manual_seed(opts.seed)
    bundle = build_data(opts.data, path=opts.data_path, num_identities=opts.num_identities,
                        synthetic_mode=opts.synthetic_mode, image_size=opts.image_size, channels=opts.channels,
                        feature_dim=opts.feature_dim, label_noise=opts.label_noise, max_images=opts.max_images,
                        eval_ids_per_bucket=opts.eval_ids_per_bucket, unseen_identities=opts.unseen_identities,
                        unseen_fraction=opts.unseen_fraction, max_eval_images=opts.max_eval_images,
                        bucket_edges=tuple(opts.bucket_edges), on_bad_image=opts.on_bad_image,
                        eval_path=opts.eval_data_path, seed=opts.seed, **decode_cache(opts))
    if rank == 0:
        print(f"ffc-train: {bundle.description}", file=sys.stderr, flush=True)
    recipe = Recipe(opts, bundle, rank, world, device)
    gas = opts.gradient_accumulation
    plan = EpochPlan([recipe.micro_batches(e) // gas for e in range(opts.epochs)], opts.max_steps)
    total_steps = plan.total
    engine = recipe.prepare(lambda model: build_engine(opts, model, recipe.backbone, total_steps), opts.resume)
    dtype = next(recipe.backbone.parameters()).dtype

    step = 0
    if opts.resume:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
        recipe.load_client_state(client)
        if rank == 0:
            print(f"ffc-train: resumed from {ckpt_dir} at step {step}", file=sys.stderr, flush=True)

    log = RunLog(out_dir, enabled=rank == 0, resume_step=step if opts.resume else None)
    validation = Validation(opts, bundle.input_shape, out_dir, rank, resume_step=step if opts.resume else None)
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="ffc-train", unit="step", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)

    saved_at = [step if opts.resume else -1]

    def checkpoint():
        if saved_at[0] != step:
            average_batchnorm_stats_(recipe.model)   # one set of BatchNorm statistics in the checkpoint
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step, **recipe.client_state()})
            saved_at[0] = step

    before = None
    if opts.eval_before and step == 0:
        before, _ = recipe.evaluate(device)

    samples_per_step = opts.batch_size * world * gas
    setup_peak = status_bytes("VmHWM")
    release_free_heap()
    rss_before, training_started = status_bytes("VmRSS"), time.time()
    training_peak_known = reset_peak_rss()
    t_start, window_t, window_steps, train_seconds = time.monotonic(), time.monotonic(), 0, 0.0
    losses = []
    engine.train()
    while step < total_steps:
        epoch, step_in_epoch = plan.locate(step)
        recipe.start_epoch(epoch)
        micro = 0
        for x, y in recipe.batches(epoch, step_in_epoch * gas):
            if recipe.loss is not None:
                recipe.loss.step = step * gas + micro % gas  # global micro-batch index: mixup's draws
            loss = engine(x.to(device=device, dtype=dtype, non_blocking=True), y.to(device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())  # no device sync per step
            micro += 1
            if micro % gas:
                continue
            step += 1
            window_steps += 1
            if step % opts.log_every == 0 or step == total_steps:
                now = time.monotonic()
                rate = window_steps * samples_per_step / max(now - window_t, 1e-9)
                row = dict(step=step, epoch=round(plan.epochs_done(step), 4),
                           loss=torch.stack(losses).float().mean().item(), lr=float(engine.get_lr()[0]),
                           loss_scale=float(engine.loss_scale), samples_per_s=rate, elapsed_s=now - t_start,
                           skipped_images=recipe.skipped_images())
                log.row(**row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", samples_s=f"{rate:,.0f}",
                                    scale=f"{row['loss_scale']:g}", lr=f"{row['lr']:.3g}", refresh=False)
                losses, window_t, window_steps = [], now, 0
            if bar is not None:
                bar.update(1)
            if opts.checkpoint_every and step % opts.checkpoint_every == 0:
                checkpoint()
            if validation.due(step):
                validation.run(step, recipe, checkpoint, log)
            if step >= total_steps or step == plan.ends[epoch]:
                break
        train_seconds = time.monotonic() - t_start
        checkpoint()  # end of every epoch (and of the run)
    if bar is not None:
        bar.close()

    validation.run(step, recipe, checkpoint, log)
    average_batchnorm_stats_(recipe.model)
    skipped = recipe.skipped_images()
    training = None
    if rank == 0:
        rows = read_log(out_dir / "metrics.csv")
        training_peak = status_bytes("VmHWM")   # since reset_peak_rss() where that worked, else the run's
        training = dict(
            description=bundle.description, world_size=world, steps=step, epochs=round(plan.epochs_done(step), 3),
            train_seconds=train_seconds, skipped_images=skipped,
            samples_per_s=float(np.mean(rows["samples_per_s"][1:] or rows["samples_per_s"])) if rows else math.nan,
            loss_first=rows["loss"][0] if rows else math.nan, loss_last=rows["loss"][-1] if rows else math.nan,
            num_classes=bundle.num_classes, task=opts.task, head=opts.head, **recipe.sizes(), **validation.report(),
            peak_rss_bytes=max(filter(None, (setup_peak, training_peak)), default=None),
            rss_before_training_bytes=rss_before, training_started_unix_s=training_started,
            peak_rss_training_bytes=training_peak if training_peak_known else None,
            host_allocator=allocator if allocator_took else "default", **recipe.storage_report(step))
    try:
        metrics, curves = recipe.evaluate(device)
    except Exception as exc:   # the checkpoint is saved; keep what training measured
        log.close()
        if rank == 0:
            write_metrics_json(out_dir / "metrics.json", dict(training, evaluation_error=f"{type(exc).__name__}: {exc}"))
            print(f"ffc-train: evaluation failed ({exc}); the trained model is in {ckpt_dir} and the training "
                  f"metrics in {out_dir / 'metrics.json'}", file=sys.stderr, flush=True)
        raise
    log.scalars("eval", metrics, step)
    log.close()
    if rank != 0:
        return None
    metrics.update(training)
    if before is not None:
        metrics["before_training"] = before
    write_metrics_json(out_dir / "metrics.json", metrics)
    write_plots(out_dir / "plots", rows, metrics, curves)
    print(summary_text(metrics, out_dir), flush=True)
    return metrics


def main(argv=None) -> int:
    """The console entry point: returns 2 on bad options; after training, ends the process through
    :func:`~ffc_parallel.distributed.exit_distributed` (every rank waits for rank 0's report); an error in
    training is printed and ends the process at once, exit code 1 (the interpreter's teardown took seconds)."""
    try:
        opts = parse_options(argv)
        from ffc_parallel.cli.recipe import check_options
        check_options(opts)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ffc-train: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (the launch scripts forward it to every rank) unwinds like an exception: the log and
    # TensorBoard files are flushed and closed; a checkpoint being written stays in its staging directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        train(opts)
    except Exception:   # this rank's error, printed before its peers' collectives time out on it
        sys.excepthook(*sys.exc_info())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    from ffc_parallel.distributed import exit_distributed
    exit_distributed(0)


if __name__ == "__main__":
    sys.exit(main())
