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
written gradient buffer). Formulas: ``docs/planner.md``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from .heads.classifier import INPUT_CHECK_FIELDS
from .heads.sampling import _DENSE_FRACTION
from .heads.borrowed_grad import borrowed_columns, borrows_gradient
from .heads.chunking import DEFAULT_MEMORY_BUDGET_MB, ChunkPlan, work_bytes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
OPTIMIZER_BUFFERS = {"none": 0, "sgd": 1, "adam": 2, "adamw": 2}  # [C_local, D] state tensors
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
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if scale > 1 else s) * scale)
    except ValueError:
        raise ValueError(f"cannot read a count from {text!r}: use e.g. 1e9, 4M, 100k") from None


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
        offload: master weights and optimizer state live in host memory (counted separately).
        memory_budget_mb / chunk_size: the head's settings (see ``ShardedClassifier``).
        backbone_params: the backbone's parameter count, for its gradient all-reduce volume.
        grads_persist: center gradients are kept between steps (``zero_grad(set_to_none=False)``,
            gradient accumulation); with the full softmax the head's backward then holds a second
            gradient buffer while it is added into ``weight.grad`` (Partial FC adds in place). Default False: ``set_to_none=True``, torch's default.
        device_memory: bytes per GPU (None: no fit check). reserve: bytes kept back for the CUDA
            context, NCCL buffers, allocator slack and the backbone (not modelled by this planner).
        device: ``cuda`` (any accelerator) or ``cpu``: the head's tiles and cache differ (see
            ``docs/planner.md``).
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
    offload: bool = False
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
        if self.optimizer not in OPTIMIZER_BUFFERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BUFFERS)}, got {self.optimizer!r}")
        if min(self.num_classes, self.dim, self.gpus, self.batch) < 1:
            raise ValueError("num_classes, dim, gpus and batch must all be >= 1")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")

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


@dataclass
class Plan:
    """What :func:`plan` found. Byte counts are per GPU; ``comm`` is bytes received per step."""

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
    fits: bool | None = None
    max_classes: int | None = None
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
               "comm_total_bytes_per_step": sum(self.comm.values()), "fits": self.fits,
               "max_classes": self.max_classes, "suggestions": list(self.suggestions)}
        return out


