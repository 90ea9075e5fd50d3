"""Capacity planning for the class-sharded head: memory per GPU, communication per step, the
largest class count that fits, and what to change when it does not.

    import ffc_parallel as fp
    p = fp.planner.plan(fp.planner.HeadConfig(num_classes=10**9, dim=512, gpus=64, batch=512,
                                               dtype="fp16", sample_rate=0.1, optimizer="sgd",
                                               device_memory=80 * 10**9))
    print(fp.planner.format_plan(p))

Every figure is per GPU (rank) for the rank with the most classes (``ceil(C / gpus)``) and is
computed from the same chunk, tile and cache policy the head uses
(:class:`ffc_parallel.heads.chunking.ChunkPlan`, ``heads/borrowed_grad.py``). The peak is the start
of the backward: the cached logits are still alive when the new center gradient is allocated, on top
of what lives through the whole step (weights, master weights, optimizer state, work buffers,
embedding buffers). ``device="cpu"`` models the CPU head (small tiles; the cache borrows the not yet
written gradient buffer). ``center_storage`` "host" or "disk" keeps the rows, their master copy and
optimizer state off the device: the plan then counts the used and prefetched rows on the device, the
store in host memory or on disk, and the bytes, pages and seconds a step moves (:func:`store_traffic`,
:func:`step_time`); ``Plan.tiers`` has every tier, ``Plan.proposal`` the tier that fits. Formulas:
``docs/planner.md``.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

import torch

from .heads.classifier import INPUT_CHECK_FIELDS
from .heads.sampling import _DENSE_FRACTION
from .heads.borrowed_grad import borrowed_columns, borrows_gradient
from .heads.chunking import DEFAULT_MEMORY_BUDGET_MB, ChunkPlan, work_bytes
from .optim.row_layout import PAGE_BYTES, RUN_BYTES, TIERS, default_sample_block, row_layout

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
OPTIMIZERS = ("none", "sgd", "adam", "adamw")
NEGATIVE_SAMPLING = ("uniform", "block")
DEFAULT_HOST_MEMORY = 250 * 10**9        # per GPU: 2 TB of host memory on an 8-GPU node
DEFAULT_HOST_BANDWIDTH = 25e9            # host <-> device, each way: PCIe 4 x16
DEFAULT_DISK_READ_BANDWIDTH = 3e9        # local NVMe
DEFAULT_DISK_WRITE_BANDWIDTH = 2e9
DEFAULT_MEMORY_BANDWIDTH = {"cuda": 2e12, "cpu": 10e9}   # the elementwise passes over the used rows
# CPU of the disk store per 4 KiB page through its mapping (fault + copy, each way) and per preadv/pwritev
# call beyond its copy: round figures above what benchmarks/planner_rates.py measured on the 2-core VM
# (2.2-3.3 us per page, 0.6-2.3 us per call: docs/benchmarks.md); measure your host's and pass --rates
DEFAULT_PAGE_CPU_SECONDS = 5e-6
DEFAULT_RUN_CPU_SECONDS = 10e-6
RATE_FIELDS = ("compute_rate", "memory_bandwidth", "disk_read_bandwidth", "disk_write_bandwidth",
               "page_cpu_seconds", "run_cpu_seconds")   # what ffc-plan --rates reads from that benchmark's JSON
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """``"80GB"`` -> 80e9, ``"24GiB"`` -> 24 * 2**30, ``"512MB"``, or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}: use e.g. 80GB, 24GiB, 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_count(text) -> int:
    """``"1e9"``, ``"4M"``, ``"100k"``, ``"25.6M"`` or an integer -> int."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if scale > 1 else s) * scale)
    except ValueError:
        raise ValueError(f"cannot read a count from {text!r}: use e.g. 1e9, 4M, 100k") from None


def parse_rate(text) -> float:
    """``"25GB/s"`` -> 25e9 bytes per second (any :func:`parse_bytes` size, ``/s`` optional)."""
    if isinstance(text, (int, float)):
        return float(text)
    return float(parse_bytes(re.sub(r"/s\s*$", "", str(text).strip())))


@dataclass(frozen=True)
class HeadConfig:
    """One training configuration of the head.

    Args:
        num_classes: global class count ``C``. dim: embedding dim ``D``.
        gpus: ranks the classes are sharded over (also the data-parallel size).
        batch: per-GPU micro-batch ``b``; the head sees the global batch ``B = gpus * b``.
        dtype: centers and embeddings: ``fp32``, ``bf16``, ``fp16`` (softmax statistics are fp32).
        sample_rate: Partial FC rate (changes compute and the cached cosines, not the weights).
        optimizer: ``none`` (forward/backward only), ``sgd``, ``adam``, ``adamw``; ``momentum=False``
            drops SGD's buffer. State is fp32 for half centers. A per-row int64 step count is kept
            (the project's :class:`~ffc_parallel.optim.ShardedCenterOptimizer`).
        master_weights: an fp32 copy of half centers (None: yes for fp16/bf16).
        center_storage: where a rank's rows, master copy and optimizer state live: ``device``, ``host``
            (host memory, pinned on a GPU) or ``disk`` (memory-mapped segment files on local NVMe);
            off the device only the rows a step uses are on it (``docs/planner.md``).
        negative_sampling: ``uniform`` rows or ``block`` (contiguous blocks of ``sample_block`` rows).
        host_memory: host bytes per GPU the head may use (None: no host fit check).
        host_bandwidth: host <-> device bytes/s, each way. disk_read_bandwidth / disk_write_bandwidth:
            bytes/s of the disk tier's local disk.
        compute_rate: effective FLOP/s of the head's matrix products on the device (None: no step time).
        memory_bandwidth: bytes/s of the elementwise passes over the used rows (None: 2e12 on ``cuda``,
            10e9 on ``cpu``); on ``cpu`` also the store's copies (10e9 for them on ``cuda``: host memory).
        page_cpu_seconds / run_cpu_seconds: CPU of the disk store per page through its mapping (each way)
            and per ``preadv``/``pwritev`` call of a run of rows (``benchmarks/planner_rates.py``).
        backbone_flops: forward FLOPs of the backbone per sample (step time only).
        memory_budget_mb / chunk_size: the head's settings (see ``ShardedClassifier``).
        backbone_params: the backbone's parameter count, for its gradient all-reduce volume.
        grads_persist: center gradients are kept between steps (``zero_grad(set_to_none=False)``,
            gradient accumulation); with the full softmax the head's backward then holds a second
            gradient buffer while it is added into ``weight.grad`` (Partial FC adds in place). Default False: ``set_to_none=True``, torch's default.
        device_memory: bytes per GPU (None: no fit check). reserve: bytes kept back for the CUDA
            context, NCCL buffers, allocator slack and the backbone (not modelled by this planner).
        device: ``cuda`` (any accelerator) or ``cpu``: the head's tiles and cache differ (see
            ``docs/planner.md``); on ``cpu`` device and host memory are the same memory.
    """

    num_classes: int
    dim: int
    gpus: int = 1
    batch: int = 128
    dtype: str = "fp32"
    sample_rate: float = 1.0
    optimizer: str = "sgd"
    momentum: bool = True
    master_weights: bool | None = None
    center_storage: str = "device"
    negative_sampling: str = "uniform"
    sample_block: int | None = None
    host_memory: int | None = DEFAULT_HOST_MEMORY
    host_bandwidth: float = DEFAULT_HOST_BANDWIDTH
    disk_read_bandwidth: float = DEFAULT_DISK_READ_BANDWIDTH
    disk_write_bandwidth: float = DEFAULT_DISK_WRITE_BANDWIDTH
    compute_rate: float | None = None
    memory_bandwidth: float | None = None
    page_cpu_seconds: float = DEFAULT_PAGE_CPU_SECONDS
    run_cpu_seconds: float = DEFAULT_RUN_CPU_SECONDS
    backbone_flops: float = 0.0
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    chunk_size: int | None = None
    backbone_params: int = 0
    grads_persist: bool = False
    device_memory: int | None = None
    reserve: int = 0
    device: str = "cuda"

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if min(self.num_classes, self.dim, self.gpus, self.batch) < 1:
            raise ValueError("num_classes, dim, gpus and batch must all be >= 1")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.center_storage not in TIERS:
            raise ValueError(f"center_storage must be one of {', '.join(TIERS)}, got {self.center_storage!r}")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"negative_sampling must be 'uniform' or 'block', got {self.negative_sampling!r}")
        if self.sample_block is not None and self.sample_block < 1:
            raise ValueError(f"sample_block must be >= 1, got {self.sample_block}")
        for name in ("host_bandwidth", "disk_read_bandwidth", "disk_write_bandwidth", "compute_rate",
                     "memory_bandwidth"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("page_cpu_seconds", "run_cpu_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def block(self) -> int:
        """Rows per block of block sampling: ``sample_block``, or the head's default (64 KiB of weights)."""
        return self.sample_block or default_sample_block(self.dim, DTYPE_BYTES[self.dtype])

    @property
    def global_batch(self) -> int:
        return self.gpus * self.batch

    @property
    def num_local(self) -> int:
        return -(-self.num_classes // self.gpus)

    @property
    def uses_master_weights(self) -> bool:
        half = self.dtype in ("fp16", "bf16")
        return half if self.master_weights is None else (self.master_weights and half)

    @property
    def offloaded(self) -> bool:
        """The rows live off the device (``host`` or ``disk``)."""
        return self.center_storage != "device"


@dataclass
class Plan:
    """What :func:`plan` found. Byte counts are per GPU; ``comm`` is bytes received per step;
    ``store`` is the traffic and time of ``config.center_storage``, ``tiers`` the summary of every tier."""

    config: HeadConfig
    memory: dict = field(default_factory=dict)
    host_memory: dict = field(default_factory=dict)
    comm: dict = field(default_factory=dict)
    chunk: int = 0
    cached_chunks: int = 0
    tile: int = 0
    cached_columns: int = 0
    borrowed_columns: int = 0
    sampled_classes: int = 0
    store: dict = field(default_factory=dict)
    tiers: dict = field(default_factory=dict)
    fits: bool | None = None
    max_classes: int | None = None
    proposal: dict | None = None
    suggestions: list = field(default_factory=list)

    @property
    def total(self) -> int:
        """Peak bytes per GPU (see :func:`peak_bytes`)."""
        return peak_bytes(self.memory, self.config)

    def to_json(self) -> dict:
        out = {"config": asdict(self.config), "global_batch": self.config.global_batch,
               "num_local": self.config.num_local, "sampled_classes": self.sampled_classes,
               "chunk": self.chunk, "cached_chunks": self.cached_chunks, "tile": self.tile,
               "cached_columns": self.cached_columns, "borrowed_columns": self.borrowed_columns,
               "memory_bytes": dict(self.memory), "memory_peak_bytes": self.total,
               "host_memory_bytes": dict(self.host_memory), "comm_bytes_per_step": dict(self.comm),
               "comm_total_bytes_per_step": sum(self.comm.values())}
        out.update(self.tiers[self.config.center_storage])   # the chosen tier's figures, flat
        out.update({"tiers": {name: dict(t) for name, t in self.tiers.items()}, "fits": self.fits,
                    "max_classes": self.max_classes, "proposal": self.proposal,
                    "suggestions": list(self.suggestions)})
        return out


def candidate_rows(cfg: HeadConfig) -> int:
    """Negatives drawn per step before the labels are known: ``n = int(rate * C_local)`` rows (under block
    sampling the last block drawn is cut to ``n``); ``C_local`` at sample rate 1."""
    if cfg.sample_rate >= 1.0:
        return cfg.num_local
    return min(int(cfg.sample_rate * cfg.num_local), cfg.num_local)


def sampled_classes(cfg: HeadConfig) -> int:
    """Columns the fused loss walks per step (the rows a step uses, ``R``): ``C_local``, or
    ``max(P, n)`` with at most ``P = min(B, C_local)`` positives and ``n`` :func:`candidate_rows`."""
    if cfg.sample_rate >= 1.0:
        return cfg.num_local
    return max(min(cfg.global_batch, cfg.num_local), candidate_rows(cfg))


def row_tensors(cfg: HeadConfig) -> dict[str, int]:
    """Bytes per row of each tensor a row carries (``optim.row_layout``, shared with the center store):
    ``weight``, ``master``, the optimizer state, ``step``."""
    layout = row_layout(cfg.dim, TORCH_DTYPES[cfg.dtype], None if cfg.optimizer == "none" else cfg.optimizer,
                        momentum=0.9 if cfg.momentum else 0.0, master_weights=cfg.master_weights)
    return {name: dtype.itemsize * width for name, (dtype, width) in layout.items()}


@dataclass(frozen=True)
class Layout:
    """How the fused loss walks and caches the columns: the budget's :class:`ChunkPlan`, the compute
    ``tile``, the columns whose logits are cached (``borrowed`` of them in the gradient buffer)."""

    chunks: ChunkPlan
    tile: int
    cached: int
    borrowed: int
    cache_bytes: int   # the cache's own tensors (the borrowed part lives in center_grads)


def loss_layout(cfg: HeadConfig) -> Layout:
    """The head's policy (``heads/chunking.py``, ``heads/borrowed_grad.py``) for this configuration, one
    gather piece."""
    e, d, big_b = DTYPE_BYTES[cfg.dtype], cfg.dim, cfg.global_batch
    stats = 8 if cfg.dtype == "fp64" else 4
    cols = sampled_classes(cfg)
    chunks = ChunkPlan.for_budget(big_b, cols, stats, int(cfg.memory_budget_mb * 2**20), cfg.chunk_size)
    tile = chunks.tile(big_b, stats, cfg.device)
    direct = cfg.sample_rate >= 1.0
    borrow = borrows_gradient(cfg.device, direct, cfg.grads_persist, e == stats) and not cfg.offloaded
    borrowed = borrowed_columns(big_b, cols, d, tile) if borrow else 0
    capacity = chunks.cache_bytes(big_b, cols, d, e, stats, tile, direct)
    own = min(cols - borrowed, capacity // (big_b * tile * stats) * tile)
    return Layout(chunks, tile, borrowed + own, borrowed, own * big_b * stats)


def memory_items(cfg: HeadConfig) -> tuple[dict, dict, Layout, int]:
    """``(device items, host items, loss layout, sampled columns)``; see ``docs/planner.md``. On the
    device tier every row lives on the device; off it, the ``R`` used rows (the working set) and the
    ``n`` prefetched rows of the next step do, and the rows themselves are host items (host tier)."""
    e, n, d, big_b = DTYPE_BYTES[cfg.dtype], cfg.num_local, cfg.dim, cfg.global_batch
    stats = 8 if cfg.dtype == "fp64" else 4
    cols = sampled_classes(cfg)
    layout = loss_layout(cfg)
    direct = cfg.sample_rate >= 1.0
    row = row_tensors(cfg)
    rows_on_device = cols if cfg.offloaded else n
    sampling = 0
    if cfg.sample_rate < 1.0:   # the step's rows, the last draw of candidates (kept), the draw's work
        want = cols - min(big_b, n)
        kept = candidate_rows(cfg) * 8
        if cfg.negative_sampling == "block":
            sampling = cols * 8 + kept + candidate_rows(cfg) // cfg.block * 8
        else:
            dense = want > _DENSE_FRACTION * (n - min(big_b, n))
            sampling = cols * 8 + kept + (n * 4 + want * 16 if dense else 4 * int(1.25 * want + 32) * 8)
    tile = min(layout.tile, cols)
    work = work_bytes(big_b, cols, d, e, stats, tile, direct)
    weights_work = (2 + (not direct)) * tile * d * e
    half_tile = tile * d * stats if e < stats else 0   # half rows: their norms and radial sums in the stats dtype
    device = {
        "centers": rows_on_device * d * e,
        "center_grads": rows_on_device * d * e,
        "master_weights": rows_on_device * row.get("master", 0),
        "optimizer_state": rows_on_device * sum(v for k, v in row.items() if k not in ("weight", "master")),
    }
    if cfg.offloaded:
        device["prefetched_rows"] = candidate_rows(cfg) * sum(row.values())
    device.update({
        "logits_work": work - weights_work - cols * stats,
        "logits_cache": layout.cache_bytes,
        "chunk_weights": weights_work + half_tile,
        "class_scales": cols * stats,
        "embeddings": big_b * d * (3 * e + stats) + big_b * 8 * 3,
        "sampling": sampling,
        "comm_buffers": 2 * cfg.batch * d * e + 3 * big_b * stats,
        "reserve": cfg.reserve,
    })
    host = {}
    if cfg.center_storage == "host":
        host["store"] = n * sum(row.values())
    if cfg.offloaded and cfg.device == "cuda":   # on a CPU the prefetched rows are read straight into place
        host["staging"] = cols * sum(row.values())
    return device, host, layout, cols


def comm_volume(cfg: HeadConfig) -> dict:
    """Bytes each GPU receives per step (ring collectives over ``gpus`` ranks)."""
    w, b, e = cfg.gpus, cfg.batch, DTYPE_BYTES[cfg.dtype]
    if w == 1:
        return {name: 0 for name in ("input_check", "allgather_embeddings", "allgather_labels",
                                     "allreduce_max", "allreduce_sums", "reduce_scatter_embedding_grads",
                                     "backbone_allreduce")}
    ring = 2 * (w - 1) / w
    return {
        "input_check": (w - 1) * len(INPUT_CHECK_FIELDS) * 8,   # the head's input-check all-gather
        "allgather_embeddings": (w - 1) * b * cfg.dim * e,
        "allgather_labels": (w - 1) * b * 8,
        "allreduce_max": int(ring * cfg.global_batch * 4),
        "allreduce_sums": int(ring * cfg.global_batch * 2 * 4),
        "reduce_scatter_embedding_grads": (w - 1) * b * cfg.dim * e,
        "backbone_allreduce": int(ring * cfg.backbone_params * e),
    }


def peak_bytes(items: dict, cfg: HeadConfig) -> int:
    """Peak of a step from :func:`memory_items`: the start of the backward, when the cached logits
    and the new center gradient are both alive, so every item counts; plus the kept gradient when
    gradients persist between steps and the head returns a new dense gradient (full softmax; Partial
    FC adds its rows straight into the kept one). The centers' step comes later and holds less: its
    fp32 working copies are made a block of rows at a time (``optim/center_optimizer.py``)."""
    second = cfg.grads_persist and cfg.sample_rate >= 1.0 and not cfg.offloaded
    return sum(items.values()) + (items["center_grads"] if second else 0)


def _pages(num_local: int, tensor_bytes: int, fraction: float) -> float:
    """Expected pages of one tensor file touched when a uniform ``fraction`` of its rows is: a page of
    ``k = PAGE / t`` rows is touched unless none of them is; a row of a page or more touches its own."""
    if tensor_bytes >= PAGE_BYTES:
        return fraction * num_local * math.ceil(tensor_bytes / PAGE_BYTES)
    file_pages = math.ceil(num_local * tensor_bytes / PAGE_BYTES)
    return file_pages * (1.0 - (1.0 - fraction) ** (PAGE_BYTES / tensor_bytes))


def expected_positives(cfg: HeadConfig) -> float:
    """Distinct labels of the global batch among this rank's classes, labels uniform over the classes:
    ``C_local (1 - (1 - 1/C)^B)``, about ``B C_local / C``."""
    return cfg.num_local * -math.expm1(cfg.global_batch * math.log1p(-1.0 / cfg.num_classes)) \
        if cfg.num_classes > 1 else 1.0


def _disk_moves(cfg: HeadConfig, rows: float, lone: float, fraction: float) -> tuple[float, float, float]:
    """``(pages, mapped pages, calls)`` of moving ``rows`` rows (a fraction ``fraction`` of the shard, in
    blocks under block sampling) plus ``lone`` single rows, over every tensor file of a row: pages for the
    disk, pages through the mapping and ``preadv``/``pwritev`` calls for the CPU (a run of adjacent rows of
    at least ``RUN_BYTES`` is one call, other rows go through the mapping)."""
    pages = mapped = calls = 0.0
    for t in row_tensors(cfg).values():
        lone_pages = lone * math.ceil(t / PAGE_BYTES)
        if cfg.negative_sampling == "block":
            blocks = rows / cfg.block
            block_pages = min(math.ceil(cfg.num_local * t / PAGE_BYTES), blocks * math.ceil(cfg.block * t / PAGE_BYTES))
            runs = cfg.block * t >= RUN_BYTES
        else:
            blocks, block_pages, runs = rows, _pages(cfg.num_local, t, fraction), t >= RUN_BYTES
        pages += block_pages + lone_pages
        lone_runs = t >= RUN_BYTES
        calls += (blocks if runs else 0.0) + (lone if lone_runs else 0.0)
        mapped += (0.0 if runs else block_pages) + (0.0 if lone_runs else lone_pages)
    return pages, mapped, calls


def store_traffic(cfg: HeadConfig) -> dict:
    """Rows and bytes one optimizer step moves between the store and the device (zeros on the device
    tier), logical and, on the disk tier, in whole pages, pages through the mapping and I/O calls."""
    n_local, cols, cand = cfg.num_local, sampled_classes(cfg), candidate_rows(cfg)
    row = row_tensors(cfg)
    rb = sum(row.values())
    out = {"row_bytes": rb, "store_bytes": n_local * rb if cfg.offloaded else 0,
           "disk_bytes": n_local * rb if cfg.center_storage == "disk" else 0,
           "prefetch_rows": 0, "missing_positives": 0.0, "read_rows_per_step": 0.0, "written_rows_per_step": 0,
           "read_bytes_per_step": 0, "read_bytes_per_step_max": 0, "written_bytes_per_step": 0,
           "page_read_bytes_per_step": 0, "page_written_bytes_per_step": 0, "prefetch_page_read_bytes": 0,
           "mapped_pages_per_step": 0.0, "io_calls_per_step": 0.0, "prefetch_mapped_pages": 0.0,
           "prefetch_io_calls": 0.0, "read_mapped_pages": 0.0, "read_io_calls": 0.0, "write_mapped_pages": 0.0,
           "write_io_calls": 0.0}
    if not cfg.offloaded:
        return out
    outside = 1.0 - cand / n_local
    missing = expected_positives(cfg) * outside
    worst = min(min(cfg.global_batch, n_local), n_local - cand)
    out.update({"prefetch_rows": cand, "missing_positives": missing, "read_rows_per_step": cand + missing,
                "written_rows_per_step": cols, "read_bytes_per_step": int((cand + missing) * rb),
                "read_bytes_per_step_max": (cand + worst) * rb, "written_bytes_per_step": cols * rb})
    if cfg.center_storage == "disk":
        prefetch = _disk_moves(cfg, cand, 0.0, cand / n_local)
        if cfg.negative_sampling == "block":   # the positives outside the blocks are single rows
            read = _disk_moves(cfg, cand, missing, cand / n_local)
            written = read
        else:
            read = _disk_moves(cfg, cand + missing, 0.0, (cand + missing) / n_local)
            written = _disk_moves(cfg, cols, 0.0, cols / n_local)
        out.update({"page_read_bytes_per_step": int(read[0] * PAGE_BYTES),
                    "page_written_bytes_per_step": int(written[0] * PAGE_BYTES),
                    "prefetch_page_read_bytes": int(prefetch[0] * PAGE_BYTES),
                    "mapped_pages_per_step": read[1] + written[1], "io_calls_per_step": read[2] + written[2],
                    "prefetch_mapped_pages": prefetch[1], "prefetch_io_calls": prefetch[2],
                    "read_mapped_pages": read[1], "read_io_calls": read[2],
                    "write_mapped_pages": written[1], "write_io_calls": written[2]})
    return out


def step_time(cfg: HeadConfig, traffic: dict, cached_columns: int) -> dict:
    """Seconds per step: the store's transfers at the stated bandwidths and its CPU work, the part
    one-step-ahead prefetch hides (the prefetched reads, under the previous step's compute), and, with
    ``compute_rate``, the step.

    Store CPU: pages through the mapping x ``page_cpu_seconds`` + I/O calls x ``run_cpu_seconds`` + the
    rows' bytes copied at the host's copy rate. Disk: pages over ``disk_read_bandwidth``; written pages go
    back to the disk in the background, so ``disk_write_bandwidth`` bounds the step from below. On a GPU
    the rows also cross PCIe (``host_bandwidth``) and the prefetch (CPU and disk) hides under the compute;
    on ``cpu`` the compute keeps the rank's cores busy, so only the prefetch's disk wait hides.

    Compute: ``(6 B R D + 2 B D (R - cached) + 3 b backbone_flops) / compute_rate`` (the three matrix
    products of the used columns, the recomputed logits of the uncached ones, the backbone) plus
    ``R (4 row_bytes + 2 D e) / memory_bandwidth`` (optimizer, working-set gather, gradient zeroing)."""
    disk, link = cfg.center_storage == "disk", cfg.device == "cuda"
    bandwidth = cfg.memory_bandwidth or DEFAULT_MEMORY_BANDWIDTH[cfg.device]
    copy_rate = bandwidth if cfg.device == "cpu" else DEFAULT_MEMORY_BANDWIDTH["cpu"]
    rb, cand = traffic["row_bytes"], traffic["prefetch_rows"]

    def cpu(logical, mapped, calls):
        return (mapped * cfg.page_cpu_seconds + calls * cfg.run_cpu_seconds if disk else 0.0) + logical / copy_rate

    def wait(logical, pages, bandwidth_disk):
        return (pages / bandwidth_disk if disk else 0.0) + (logical / cfg.host_bandwidth if link else 0.0)

    t = traffic
    prefetch_cpu = cpu(cand * rb, t["prefetch_mapped_pages"], t["prefetch_io_calls"])
    sync_cpu = cpu(t["read_bytes_per_step"] - cand * rb, t["read_mapped_pages"] - t["prefetch_mapped_pages"],
                   t["read_io_calls"] - t["prefetch_io_calls"])
    write_cpu = cpu(t["written_bytes_per_step"], t["write_mapped_pages"], t["write_io_calls"])
    prefetch_wait = wait(cand * rb, t["prefetch_page_read_bytes"], cfg.disk_read_bandwidth)
    sync_wait = wait(t["read_bytes_per_step"] - cand * rb,
                     t["page_read_bytes_per_step"] - t["prefetch_page_read_bytes"], cfg.disk_read_bandwidth)
    write_wait = t["written_bytes_per_step"] / cfg.host_bandwidth if link else 0.0
    writeback = t["page_written_bytes_per_step"] / cfg.disk_write_bandwidth if disk else 0.0
    prefetch, sync_read, write = prefetch_cpu + prefetch_wait, sync_cpu + sync_wait, write_cpu + write_wait
    out = {"transfer_seconds": prefetch + sync_read + write, "prefetch_read_seconds": prefetch,
           "sync_read_seconds": sync_read, "write_seconds": write,
           "store_cpu_seconds": prefetch_cpu + sync_cpu + write_cpu, "writeback_seconds": writeback,
           "head_flops_per_step": None, "compute_seconds": None, "prefetch_hidden_seconds": None,
           "step_seconds": None}
    if cfg.compute_rate is None:
        return out
    big_b, cols, d = cfg.global_batch, sampled_classes(cfg), cfg.dim
    flops = 6 * big_b * cols * d + 2 * big_b * d * (cols - cached_columns)
    passes = cols * (4 * rb + 2 * d * DTYPE_BYTES[cfg.dtype])
    compute = (flops + 3 * cfg.batch * cfg.backbone_flops) / cfg.compute_rate + passes / bandwidth
    hidden = min(prefetch if link else prefetch_wait, compute)
    out.update({"head_flops_per_step": flops, "compute_seconds": compute, "prefetch_hidden_seconds": hidden,
                "step_seconds": max(compute + out["transfer_seconds"] - hidden, writeback)})
    return out


def tier_summary(cfg: HeadConfig) -> dict:
    """Device, host and disk bytes, traffic and time of ``cfg`` on its ``center_storage``, and whether
    it fits (device memory, and host memory where host bytes are counted)."""
    device, host, layout, _ = memory_items(cfg)
    traffic = store_traffic(cfg)
    device_bytes, host_bytes = peak_bytes(device, cfg), sum(host.values())
    peak_host = host_bytes + (device_bytes if cfg.device == "cpu" else 0)
    out = {"center_storage": cfg.center_storage, "device_bytes": device_bytes, "host_bytes": host_bytes,
           "peak_host_bytes": peak_host, **traffic, **step_time(cfg, traffic, layout.cached)}
    out["fits"] = _fits_figures(cfg, device_bytes, peak_host)
    return out


def _fits_figures(cfg: HeadConfig, device_bytes: int, peak_host: int) -> bool | None:
    if cfg.device_memory is None:
        return None
    return device_bytes <= cfg.device_memory and (cfg.host_memory is None or peak_host <= cfg.host_memory)


def _total(cfg: HeadConfig) -> int:
    return peak_bytes(memory_items(cfg)[0], cfg)


def _fits(cfg: HeadConfig) -> bool:
    if cfg.device_memory is None:
        return False
    device, host, _, _ = memory_items(cfg)
    device_bytes = peak_bytes(device, cfg)
    return bool(_fits_figures(cfg, device_bytes, sum(host.values()) + (device_bytes if cfg.device == "cpu" else 0)))


def max_classes(cfg: HeadConfig) -> int:
    """Largest ``num_classes`` whose plan fits ``cfg.device_memory`` (and host memory where the tier
    uses it; 0 if not even ``gpus`` do)."""
    if cfg.device_memory is None:
        raise ValueError("max_classes needs device_memory")
    lo, hi = 0, cfg.gpus
    while _fits(replace(cfg, num_classes=hi)):
        lo, hi = hi, hi * 2
        if hi > 10**16:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(replace(cfg, num_classes=mid)) else (lo, mid)
    return lo


def _min_gpus(cfg: HeadConfig, doublings: int = 20) -> int | None:
    """Fewest GPUs (same per-GPU batch) at which ``cfg`` fits, or None if ``2**doublings`` times as
    many do not. Memory first falls with the GPU count (fewer classes each), then rises again (the
    global batch grows), so the search doubles until a fit and then bisects."""
    if cfg.device_memory is None:
        return None
    lo = cfg.gpus
    for _ in range(doublings):
        hi = lo * 2
        if _fits(replace(cfg, gpus=hi)):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if _fits(replace(cfg, gpus=mid)) else (mid, hi)
            return hi
        lo = hi
    return None


_TIER_TEXT = {"host": "--center-storage host (rows, master copy and optimizer state in host memory; "
                      "the used rows on the device each step)",
              "disk": "--center-storage disk (rows, master copy and optimizer state on local NVMe; "
                      "the used rows on the device each step)"}


def _candidate_changes(cfg: HeadConfig) -> list[tuple[str, HeadConfig]]:
    """Single changes that reduce per-GPU memory, each as (description, new config)."""
    out = []
    if cfg.dtype in ("fp32", "fp64"):
        out.append(("fp16/bf16 centers with fp32 master weights", replace(cfg, dtype="bf16", master_weights=True)))
        out.append(("fp16/bf16 centers, no master copy (fp32 optimizer state only)",
                    replace(cfg, dtype="bf16", master_weights=False)))
    elif cfg.uses_master_weights:
        out.append(("drop the fp32 master copy of the centers", replace(cfg, master_weights=False)))
    if cfg.optimizer in ("adam", "adamw"):
        out.append(("SGD with momentum instead of Adam", replace(cfg, optimizer="sgd", momentum=True)))
    if cfg.optimizer == "sgd" and cfg.momentum:
        out.append(("SGD without momentum", replace(cfg, momentum=False)))
    for tier in TIERS[TIERS.index(cfg.center_storage) + 1:]:
        out.append((_TIER_TEXT[tier], replace(cfg, center_storage=tier)))
    if cfg.memory_budget_mb > 64:
        out.append(("memory_budget_mb=64 (fewer cached cosines, more recomputation)",
                    replace(cfg, memory_budget_mb=64)))
    if cfg.sample_rate > 0.1:
        out.append(("sample_rate=0.1 (less compute; on the device tier memory barely changes)",
                    replace(cfg, sample_rate=0.1)))
    if cfg.batch > 1:
        out.append((f"per-GPU batch {cfg.batch // 2}", replace(cfg, batch=cfg.batch // 2)))
    return out


def _suggestion(text: str, cfg: HeadConfig) -> dict:
    t = tier_summary(cfg)
    return {"change": text, "total_bytes": t["device_bytes"], "fits": _fits(cfg), "host_bytes": t["host_bytes"],
            "disk_bytes": t["disk_bytes"]}


def suggestions(cfg: HeadConfig) -> list[dict]:
    """What to change when ``cfg`` does not fit: each candidate with its total and whether it fits,
    the fewest GPUs that fit, and (if no single change fits) all memory-saving changes together."""
    out = []
    gpus = _min_gpus(cfg)
    if gpus is not None:
        out.append(_suggestion(f"{gpus} GPUs (same per-GPU batch)", replace(cfg, gpus=gpus)))
    out += [_suggestion(text, new) for text, new in _candidate_changes(cfg)]
    if not any(s["fits"] for s in out[1 if gpus else 0:]):
        combined = _combine(cfg)
        out.append(_suggestion("all of: bf16 centers without master copy, SGD without momentum, "
                               "--center-storage disk, memory_budget_mb=64", combined))
        more = _min_gpus(combined)
        if more is not None:
            out.append(_suggestion(f"all of the above on {more} GPUs", replace(combined, gpus=more)))
    return out


def _combine(cfg: HeadConfig) -> HeadConfig:
    dtype = "bf16" if cfg.dtype in ("fp32", "fp64") else cfg.dtype
    optimizer = "sgd" if cfg.optimizer in ("adam", "adamw") else cfg.optimizer
    return replace(cfg, dtype=dtype, master_weights=False, optimizer=optimizer, momentum=False,
                   center_storage="disk", memory_budget_mb=min(cfg.memory_budget_mb, 64))


def propose_tier(cfg: HeadConfig) -> dict | None:
    """When ``cfg`` does not fit: the nearest storage tier past its own on which it fits as it is
    (host before disk), with that tier's figures; None if it fits or no tier does."""
    if cfg.device_memory is None or _fits(cfg):
        return None
    for tier in TIERS[TIERS.index(cfg.center_storage) + 1:]:
        new = replace(cfg, center_storage=tier)
        if _fits(new):
            return {"flag": f"--center-storage {tier}", **tier_summary(new)}
    return None


def plan(cfg: HeadConfig) -> Plan:
    """Memory per GPU, host memory, communication, store traffic and time per step, every tier's summary,
    fit, capacity, a storage tier that fits, suggestions."""
    device, host, layout, cols = memory_items(cfg)
    tiers = {tier: tier_summary(replace(cfg, center_storage=tier)) for tier in TIERS}
    result = Plan(cfg, device, host, comm_volume(cfg), chunk=layout.chunks.chunk, cached_chunks=layout.chunks.cached,
                  tile=layout.tile, cached_columns=layout.cached, borrowed_columns=layout.borrowed,
                  sampled_classes=cols, store=store_traffic(cfg), tiers=tiers)
    if cfg.device_memory is not None:
        result.fits = tiers[cfg.center_storage]["fits"]
        result.max_classes = max_classes(cfg)
        if not result.fits:
            result.proposal = propose_tier(cfg)
            result.suggestions = suggestions(cfg)
    return result


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _tier_table(p: Plan) -> list[str]:
    """One column per storage tier: memory, store traffic, transfer time, step time, fit."""
    rows = [("device memory (peak)", "device_bytes", _size), ("host memory", "peak_host_bytes", _size),
            ("disk", "disk_bytes", _size), ("read per step", "read_bytes_per_step", _size),
            ("written per step", "written_bytes_per_step", _size),
            ("  in pages: read (disk)", "page_read_bytes_per_step", _size),
            ("  in pages: written (disk)", "page_written_bytes_per_step", _size),
            ("transfer per step", "transfer_seconds", _seconds),
            ("  prefetched reads (hideable)", "prefetch_read_seconds", _seconds),
            ("  hidden by prefetch", "prefetch_hidden_seconds", _seconds),
            ("compute per step", "compute_seconds", _seconds), ("step time", "step_seconds", _seconds),
            ("fits", "fits", lambda f: "-" if f is None else ("yes" if f else "NO"))]
    chosen = p.config.center_storage
    head = "".join(f"{(t + ' *' if t == chosen else t):>14}" for t in TIERS)
    lines = ["  storage tiers per GPU (* = --center-storage)", f"    {'':<32}{head}"]
    for label, key, fmt in rows:
        cells = ("-" if key.startswith("page_") and t != "disk" else fmt(p.tiers[t][key]) for t in TIERS)
        lines.append(f"    {label:<32}" + "".join(f"{cell:>14}" for cell in cells))
    return lines


def format_plan(p: Plan) -> str:
    """A human-readable report of :func:`plan`'s result."""
    c = p.config
    lines = [f"ffc-plan: {c.num_classes:,} classes x dim {c.dim} on {c.gpus} GPUs, {c.dtype}, "
             f"sample_rate {c.sample_rate}, optimizer {c.optimizer}"
             f"{'' if c.momentum or c.optimizer != 'sgd' else ' (no momentum)'}, centers on {c.center_storage}"
             f"{f', block sampling of {c.block} rows' if c.negative_sampling == 'block' else ''}",
             f"  per GPU: {c.num_local:,} classes, batch {c.batch} (global {c.global_batch:,}), "
             f"{p.sampled_classes:,} classes computed per step in tiles of {p.tile:,}, logits of "
             f"{p.cached_columns:,} kept for the backward"
             f"{f' ({p.borrowed_columns:,} in the gradient buffer)' if p.borrowed_columns else ''}",
             f"  a class row: {p.store['row_bytes']:,} bytes ({', '.join(row_tensors(c))})",
             "", f"  memory per GPU ({c.center_storage} tier)"]
    for name, value in p.memory.items():
        lines.append(f"    {name:<34}{_size(value):>12}")
    lines.append(f"    {'peak (see docs/planner.md)':<34}{_size(p.total):>12}")
    if c.device_memory is not None:
        verdict = "fits" if p.total <= c.device_memory else "DOES NOT FIT"
        lines.append(f"    {'device memory':<34}{_size(c.device_memory):>12}   -> {verdict}")
    for name, value in p.host_memory.items():
        lines.append(f"    {'host: ' + name:<34}{_size(value):>12}")
    if p.host_memory and c.host_memory is not None:
        verdict = "fits" if p.tiers[c.center_storage]["peak_host_bytes"] <= c.host_memory else "DOES NOT FIT"
        lines.append(f"    {'host memory':<34}{_size(c.host_memory):>12}   -> {verdict}")
    lines += [""] + _tier_table(p)
    lines += ["", "  communication per step per GPU (bytes received)"]
    for name, value in p.comm.items():
        lines.append(f"    {name:<34}{_size(value):>12}")
    lines.append(f"    {'total':<34}{_size(sum(p.comm.values())):>12}")
    if p.max_classes is not None:
        lines += ["", f"  largest class count that fits ({c.center_storage} tier): {p.max_classes:,}"]
    if p.proposal:
        q = p.proposal
        lines += ["", f"  proposed: {q['flag']}: {_size(q['device_bytes'])} per GPU on the device, "
                      f"{_size(q['peak_host_bytes'])} of host memory, {_size(q['disk_bytes'])} on disk; "
                      f"moves {_size(q['read_bytes_per_step'])} in and {_size(q['written_bytes_per_step'])} "
                      f"out per step, {_seconds(q['transfer_seconds'])} of transfer of which "
                      f"{_seconds(q['prefetch_read_seconds'])} prefetch can hide"]
    if p.suggestions:
        lines += ["", "  to make it fit:"]
        for s in p.suggestions:
            mark = "fits" if s["fits"] else "still too big"
            host = f", plus {_size(s['host_bytes'])} of host memory per GPU" if s["host_bytes"] else ""
            disk = f", {_size(s['disk_bytes'])} on disk" if s["disk_bytes"] else ""
            lines.append(f"    - {s['change']}: {_size(s['total_bytes'])} per GPU ({mark}){host}{disk}")
    return "\n".join(lines)
