"""CAM-based balanced sampling (bag of tricks for long-tailed recognition): new images of rare classes
made by moving the object (foreground) found by the class activation map over a kept background.

For an image of class y and a first-stage model whose embedding is ``P · GAP(F)`` (``F[K, h, w]`` the
last conv feature map, ``P[D, K]`` an optional linear projection, identity if None) the class
activation map is ``CAM(u, v) = w_yᵀ P F[:, u, v]`` with ``w_y`` the class center (the head's row;
a bias or a positive scale changes nothing below). It is upsampled to the image size, split at its
mean (foreground ``CAM > mean``), and ONE random transform (flip, translate, rotate or scale) is
applied to the foreground and its mask; the transformed foreground is pasted over the original
image, so every pixel outside the transformed foreground keeps its original value.

Balancing "as in the paper": class c gets ``max_j n_j - n_c`` generated images, each from a random
image of class c (with replacement); see :class:`CamBalancer`. :class:`OnlineCamBalancer` draws from
the same balanced distribution without storing the generated set (for large data, and ``ffc-train
--cam-epoch``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..deepspeed_bridge import partitioned
from ..distributed.checks import batch_sizes
from ..distributed.collectives import all_reduce_, gather_rows
from ..distributed import streams
from ..data.samplers import ClassIndex

TRANSFORMS = ("flip", "translate", "rotate", "scale")


def fetch_class_centers(head, classes: torch.Tensor) -> torch.Tensor:
    """Rows ``[n, D]`` of global ``classes[n]`` from a class-sharded head (every rank of
    ``head.group`` must call with the same ``classes``): each rank fills the rows it owns, one
    all-reduce of ``[n, D]`` sums them. No rank holds more than ``n`` rows."""
    head.require_device_rows("CAM's class centers")
    classes = torch.as_tensor(classes, dtype=torch.long, device=head.weight.device)
    start, stop = head.class_range
    own = (classes >= start) & (classes < stop)
    out = torch.zeros(classes.numel(), head.embedding_dim, dtype=head.weight.dtype, device=head.weight.device)
    out[own] = head.weight.detach()[classes[own] - start]
    return all_reduce_(out, dist.ReduceOp.SUM, head.group)


def class_activation_maps(features: torch.Tensor, centers: torch.Tensor, size, projection=None) -> torch.Tensor:
    """CAMs ``[N, H, W]`` from feature maps ``[N, K, h, w]`` and each image's class center ``[N, D]``
    (``D = K`` without ``projection[D, K]``), bilinearly upsampled to ``size = (H, W)``."""
    weights = centers if projection is None else centers @ projection        # [N, K]
    cams = torch.einsum("nk,nkhw->nhw", weights.to(features.dtype), features)
    return F.interpolate(cams.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def foreground_masks(cams: torch.Tensor) -> torch.Tensor:
    """``cams[N, H, W] > their per-image mean``: bool ``[N, H, W]``."""
    return cams > cams.mean(dim=(1, 2), keepdim=True)


def random_affines(n: int, generator: torch.Generator, kinds=TRANSFORMS, max_shift: float = 0.25,
                   max_degrees: float = 30.0, scale_range=(0.7, 1.3), aspect: float = 1.0
                   ) -> tuple[torch.Tensor, list[str]]:
    """One random transform per image: ``(theta[n, 2, 3] for F.affine_grid, kind names)``.

    ``theta`` maps output to input coordinates (normalised to [-1, 1]): a horizontal flip, a shift by up
    to ``max_shift`` of the image size per axis, a rotation up to ``±max_degrees`` (a true rotation in
    pixels for ``aspect = width / height``), a zoom in ``scale_range``.
    """
    kinds = list(kinds)
    if not kinds or any(k not in TRANSFORMS for k in kinds):
        raise ValueError(f"transforms must be a non-empty subset of {TRANSFORMS}, got {kinds}")
    pick = torch.randint(len(kinds), (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    names = [kinds[i] for i in pick.tolist()]
    for i, kind in enumerate(names):
        if kind == "flip":
            theta[i, 0, 0] = -1.0
        elif kind == "translate":
            theta[i, :, 2] = -2.0 * max_shift * u[i]
        elif kind == "rotate":
            a = math.radians(max_degrees) * float(u[i, 0])
            theta[i, :, :2] = torch.tensor([[math.cos(a), math.sin(a) / aspect], [-math.sin(a) * aspect, math.cos(a)]])
        else:
            lo, hi = scale_range
            s = lo + (hi - lo) * (float(u[i, 0]) + 1) / 2
            theta[i, :, :2] /= s
    return theta, names


def paste_transformed_foreground(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each image's foreground by its affine ``theta[N, 2, 3]`` and paste it over the image.

    ``images[N, C, H, W]``, ``masks[N, H, W]`` bool. Returns ``(new_images, moved_masks)``; pixels
    outside ``moved_masks`` are the original pixels. The foreground is resampled bilinearly with
    premultiplied mask (no dark fringe from the background); integer shifts and flips are exact.
    """
    m = masks.unsqueeze(1).to(images.dtype)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    moved_m = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved_fg = F.grid_sample(images * m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved_mask = moved_m > 0.5
    fg = moved_fg / moved_m.clamp_min(1e-6)
    return torch.where(moved_mask, fg, images), moved_mask[:, 0]


class CamBalancer:
    """Generate CAM-augmented images of rare classes until every class has as many as the largest.

    Args:
        feature_maps: ``images[N, C, H, W] -> F[N, K, h, w]`` (the first-stage backbone before its
            global average pooling; called under ``torch.no_grad()``).
        centers: ``classes[N] -> [N, D]`` class centers, e.g. ``lambda c: fetch_class_centers(head, c)``
            (collective: then every rank must generate with the same class list).
        projection: ``[D, K]`` linear map between the pooled features and the embedding, or None.
        transforms: the transform kinds to draw from (one per generated image).
    """

    def __init__(self, feature_maps, centers, projection=None, transforms=TRANSFORMS, seed: int = 0, **affine_kw):
        self.feature_maps, self.centers, self.projection = feature_maps, centers, projection
        self.transforms, self.seed, self.affine_kw = tuple(transforms), int(seed), affine_kw

    def plan(self, labels, generator: torch.Generator | None = None) -> torch.Tensor:
        """Source indices of the images to augment: ``max_j n_j - n_c`` random images of each class c
        (with replacement), grouped by class. Vectorised over classes."""
        index = labels if isinstance(labels, ClassIndex) else ClassIndex(labels)
        counts = index.counts
        extra = (counts.max() - counts) * (counts > 0)
        classes = torch.repeat_interleave(torch.arange(index.num_classes), extra)
        generator = generator or streams.generator(self.seed, "cam_set")
        return index.draw(classes, generator)

    @torch.no_grad()
    def augment(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """CAM-transformed copies ``[N, C, H, W]`` of ``images`` (labels unchanged): ``(images, masks, kinds)``."""
        generator = generator or streams.generator(self.seed, "cam_set")
        cams = class_activation_maps(self.feature_maps(images), self.centers(labels), images.shape[-2:],
                                     self.projection)
        masks = foreground_masks(cams)
        theta, kinds = random_affines(images.shape[0], generator, self.transforms,
                                      aspect=images.shape[-1] / images.shape[-2], **self.affine_kw)
        out, _ = paste_transformed_foreground(images, masks, theta)
        return out, masks, kinds

    def generate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, progress: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The balancing set ``(new_images, new_labels)`` for a data set held as tensors
        ``images[N, C, H, W]``, ``labels[N]``: :meth:`plan` then :meth:`augment` in batches."""
        generator = streams.generator(self.seed, "cam_set")
        sources = self.plan(labels, generator)
        batches = range(0, sources.numel(), batch_size)
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc="CAM-based balancing", unit="batch")
        new_images = [self.augment(images[sources[i:i + batch_size]], labels[sources[i:i + batch_size]],
                                   generator)[0] for i in batches]
        empty = images.new_empty((0,) + tuple(images.shape[1:]))
        return (torch.cat(new_images) if new_images else empty), labels[sources]


def batch_class_centers(head, local_labels: torch.Tensor) -> torch.Tensor:
    """Class centers ``[b, D]`` of this rank's ``local_labels[b]`` (collective over ``head.group``;
    ranks may hold different labels and batch sizes): one all-gather of the labels, then
    :func:`fetch_class_centers` on the global batch."""
    labels = torch.as_tensor(local_labels, dtype=torch.long, device=head.weight.device)
    sizes = batch_sizes(labels.numel(), head.group, labels.device)
    offset = sum(sizes[: head.rank])
    return fetch_class_centers(head, gather_rows(labels, sizes, head.group))[offset: offset + labels.numel()]


class OnlineCamBalancer:
    """CAM-based balanced sampling without storing a balancing set, for millions of images.

    The paper's balanced class c holds its ``n_c`` images plus ``max_j n_j - n_c`` CAM-transformed
    copies; a class-balanced sampler drawing uniformly from it yields a generated image with
    probability ``1 - n_c / max_j n_j``. Fed by a class-balanced sampler of the ORIGINAL images,
    ``augment`` replaces each drawn image of class c with a fresh CAM-transformed copy with exactly
    that probability (one random transform of its foreground, as :class:`CamBalancer`): the same
    distribution, with new copies every time instead of a fixed set.

    ``backbone`` must offer ``feature_maps(x) -> [N, K, h, w]`` and ``cam_projection() -> [D, K]``
    (:class:`~ffc_parallel.models.SmallResNet` does); CAMs are computed in eval mode (the
    first-stage model's BatchNorm statistics) without gradients. Draws depend on
    ``(seed, rank, step)`` only.
    """

    def __init__(self, class_counts, seed: int = 0, transforms=TRANSFORMS, **affine_kw):
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        self.p_generated = (1.0 - counts / counts.max()).clamp_min(0.0)
        self.seed, self.transforms, self.affine_kw = int(seed), tuple(transforms), affine_kw

    @torch.no_grad()
    def augment(self, backbone, head, images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """``images[b, C, H, W]`` with the picked ones replaced (collective over ``head.group``)."""
        if any(partitioned(p) for p in backbone.parameters()):   # the same on every rank: all raise
            raise RuntimeError("CAM balancing under ZeRO-3: the backbone's parameters are partitioned, so its "
                               "CAM projection cannot be read; use ZeRO stage 0, 1 or 2")
        generator = streams.generator(self.seed, "cam", head.rank, step)
        pick = torch.rand(labels.numel(), generator=generator, dtype=torch.float64) < self.p_generated[labels.cpu()]
        centers = batch_class_centers(head, labels)            # every rank calls, picks or not
        if not pick.any():
            return images
        pick = pick.to(images.device)
        chosen = images[pick]
        was_training = backbone.training
        backbone.eval()
        try:
            cams = class_activation_maps(backbone.feature_maps(chosen), centers[pick], chosen.shape[-2:],
                                         backbone.cam_projection().to(centers.dtype))
        finally:
            backbone.train(was_training)
        theta, _ = random_affines(chosen.shape[0], generator, self.transforms,
                                  aspect=chosen.shape[-1] / chosen.shape[-2], **self.affine_kw)
        out = images.clone()
        out[pick] = paste_transformed_foreground(chosen, foreground_masks(cams), theta.to(chosen.device))[0]
        return out
