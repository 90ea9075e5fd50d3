"""Built-in synthetic face-like data with a long tail of identities, generated on the fly.

Identity ``i`` (a class) is a latent vector drawn from ``(seed, i)``; it owns ``class_counts[i]``
training images, heavy-tailed like real face data sets (a few identities with hundreds of images,
most with a handful). Image ``j`` of identity ``i`` is rendered from the latent through a fixed random
generator network, with per-image latent noise (expression), a random rotation/scale/shift (pose),
brightness/contrast jitter and pixel noise. A fraction of training labels is wrong (label noise).

Nothing is stored: training item ``n`` is identity ``searchsorted(starts, n)``, image
``n - starts[i]``, and every random number is a pure function of ``(seed, identity, image)`` (see
``distributed.streams``), so any rank can produce any slice in any order. Memory is the ``starts`` array (8 bytes
per identity: 80 MB at 10M identities) plus the generator weights.

Evaluation images never appear in training: images ``j >= class_counts[i]`` of training identities
(held-out images of seen identities) and identities ``i >= num_identities`` (unseen identities).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..distributed import streams

_COUNT, _LATENT, _EXPRESSION, _POSE, _LIGHT, _PIXEL, _WRONG = (streams.salt(f"synthetic_{name}") for name in (
    "count", "latent", "expression", "pose", "light", "pixel", "wrong_label"))
_CHUNK = 1 << 20
_NOISE_BANK = 4096  # pixel-noise patterns; each image picks one by hash and a random sign


def zipf_image_counts(num_identities: int, min_images: int, max_images: int, exponent: float,
                      seed: int) -> np.ndarray:
    """Images per identity ``[num_identities]`` (int64): a discrete power law,
    ``P(count >= c) = (min_images / c) ** exponent`` for ``min_images <= c <= max_images``."""
    out = np.empty(num_identities, dtype=np.int64)
    for lo in range(0, num_identities, _CHUNK):
        ids = np.arange(lo, min(lo + _CHUNK, num_identities), dtype=np.int64)
        u = streams.uniform(seed, _COUNT, ids)
        out[lo: lo + len(ids)] = np.minimum(np.floor(min_images * u ** (-1.0 / exponent)), max_images)
    return out


class SyntheticLongTail(torch.utils.data.Dataset):
    """Long-tailed synthetic identities, rendered as images ``[channels, size, size]`` or vectors ``[feature_dim]``.

    Args:
        num_identities: training classes (10k to 10M and beyond; memory 8 bytes per identity).
        mode: ``"image"`` (small grey or colour images) or ``"vector"`` (feature vectors, for MLPs).
        min_images, max_images, zipf_exponent: the image-count law (see :func:`zipf_image_counts`).
            The defaults give about 11 images per identity, 90% of identities below 20 images and 2%
            at 100 or more.
        intra_class_noise: std of the per-image latent perturbation (latents have unit variance).
        pose_degrees, pose_shift: images: max rotation (degrees) and shift (fraction of the image).
        pose_strength: vectors: weight of the 4 pose variables entering the generator next to the latent.
        pixel_noise: std of additive pixel noise.
        label_noise: probability that a training label is replaced by another identity.
        seed: everything (counts, latents, generator weights, noise) derives from it.

    ``dataset[n]`` returns ``(input, label)``; :meth:`batch` renders many items at once (vectorised).
    """

    def __init__(self, num_identities: int = 10_000, *, mode: str = "image", image_size: int = 16,
                 channels: int = 1, feature_dim: int = 64, latent_dim: int = 32, min_images: int = 2,
                 max_images: int = 200, zipf_exponent: float = 1.0, intra_class_noise: float = 0.5,
                 pose_degrees: float = 12.0, pose_shift: float = 0.08, pose_strength: float = 3.0,
                 pixel_noise: float = 0.3,
                 label_noise: float = 0.02, seed: int = 0):
        if mode not in ("image", "vector"):
            raise ValueError(f"mode must be 'image' or 'vector', got {mode!r}")
        if num_identities < 2:
            raise ValueError(f"num_identities must be >= 2, got {num_identities}")
        if not 1 <= min_images <= max_images:
            raise ValueError(f"need 1 <= min_images <= max_images, got {min_images}, {max_images}")
        if zipf_exponent <= 0 or not 0 <= label_noise < 1:
            raise ValueError("zipf_exponent must be > 0 and label_noise in [0, 1)")
        self.num_identities, self.mode, self.seed = int(num_identities), mode, int(seed)
        self.image_size, self.channels = image_size, channels
        self.feature_dim, self.latent_dim = feature_dim, latent_dim
        self.intra_class_noise, self.pose_degrees, self.pose_shift = intra_class_noise, pose_degrees, pose_shift
        self.pose_strength = pose_strength
        self.pixel_noise, self.label_noise = pixel_noise, label_noise
        counts = zipf_image_counts(self.num_identities, min_images, max_images, zipf_exponent, seed)
        self.starts = np.zeros(self.num_identities + 1, dtype=np.int64)   # training item range of each identity
        np.cumsum(counts, out=self.starts[1:])
        self.num_images = int(self.starts[-1])
        self._build_generator()

    # ------------------------------------------------------------------ layout
    @property
    def num_classes(self) -> int:
        return self.num_identities

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.mode == "image":
            return (self.channels, self.image_size, self.image_size)
        return (self.feature_dim,)

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per identity ``[num_identities]`` (int64)."""
        return np.diff(self.starts)

    def __len__(self) -> int:
        return self.num_images

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """``(identity, image_index)`` of training items ``indices`` (any int array)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"training item indices must be in [0, {self.num_images})")
        identity = np.searchsorted(self.starts, indices, side="right") - 1
        return identity, indices - self.starts[identity]

    def labels_of(self, indices) -> np.ndarray:
        """Training labels of items ``indices``: the identity, or another one with prob ``label_noise``."""
        identity, image = self.locate(indices)
        return self._noisy_labels(identity, image)

    def _noisy_labels(self, identity: np.ndarray, image: np.ndarray) -> np.ndarray:
        if self.label_noise == 0:
            return identity
        u = streams.uniform(self.seed, _WRONG, identity, image, n=2)
        other = np.floor(u[..., 1] * (self.num_identities - 1)).astype(np.int64)
        other += other >= identity
        return np.where(u[..., 0] < self.label_noise, other, identity)

    # ------------------------------------------------------------------ rendering
    def _build_generator(self) -> None:
        g = streams.generator(self.seed, "synthetic_renderer")
        L = self.latent_dim
        size = int(np.prod(self.input_shape))
        self._noise_bank = torch.from_numpy(streams.normal(self.seed, _PIXEL, np.arange(_NOISE_BANK), n=size)).float()
        if self.mode == "image":
            low = max(4, self.image_size // 2)
            self._low = low
            self._to_pixels = torch.randn(L, self.channels * low * low, generator=g) / math.sqrt(L)
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, self.image_size), torch.linspace(-1, 1, self.image_size),
                                    indexing="ij")
            face = ((xx / 0.75) ** 2 + (yy / 0.95) ** 2 <= 1).float()  # an oval "face" mask
            self._mask = (0.25 + 0.75 * face).expand(self.channels, -1, -1)
        else:
            hidden = 4 * self.feature_dim
            self._hidden = torch.randn(L + 4, hidden, generator=g) / math.sqrt(L + 4)
            self._out = torch.randn(hidden, self.feature_dim, generator=g) / math.sqrt(hidden)

    def latents(self, identities) -> torch.Tensor:
        """Identity latent vectors ``[n, latent_dim]`` (unit-variance normal, a function of (seed, id))."""
        ids = np.asarray(identities, dtype=np.int64)
        return torch.from_numpy(streams.normal(self.seed, _LATENT, ids, n=self.latent_dim)).float()

    def render(self, identities, images) -> torch.Tensor:
        """Inputs ``[n, *input_shape]`` (float32) for image ``images[k]`` of identity ``identities[k]``.

        Any identity id works: ids ``>= num_identities`` are the unseen identities.
        """
        ids = np.asarray(identities, dtype=np.int64)
        img = np.asarray(images, dtype=np.int64)
        z = self.latents(ids)
        z = z + self.intra_class_noise * torch.from_numpy(
            streams.normal(self.seed, _EXPRESSION, ids, img, n=self.latent_dim)).float()
        pose = torch.from_numpy(streams.uniform(self.seed, _POSE, ids, img, n=4)).float() * 2 - 1  # [-1, 1]
        if self.mode == "vector":
            h = torch.tanh(torch.cat([z, self.pose_strength * pose], dim=1) @ self._hidden)
            return h @ self._out + self.pixel_noise * self._pixel_noise(ids, img)
        return self._render_images(ids, img, z, pose)

    def _pixel_noise(self, ids, img) -> torch.Tensor:
        """Per-image noise ``[n, prod(input_shape)]``: a bank pattern picked by hash, random sign."""
        h = streams.hash_keys(self.seed, _PIXEL, ids, img)
        rows = torch.from_numpy((h % np.uint64(_NOISE_BANK)).astype(np.int64))
        sign = torch.from_numpy(((h >> np.uint64(40)) & np.uint64(1)).astype(np.float32) * 2 - 1)
        return self._noise_bank[rows] * sign[:, None]

    def _render_images(self, ids, img, z, pose) -> torch.Tensor:
        n, c, s = len(ids), self.channels, self.image_size
        low = (z @ self._to_pixels).view(n, c, self._low, self._low)
        face = torch.tanh(F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)) * self._mask
        angle = pose[:, 0] * math.radians(self.pose_degrees)
        scale = 1 + 0.1 * pose[:, 1]
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * scale, -torch.sin(angle) * scale
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * scale, torch.cos(angle) * scale
        theta[:, :, 2] = 2 * self.pose_shift * pose[:, 2:4]
        grid = F.affine_grid(theta, [n, c, s, s], align_corners=False)
        x = F.grid_sample(face, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        light = torch.from_numpy(streams.normal(self.seed, _LIGHT, ids, img, n=2)).float()
        x = x * torch.exp(0.15 * light[:, :1, None, None]) + 0.1 * light[:, 1:, None, None]
        return x + self.pixel_noise * self._pixel_noise(ids, img).view(n, c, s, s)

    # ------------------------------------------------------------------ access
    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Training items ``indices`` rendered at once: ``(inputs[n, *input_shape], labels[n])``."""
        identity, image = self.locate(indices)
        return self.render(identity, image), torch.from_numpy(self._noisy_labels(identity, image))

    def __getitem__(self, index: int):
        x, y = self.batch([int(index)])
        return x[0], int(y[0])

    def heldout_seen(self, identities, images_per_identity: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out images (never trained on) of training ``identities``: ``(inputs, true labels)``."""
        seen = np.asarray(identities, dtype=np.int64)
        if seen.size and (seen.min() < 0 or seen.max() >= self.num_identities):
            raise ValueError(f"seen identities must be in [0, {self.num_identities})")
        ids = np.repeat(seen, images_per_identity)
        first_unused = self.starts[seen + 1] - self.starts[seen]
        img = np.repeat(first_unused, images_per_identity) + np.tile(np.arange(images_per_identity), len(seen))
        return self.render(ids, img), torch.from_numpy(ids)

    def unseen(self, num_identities: int, images_per_identity: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of identities outside training: ``(inputs[n*k, ...], identity index 0..n-1 [n*k])``."""
        local = np.repeat(np.arange(num_identities, dtype=np.int64), images_per_identity)
        img = np.tile(np.arange(images_per_identity, dtype=np.int64), num_identities)
        return self.render(self.num_identities + local, img), torch.from_numpy(local)

    def describe(self) -> str:
        counts = self.class_counts
        return (f"synthetic long-tail ({self.mode} {self.input_shape}): {self.num_identities:,} identities, "
                f"{self.num_images:,} images, per identity min {counts.min()} / median "
                f"{int(np.median(counts))} / max {counts.max()}, label noise {self.label_noise:.0%}")
