"""What an ``ffc-train`` run builds from its options around the training loop of ``cli/train.py``.

A :class:`Recipe` holds, for one of the three kinds of run,

* ``--task classify`` (default): the backbone and :class:`~ffc_parallel.ShardedClassifier` under
  :func:`ffc_parallel.initialize`, with the long-tail tricks: re-weighting (``--reweight``, DRW
  ``--drw-epoch``), re-sampling (``--sampler``, DRS ``--drs-epoch``), mixup (``--mixup-alpha``) and
  cross-batch memory (``--xbm-size``);
* ``--task instance``: one class per training image (:func:`ffc_parallel.instance_classifier`),
  random views of the images, the contrastive prior, hardest-class label smoothing, kNN and
  linear-probe evaluation;
* ``--head ffc``: the :class:`~ffc_parallel.FFC` model (probe, EMA gallery, slot-sharded class pool)
  under :class:`~ffc_parallel.HybridEngine`, fed by FFC's dual loader;

the engine, the number of micro-batches and the batches of each epoch, what happens at the start of
an epoch, the extra checkpoint state and the end-of-run evaluation.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ffc_parallel as fp
from ffc_parallel.algorithms import StepLoss
from ffc_parallel.backbones import IRESNET_LAYERS
from ffc_parallel.data import RankLoader, frequency_buckets, labels_of
from ffc_parallel.data.augment import random_flip
from ffc_parallel.data.loader import load_batches
from ffc_parallel.distributed import streams
from ffc_parallel.distributed.collectives import all_reduce_
from ffc_parallel.distributed.lockstep import in_step
from ffc_parallel.optim.center_store import parse_center_storage

from .validation import resolve_val_targets

CENTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_margin(text: str | None):
    """``--margin``: "arcface", "cosface", "none" or "s,m1,m2,m3" (a :class:`~ffc_parallel.CombinedMargin`)."""
    if text is None or text.lower() == "none":
        return None
    if "," in text:
        return fp.CombinedMargin(*(float(v) for v in text.split(",")))
    return text


SMALL_SCALE, LARGE_SCALE_CLASSES = 16.0, 10_000


def head_scale(opts, num_classes: int) -> float | None:
    """``--scale``, or ffc-train's default for the shorthand margins: 16 below 10,000 classes (better on real
    image sets of 10 and 2,844 classes, worse on the built-in 10,000 identities: docs/benchmarks.md, "ffc-train
    on real images"), else the face recipes' 64 (``None``: the head's default). A ``s,m1,m2,m3`` margin
    carries its own scale."""
    if opts.scale is not None or "," in (opts.margin or ""):
        return opts.scale
    return SMALL_SCALE if num_classes < LARGE_SCALE_CLASSES else None


def check_options(opts) -> None:
    """Raise ``ValueError`` for combinations a run cannot honour (before any process group work), and
    ``FileNotFoundError`` for a missing ``--val-targets`` file."""
    resolve_val_targets(opts)
    if opts.eval_data_path is not None:
        if opts.data not in ("imagefolder", "recordio"):
            raise ValueError(f"--eval-data-path is a test set of image files like --data-path: it takes --data "
                             f"imagefolder or recordio, not {opts.data}")
        if opts.task != "classify" or opts.head == "ffc":
            raise ValueError("--eval-data-path is classified through the sharded head: it takes --task classify "
                             "and --head sharded")
        if not Path(opts.eval_data_path).exists():
            raise FileNotFoundError(f"--eval-data-path {opts.eval_data_path} does not exist")
    tricks = {"--reweight": opts.reweight != "ce", "--sampler": opts.sampler != "instance",
              "--cam-epoch": opts.cam_epoch is not None,
              "--mixup-alpha": opts.mixup_alpha > 0, "--xbm-size": opts.xbm_size > 0}
    used = [flag for flag, on in tricks.items() if on]
    if opts.head == "ffc" and (used or opts.task != "classify" or opts.sample_rate < 1.0):
        raise ValueError("--head ffc trains identities through its class pool: it takes no "
                         f"{', '.join(used) or '--task instance / --sample-rate'} (use the sharded head for those)")
    if opts.center_storage != "device":
        parse_center_storage(opts.center_storage)   # a clear error for a bad value
        stored = [flag for flag, on in {"--head ffc": opts.head == "ffc", "--task instance": opts.task == "instance",
                                        "--cam-epoch": opts.cam_epoch is not None}.items() if on]
        if stored:
            raise ValueError(f"--center-storage {opts.center_storage} keeps the class rows off the device, but "
                             f"{', '.join(stored)} needs them all there: use --center-storage device")
    if opts.task == "instance" and used:
        raise ValueError(f"--task instance uses its own targets (hardest-class smoothing): drop {', '.join(used)}")
    if opts.xbm_size and opts.mixup_alpha > 0:
        raise ValueError("--xbm-size with --mixup-alpha: a mixed embedding has no single label for the memory; "
                         "use one of them")
    if opts.drw_epoch is not None and opts.reweight not in ("cs_ce", "cb_ce", "cb_focal"):
        raise ValueError(f"--drw-epoch defers class weights, but --reweight {opts.reweight} has none: "
                         "use cs_ce, cb_ce or cb_focal")
    if opts.cam_epoch is not None and (opts.sampler != "instance" or opts.drs_epoch is not None):
        raise ValueError("--cam-epoch brings its own class-balanced sampler from that epoch on: drop --sampler / "
                         "--drs-epoch")
    if opts.gradient_checkpointing and opts.backbone not in IRESNET_LAYERS:
        raise ValueError(f"--gradient-checkpointing recomputes the stages of the IResNets "
                         f"({', '.join(IRESNET_LAYERS)}), not of --backbone {opts.backbone}")
    if opts.gradient_checkpointing and opts.mixup_alpha > 0 and set(mixup_layer_names(opts) or ["input"]) - {"input"}:
        raise ValueError("--gradient-checkpointing with manifold mixup (--mixup-layers): the mixing hook is gone "
                         "when a stage is recomputed in the backward pass; use input mixup or drop one of them")
    if opts.drs_epoch is not None and opts.sampler == "instance":
        raise ValueError("--drs-epoch switches to --sampler at that epoch: choose a re-sampler "
                         f"({', '.join(fp.data.SAMPLERS[1:])})")


def check_trainable_and_evaluable(opts, bundle, backbone) -> None:
    """Raise ``ValueError`` (the same on every rank: options and data are) for a run that would fail
    later: a batch of one under BatchNorm, evaluation sets that cannot give every metric."""
    if opts.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in backbone.modules()):
        raise ValueError(f"--batch-size {opts.batch_size} with --backbone {opts.backbone}: its BatchNorm needs at least "
                         "2 samples per rank in training; use --batch-size 2 or more")
    identities = torch.as_tensor(bundle.unseen[1])
    unique, counts = identities.unique(return_counts=True)
    if unique.numel() < 2 or not bool((counts >= 2).any()):
        raise ValueError(f"the evaluation split holds {unique.numel()} unseen identities, {int((counts >= 2).sum())} of "
                         "them with two or more images: verification needs two identities and one same-identity pair. "
                         "Raise --unseen-identities (synthetic data) or --unseen-fraction (image data), or "
                         "--max-eval-images")
    if opts.task == "classify" and opts.head != "ffc" and len(bundle.seen[1]) == 0:
        raise ValueError("the evaluation split holds no held-out images of training classes (top-1 needs them): "
                         "raise --eval-ids-per-bucket or --max-eval-images")


def mixup_layer_names(opts) -> list | None:
    """``--mixup-layers`` as a list of module names (None: input mixup only)."""
    return [name.strip() for name in opts.mixup_layers.split(",")] if opts.mixup_layers else None


class InstanceViews:
    """``source``'s training items as instance-classification data: label = item index, input = a
    random view (Gaussian pixel noise ``noise``; for images also a random translation of up to
    ``shift`` pixels), drawn from ``(seed, epoch, items)`` so every epoch sees new views."""

    def __init__(self, source, noise: float, shift: int, seed: int):
        self.source, self.noise, self.shift, self.seed, self.epoch = source, float(noise), int(shift), seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if hasattr(self.source, "batch"):
            x = self.source.batch(indices)[0]
        else:
            x = torch.stack([torch.as_tensor(self.source[int(i)][0]) for i in indices])
        g = streams.generator(self.seed, "instance_views", self.epoch, int(indices[0]), len(indices))
        if x.dim() == 4 and self.shift > 0:
            shifts = torch.randint(-self.shift, self.shift + 1, (x.shape[0], 2), generator=g).tolist()
            x = torch.stack([torch.roll(img, (dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x, torch.from_numpy(indices)


class Recipe:
    """The model, engine, epochs and evaluation of one ``ffc-train`` run (see the module docstring)."""

    def __init__(self, opts, bundle, rank: int, world: int, device):
        from ffc_parallel.models import build_backbone

        self.opts, self.bundle, self.rank, self.world, self.device = opts, bundle, rank, world, device
        # image files: a random horizontal flip of every training image (--no-flip: none)
        self.flip = random_flip(bundle.train, opts.seed) if bundle.bad_images is not None and not opts.no_flip else None
        self.source = self.flip if self.flip is not None else bundle.train
        self.sampler = self.drs = self.drw = self.smoothing = self.xbm = None
        self.head = self.dual = self.loss = None   # loss: the HybridModel's StepLoss (None under FFC)
        options = {"gradient_checkpointing": True} if opts.gradient_checkpointing else {}
        self.backbone = build_backbone(opts.backbone, bundle.input_shape, opts.embedding_dim, **options).to(device)
        check_trainable_and_evaluable(opts, bundle, self.backbone)
        self._labels = None
        # Image files may fail to decode on one rank: every rank then stops at that step, naming the file
        # (agreed on a CPU group: no device sync per step).
        self.files = bundle.bad_images is not None
        self.cpu_group = (dist.new_group(backend="gloo") if self.files and world > 1 and dist.get_backend() == "nccl"
                          else None)
        if opts.head == "ffc":
            self._build_ffc(device)
            return
        if opts.task == "instance":
            self.source = InstanceViews(self.source, opts.view_noise, opts.view_shift, opts.seed)
            self.head = fp.instance_classifier(len(bundle.train), opts.embedding_dim, opts.temperature,
                                               sample_rate=opts.sample_rate, seed=opts.seed, device=device)
            if opts.smoothing_neighbours:
                self.smoothing = fp.HardestClassSmoothing(self.head, k=opts.smoothing_neighbours,
                                                          alpha=opts.smoothing_alpha)
        else:
            row_loss = fp.losses.row_loss_for(opts.reweight, opts.focal_gamma)
            self.head = fp.ShardedClassifier(opts.embedding_dim, bundle.num_classes, margin=parse_margin(opts.margin),
                                             scale=head_scale(opts, bundle.num_classes), sample_rate=opts.sample_rate,
                                             seed=opts.seed, device=device, row_loss=row_loss,
                                             center_storage=opts.center_storage,
                                             negative_sampling=opts.negative_sampling, sample_block=opts.sample_block,
                                             dtype=CENTER_DTYPES[opts.center_dtype],
                                             center_master_weights=False if opts.no_center_master_weights else None)
            self._build_sampler()
        self.loss = StepLoss(mixup=self._mixup(), xbm=self._xbm(device), focal=self._sigmoid_focal(),
                             smoothing=self.smoothing, cam=self._cam(), cam_epoch=opts.cam_epoch or 0)
        self.model = fp.HybridModel(self.backbone, self.head, loss_fn=self.loss)

    # ------------------------------------------------------------------ building
    @property
    def labels(self) -> torch.Tensor:
        """Training labels ``[N]`` (computed once, for the samplers and the dual loader)."""
        if self._labels is None:
            self._labels = labels_of(self.bundle.train)
        return self._labels

    def _build_ffc(self, device) -> None:
        opts = self.opts
        size = opts.pool_size
        pool_size = int(round(size * self.bundle.num_classes)) if size <= 1 else int(size)
        self.model = fp.FFC(self.backbone, opts.embedding_dim, max(1, pool_size),
                            margin=parse_margin(opts.margin), scale=opts.scale or 32.0,
                            gallery_momentum=opts.gallery_momentum, device=device)
        id_batch = opts.ffc_identities if opts.ffc_identities is not None else opts.batch_size // 4
        instance_batch = opts.batch_size - 2 * id_batch
        if instance_batch < 0:
            raise ValueError(f"--ffc-identities {id_batch} x 2 images exceeds --batch-size {opts.batch_size}")
        self.dual = fp.data.DualBatchSampler(self.labels, id_batch, instance_batch, seed=opts.seed,
                                             rank=self.rank, world_size=self.world)

    def _cam(self):
        if self.opts.cam_epoch is None:
            return None
        if not (hasattr(self.backbone, "feature_maps") and hasattr(self.backbone, "cam_projection")):
            raise ValueError("--cam-epoch needs image data and a backbone with feature_maps() and cam_projection() "
                             "(--synthetic-mode image or image data, --backbone resnet)")
        return fp.algorithms.OnlineCamBalancer(self.bundle.class_counts, seed=self.opts.seed)

    def _build_sampler(self) -> None:
        opts = self.opts
        if opts.cam_epoch is not None:   # CAM balancing draws class-balanced from its epoch on
            opts = dataclasses.replace(opts, sampler="class_balanced", drs_epoch=opts.cam_epoch)
        if opts.sampler == "instance":   # plain shuffling (RankLoader's epoch permutation)
            return
        self.sampler = fp.data.build_sampler(opts.sampler, self.labels, rank=self.rank, world_size=self.world,
                                             seed=opts.seed, num_classes=self.bundle.num_classes,
                                             total_epochs=opts.epochs)
        if opts.drs_epoch is not None:
            self.drs = fp.data.DeferredResampling(opts.drs_epoch, before=None, after=self.sampler)

    def _mixup(self):
        opts = self.opts
        if opts.mixup_alpha <= 0:
            return None
        return fp.algorithms.Mixup(opts.mixup_alpha, layers=mixup_layer_names(opts), stop_epoch=opts.mixup_stop_epoch,
                                   seed=opts.seed)

    def _xbm(self, device):
        opts = self.opts
        if not opts.xbm_size:
            return None
        from ffc_parallel.losses.pairs import ContrastiveLoss, MultiSimilarityLoss
        pair = ContrastiveLoss(opts.xbm_margin) if opts.xbm_loss == "contrastive" else MultiSimilarityLoss()
        self.xbm = fp.losses.CrossBatchMemory(opts.xbm_size, opts.embedding_dim, pair_loss=pair,
                                              weight=opts.xbm_weight, warmup_steps=opts.xbm_warmup, device=device)
        return self.xbm

    def _sigmoid_focal(self):
        if self.opts.reweight != "sigmoid_focal":
            return None
        from ffc_parallel.losses.reweight import ShardedSigmoidFocal
        return ShardedSigmoidFocal(gamma=self.opts.focal_gamma, prior=1.0 / self.bundle.num_classes)

    def configure_reweighting(self) -> None:
        """Class weights of ``--reweight`` (collective; again after a resume: the weights are recomputed
        from the class counts, not checkpointed). The row loss was given to the head's constructor."""
        opts = self.opts
        if self.head is None:
            return
        start, stop = self.head.class_range
        counts = torch.as_tensor(np.asarray(self.bundle.class_counts)[start:stop], dtype=torch.long)
        weights = fp.losses.class_weights_for(opts.reweight, counts, num_local=self.head.num_local,
                                              gamma=opts.reweight_gamma, beta=opts.reweight_beta, group=self.head.group)
        if weights is None:
            return
        self.head.set_class_weight(weights)
        if opts.drw_epoch is not None:
            self.drw = fp.losses.DeferredReweighting(opts.drw_epoch, after=weights)

    # ------------------------------------------------------------------ before training
    def prepare(self, engine_factory, resume: bool):
        """Initialise what training starts from (contrastive prior, FFC pool prefill) unless
        resuming, then build the engine; returns it."""
        opts = self.opts
        if opts.head == "ffc":
            if not resume and opts.prefill_fraction > 0:
                self._prefill_pool()
            return engine_factory(self.model)
        if opts.task == "instance" and not opts.no_contrastive_prior and not resume:
            # before fp.initialize: the centers' fp32 master copy is taken from the written rows
            mine = np.arange(self.rank, len(self.source), self.world)   # every image once, over all ranks
            batches = IndexBatches(self.source, mine, opts.batch_size, self.device)
            written = fp.contrastive_prior(self.backbone, batches, self.head, progress=self.rank == 0)
            if self.rank == 0:
                print(f"ffc-train: contrastive prior wrote {written:,} of {self.head.num_classes:,} class rows",
                      file=sys.stderr)
        engine = engine_factory(self.model)
        self.configure_reweighting()
        return engine

    def _prefill_pool(self) -> None:
        """Gallery features of the first ``prefill_fraction`` of the identities' worth of images (the
        paper fills about 10% of the pool before training)."""
        opts = self.opts
        loader = RankLoader(self.bundle.train, opts.batch_size, self.rank, self.world, seed=opts.seed + 1)
        wanted = opts.prefill_fraction * self.model.pool.pool_size
        steps = max(1, min(len(loader), math.ceil(wanted / (opts.batch_size * self.world))))
        filled = self.model.prefill(_on(self.device, islice(iter(loader), steps)), progress=self.rank == 0)
        if self.rank == 0:
            print(f"ffc-train: class pool prefilled: {filled:,} of {self.model.pool.pool_size:,} slots", file=sys.stderr)

    # ------------------------------------------------------------------ epochs
    def _epoch_sampler(self, epoch: int):
        """The re-sampler of ``epoch`` (None: the plain shuffled epoch)."""
        return self.drs.sampler(epoch) if self.drs is not None else self.sampler

    def micro_batches(self, epoch: int) -> int:
        """Micro-batches of ``epoch`` on every rank."""
        if self.dual is not None:
            return len(self.dual)
        sampler = self._epoch_sampler(epoch)
        if sampler is not None:
            return len(sampler) // self.opts.batch_size
        return len(RankLoader(self.source, self.opts.batch_size, 0, self.world))

    def start_epoch(self, epoch: int) -> None:
        """Per-epoch switches: DRW weights, smoothing refresh, fresh instance views and flips (collective)."""
        if self.drw is not None:
            self.drw.apply(self.head, epoch)
        if self.smoothing is not None:
            self.smoothing.maybe_refresh(epoch)
        if isinstance(self.source, InstanceViews):
            self.source.epoch = epoch
        if self.flip is not None:
            self.flip.epoch = epoch
        if self.loss is not None:
            self.loss.epoch = epoch

    def batches(self, epoch: int, start_micro: int):
        """This rank's ``(inputs, labels)`` of ``epoch`` from micro-batch ``start_micro`` on (image files:
        through :func:`~ffc_parallel.distributed.lockstep.in_step`)."""
        opts = self.opts
        if self.dual is not None:
            self.dual.set_epoch(epoch)
            batches = load_batches(self.source, islice(iter(self.dual), start_micro, None), opts.num_workers)
        else:
            batches = iter(RankLoader(self.source, opts.batch_size, self.rank, self.world, seed=opts.seed,
                                      epoch=epoch, start_step=start_micro, num_workers=opts.num_workers,
                                      sampler=self._epoch_sampler(epoch)))
        return in_step(batches, self.cpu_group) if self.files else batches

    def skipped_images(self) -> int:
        """Unreadable images replaced so far on all ranks (``--on-bad-image skip``; a collective then)."""
        if not self.files or self.opts.on_bad_image != "skip":
            return 0
        return int(all_reduce_(torch.tensor([self.bundle.skipped_images]), group=self.cpu_group))

    def sizes(self) -> dict:
        """What the run classifies over: ``head_classes`` (sharded head) or ``pool_slots`` (FFC)."""
        if self.head is not None:
            return {"head_classes": self.head.num_classes}
        return {"pool_slots": self.model.pool.pool_size}

    def storage_report(self, steps: int) -> dict:
        """Rank 0's center store after ``steps`` optimizer steps (``{}`` on the device): its bytes, bytes read
        and written per step, and the share of the prefetch's reading hidden behind compute."""
        stats = self.head.store_stats() if self.head is not None else {}
        if not stats:
            return {}
        per_step = {f"{k}_per_step": stats[k] / max(steps, 1) for k in ("bytes_read", "bytes_written")}
        return {"center_storage": {**stats, **per_step}}

    # ------------------------------------------------------------------ checkpoint state and evaluation
    def client_state(self) -> dict:
        """Saved with every checkpoint: what ``ffc-export`` rebuilds the backbone from, and the XBM memory
        (the head's rows and Partial FC step are in fp.save_checkpoint's shards)."""
        state = {"backbone": {"name": self.opts.backbone, "input_shape": list(self.bundle.input_shape),
                              "embedding_dim": self.opts.embedding_dim}}
        if self.xbm is not None:
            state["xbm"] = {k: v.cpu() for k, v in self.xbm.state_dict().items()}
        return state

    def load_client_state(self, state: dict) -> None:
        if self.xbm is not None:
            if "xbm" not in state:
                raise ValueError("--xbm-size: the checkpoint holds no cross-batch memory (saved without --xbm-size)")
            self.xbm.load_state_dict(state["xbm"])

    @property
    def eval_backbone(self):
        """The network that embeds evaluation images (FFC: its probe network)."""
        return self.model.probe if self.opts.head == "ffc" else self.backbone

    def evaluate(self, device):
        """``(metrics, curves)``: the head's seen-class accuracy (classification), verification and
        retrieval on unseen identities, and kNN / linear probe of held-out labelled images."""
        from ffc_parallel.evaluation import classify, evaluate, feature_probes
        opts, bundle, backbone = self.opts, self.bundle, self.eval_backbone
        head = self.head if opts.task == "classify" and opts.head != "ffc" else None
        buckets = frequency_buckets(bundle.class_counts, tuple(opts.bucket_edges))
        metrics, curves = evaluate(backbone, head, bundle.seen, bundle.unseen, buckets,
                                   batch_size=opts.eval_batch_size, device=device)
        if bundle.test is not None:   # --eval-data-path (check_options: a classifier of training ids)
            metrics.update(classify(backbone, head, bundle.test, name="test", batch_size=opts.eval_batch_size,
                                    device=device))
        if head is None and self.rank == 0:   # only rank 0 reports; the probes need no other rank
            metrics.update(feature_probes(backbone, bundle.seen, opts.eval_batch_size, device))
        return metrics, curves


class IndexBatches:
    """``source.batch(chunk)`` on ``device`` for consecutive ``batch_size`` chunks of ``indices``
    (the last may be short); ``len()`` = number of batches (progress bars show a total)."""

    def __init__(self, source, indices, batch_size: int, device):
        self.source, self.indices, self.batch_size, self.device = source, indices, int(batch_size), device

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        chunks = (self.indices[i: i + self.batch_size] for i in range(0, len(self.indices), self.batch_size))
        return _on(self.device, (self.source.batch(chunk) for chunk in chunks))


def _on(device, batches):
    """``(inputs, labels)`` batches moved to ``device``."""
    return ((x.to(device), y.to(device)) for x, y in batches)