def sampled_classes(cfg: HeadConfig) -> int:
    """Columns the fused loss walks per step: ``C_local``, or ``max(P, int(rate * C_local))``
    with at most ``min(B, C_local)`` positives under Partial FC."""
    if cfg.sample_rate >= 1.0:
        return cfg.num_local
    positives = min(cfg.global_batch, cfg.num_local)
    return max(positives, int(cfg.sample_rate * cfg.num_local))


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
    borrow = borrows_gradient(cfg.device, direct, cfg.grads_persist, e == stats)
    borrowed = borrowed_columns(big_b, cols, d, tile) if borrow else 0
    capacity = chunks.cache_bytes(big_b, cols, d, e, stats, tile, direct)
    own = min(cols - borrowed, capacity // (big_b * tile * stats) * tile)
    return Layout(chunks, tile, borrowed + own, borrowed, own * big_b * stats)


def memory_items(cfg: HeadConfig) -> tuple[dict, dict, Layout, int]:
    """``(device items, host items, loss layout, sampled columns)``; see ``docs/planner.md``."""
    e, n, d, big_b = DTYPE_BYTES[cfg.dtype], cfg.num_local, cfg.dim, cfg.global_batch
    stats = 8 if cfg.dtype == "fp64" else 4
    state = e if cfg.dtype in ("fp32", "fp64") else 4
    cols = sampled_classes(cfg)
    layout = loss_layout(cfg)
    direct = cfg.sample_rate >= 1.0
    buffers = OPTIMIZER_BUFFERS[cfg.optimizer] - (cfg.optimizer == "sgd" and not cfg.momentum)
    optimizer = buffers * n * d * state + (n * 8 if cfg.optimizer != "none" else 0)
    master = n * d * 4 if cfg.uses_master_weights else 0
    sampling = 0
    if cfg.sample_rate < 1.0:
        want = cols - min(big_b, n)
        dense = want > _DENSE_FRACTION * (n - min(big_b, n))
        sampling = cols * 8 + (n * 4 + want * 16 if dense else 4 * int(1.25 * want + 32) * 8)
    tile = min(layout.tile, cols)
    work = work_bytes(big_b, cols, d, e, stats, tile, direct)
    weights_work = (2 + (not direct)) * tile * d * e
    device = {
        "centers": n * d * e,
        "center_grads": n * d * e,
        "master_weights": 0 if cfg.offload else master,
        "optimizer_state": 0 if cfg.offload else optimizer,
        "logits_work": work - weights_work - cols * stats,
        "logits_cache": layout.cache_bytes,
        "chunk_weights": weights_work,
        "class_scales": cols * stats,
        "embeddings": big_b * d * (3 * e + stats) + big_b * 8 * 3,
        "sampling": sampling,
        "comm_buffers": 2 * cfg.batch * d * e + 3 * big_b * stats,
        "reserve": cfg.reserve,
    }
    host = {"master_weights": master, "optimizer_state": optimizer} if cfg.offload else {}
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
    FC adds its rows straight into the kept one)."""
    return sum(items.values()) + (items["center_grads"] if cfg.grads_persist and cfg.sample_rate >= 1.0 else 0)


def _total(cfg: HeadConfig) -> int:
    return peak_bytes(memory_items(cfg)[0], cfg)


def _fits(cfg: HeadConfig) -> bool:
    return cfg.device_memory is not None and _total(cfg) <= cfg.device_memory


def max_classes(cfg: HeadConfig) -> int:
    """Largest ``num_classes`` whose plan fits ``cfg.device_memory`` (0 if not even ``gpus`` do)."""
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
    if not cfg.offload and (cfg.optimizer != "none" or cfg.uses_master_weights):
        out.append(("offload master weights and optimizer state to CPU memory", replace(cfg, offload=True)))
    if cfg.memory_budget_mb > 64:
        out.append(("memory_budget_mb=64 (fewer cached cosines, more recomputation)",
                    replace(cfg, memory_budget_mb=64)))
    if cfg.sample_rate > 0.1:
        out.append(("sample_rate=0.1 (less compute; memory barely changes)", replace(cfg, sample_rate=0.1)))
    if cfg.batch > 1:
        out.append((f"per-GPU batch {cfg.batch // 2}", replace(cfg, batch=cfg.batch // 2)))
    return out


def suggestions(cfg: HeadConfig) -> list[dict]:
    """What to change when ``cfg`` does not fit: each candidate with its total and whether it fits,
    the fewest GPUs that fit, and (if no single change fits) all memory-saving changes together."""
    out = []
    gpus = _min_gpus(cfg)
    if gpus is not None:
        out.append({"change": f"{gpus} GPUs (same per-GPU batch)", "total_bytes": _total(replace(cfg, gpus=gpus)),
                    "fits": True, "host_bytes": 0})
    for text, new in _candidate_changes(cfg):
        out.append({"change": text, "total_bytes": _total(new), "fits": _fits(new),
                    "host_bytes": sum(memory_items(new)[1].values())})
    if not any(s["fits"] for s in out[1 if gpus else 0:]):
        combined = _combine(cfg)
        out.append({"change": "all of: bf16 centers without master copy, SGD without momentum, offload, "
                              "memory_budget_mb=64", "total_bytes": _total(combined), "fits": _fits(combined),
                    "host_bytes": sum(memory_items(combined)[1].values())})
        more = _min_gpus(combined)
        if more is not None:
            on_more = replace(combined, gpus=more)
            out.append({"change": f"all of the above on {more} GPUs", "total_bytes": _total(on_more),
                        "fits": True, "host_bytes": sum(memory_items(on_more)[1].values())})
    return out


def _combine(cfg: HeadConfig) -> HeadConfig:
    dtype = "bf16" if cfg.dtype in ("fp32", "fp64") else cfg.dtype
    optimizer = "sgd" if cfg.optimizer in ("adam", "adamw") else cfg.optimizer
    return replace(cfg, dtype=dtype, master_weights=False, optimizer=optimizer, momentum=False,
                   offload=True, memory_budget_mb=min(cfg.memory_budget_mb, 64))


def plan(cfg: HeadConfig) -> Plan:
    """Memory per GPU, host memory (offload), communication per step, fit, capacity, suggestions."""
    device, host, layout, cols = memory_items(cfg)
    result = Plan(cfg, device, host, comm_volume(cfg), chunk=layout.chunks.chunk, cached_chunks=layout.chunks.cached,
                  tile=layout.tile, cached_columns=layout.cached, borrowed_columns=layout.borrowed,
                  sampled_classes=cols)
    if cfg.device_memory is not None:
        result.fits = result.total <= cfg.device_memory
        result.max_classes = max_classes(cfg)
        if not result.fits:
            result.suggestions = suggestions(cfg)
    return result


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: Plan) -> str:
    """A human-readable report of :func:`plan`'s result."""
    c = p.config
    lines = [f"ffc-plan: {c.num_classes:,} classes x dim {c.dim} on {c.gpus} GPUs, {c.dtype}, "
             f"sample_rate {c.sample_rate}, optimizer {c.optimizer}"
             f"{'' if c.momentum or c.optimizer != 'sgd' else ' (no momentum)'}"
             f"{', offload' if c.offload else ''}",
             f"  per GPU: {c.num_local:,} classes, batch {c.batch} (global {c.global_batch:,}), "
             f"{p.sampled_classes:,} classes computed per step in tiles of {p.tile:,}, logits of "
             f"{p.cached_columns:,} kept for the backward"
             f"{f' ({p.borrowed_columns:,} in the gradient buffer)' if p.borrowed_columns else ''}",
             "", "  memory per GPU"]
    for name, value in p.memory.items():
        lines.append(f"    {name:<34}{_size(value):>12}")
    lines.append(f"    {'peak (see docs/planner.md)':<34}{_size(p.total):>12}")
    if c.device_memory is not None:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"    {'device memory':<34}{_size(c.device_memory):>12}   -> {verdict}")
    if p.host_memory:
        lines.append(f"  host memory per GPU (offloaded): {_size(sum(p.host_memory.values()))}")
    lines += ["", "  communication per step per GPU (bytes received)"]
    for name, value in p.comm.items():
        lines.append(f"    {name:<34}{_size(value):>12}")
    lines.append(f"    {'total':<34}{_size(sum(p.comm.values())):>12}")
    if p.max_classes is not None:
        lines += ["", f"  largest class count that fits: {p.max_classes:,}"]
    if p.suggestions:
        lines += ["", "  to make it fit:"]
        for s in p.suggestions:
            mark = "fits" if s["fits"] else "still too big"
            host = f", plus {_size(s['host_bytes'])} of host memory per GPU" if s["host_bytes"] else ""
            lines.append(f"    - {s['change']}: {_size(s['total_bytes'])} per GPU ({mark}){host}")
    return "\n".join(lines)
