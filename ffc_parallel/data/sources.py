"""One entry point for every data source: ``build_data(source, ...) -> DataBundle``.

A bundle holds the training set and two small evaluation sets that never overlap training: held-out
images of training classes (top-1/top-5, accuracy by frequency bucket) and images of unseen classes
(verification, retrieval).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .decoded import DecodedImages
from .digits import TensorData, load_digits_tensors
from .imagefolder import BadImages, ImageFolder
from .recordio import RecordIOFaces
from .splits import IdentitySplit, cap_positions, split_identities, stack_inputs, subset
from .synthetic import SyntheticLongTail

SOURCES = ("synthetic", "digits", "imagefolder", "recordio")
DEFAULT_BUCKET_EDGES = (20, 100)  # few-shot < 20 <= medium-shot <= 100 < many-shot (training images)


@dataclass
class DataBundle:
    """Training data and evaluation sets of one source.

    ``train[i] = (input, label)`` (and ``train.batch(indices)`` when vectorised); ``class_counts[C]``
    training images per class; ``seen = (inputs[n, ...], labels[n])`` held-out images of training
    classes; ``unseen = (inputs[m, ...], identity[m])`` images of classes outside training;
    ``bad_images`` the image files' :class:`~ffc_parallel.data.imagefolder.BadImages` (None without files);
    ``test = (inputs[t, ...], labels[t])`` the user's own test images of training classes (``eval_path``).
    """

    train: torch.utils.data.Dataset
    num_classes: int
    class_counts: np.ndarray
    input_shape: tuple
    seen: tuple[torch.Tensor, torch.Tensor]
    unseen: tuple[torch.Tensor, torch.Tensor]
    description: str
    bad_images: BadImages | None = None
    test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def skipped_images(self) -> int:
        """Unreadable images this process (and its DataLoader workers) replaced so far (``on_bad_image="skip"``)."""
        return self.bad_images.skipped if self.bad_images is not None else 0


def frequency_buckets(class_counts, edges=DEFAULT_BUCKET_EDGES) -> np.ndarray:
    """Bucket of each class: 0 = tail (count < edges[0]), 1 = medium, 2 = head (count > edges[1])."""
    counts = np.asarray(class_counts)
    return (counts >= edges[0]).astype(np.int64) + (counts > edges[1])


def build_data(source: str = "synthetic", *, path: str | None = None, num_identities: int = 10_000,
               synthetic_mode: str = "vector", image_size: int = 16, channels: int = 1, feature_dim: int = 64,
               label_noise: float = 0.02, min_images: int = 2, max_images: int = 200,
               eval_ids_per_bucket: int = 300, eval_images_per_id: int = 2, unseen_identities: int = 300,
               unseen_images_per_id: int = 4, unseen_fraction: float = 0.1, heldout_per_class: int | None = None,
               max_eval_images: int = 4000, bucket_edges=DEFAULT_BUCKET_EDGES, on_bad_image: str = "fail",
               decode_cache=None, decode_cache_limit: int | None = None, eval_path: str | None = None,
               seed: int = 0) -> DataBundle:
    """Build ``source`` (one of :data:`SOURCES`); the options that do not apply to it are ignored.
    Image files: ``on_bad_image`` ``"fail"`` or ``"skip"`` (see :class:`~ffc_parallel.data.imagefolder.BadImages`);
    ``decode_cache`` a directory where the images are decoded once (:class:`~ffc_parallel.data.decoded.DecodedImages`),
    unless they would take more than ``decode_cache_limit`` bytes; ``eval_path`` a test set of the same kind
    whose classes are training classes (``bundle.test``)."""
    if source == "synthetic":
        data = SyntheticLongTail(num_identities, mode=synthetic_mode, image_size=image_size, channels=channels,
                                 feature_dim=feature_dim, label_noise=label_noise, min_images=min_images,
                                 max_images=max_images, seed=seed)
        buckets = frequency_buckets(data.class_counts, bucket_edges)
        ids = np.concatenate([np.nonzero(buckets == b)[0][:eval_ids_per_bucket] for b in range(3)])
        return DataBundle(data, data.num_classes, data.class_counts, data.input_shape,
                          data.heldout_seen(ids, eval_images_per_id),
                          data.unseen(unseen_identities, unseen_images_per_id), data.describe())
    if source == "digits":
        x, y = load_digits_tensors()
        base = TensorData(x, y)
        per_class = 40 if heldout_per_class is None else heldout_per_class
        split = split_identities(y.numpy(), unseen_fraction=max(unseen_fraction, 0.2),
                                 heldout_per_class=per_class, seed=seed)
        train = TensorData(x[split.train], torch.from_numpy(split.train_labels))
        return DataBundle(train, split.num_classes, split.class_counts, tuple(x.shape[1:]),
                          (x[split.seen], torch.from_numpy(split.seen_labels)),
                          (x[split.unseen], torch.from_numpy(split.unseen_ids)),
                          f"sklearn digits: {split.num_classes} training classes, {len(split.train)} images")
    if source in ("imagefolder", "recordio"):
        if not path:
            raise ValueError(f"data source {source!r} needs a path (--data-path)")
        def read(root):
            files = (ImageFolder(root, image_size, channels, on_bad_image) if source == "imagefolder"
                     else RecordIOFaces(root, image_size, channels, on_bad_image))
            fits = decode_cache_limit is None or len(files) * channels * image_size ** 2 <= decode_cache_limit
            return DecodedImages(files, decode_cache) if decode_cache and fits else files

        base = read(path)
        split = split_identities(base.labels, unseen_fraction=unseen_fraction,
                                 heldout_per_class=1 if heldout_per_class is None else heldout_per_class, seed=seed)
        seen_pick = cap_positions(split.seen, max_eval_images, seed)
        unseen_pick = cap_positions(split.unseen, max_eval_images, seed + 1)
        seen = (stack_inputs(base, split.seen[seen_pick]), torch.from_numpy(split.seen_labels[seen_pick]))
        unseen = (stack_inputs(base, split.unseen[unseen_pick]), torch.from_numpy(split.unseen_ids[unseen_pick]))
        test = _test_set(read(eval_path), base, split, eval_path) if eval_path else None
        return DataBundle(subset(base, split.train, split.train_labels), split.num_classes, split.class_counts,
                          (channels, image_size, image_size), seen, unseen,
                          f"{source} {path}: {split.num_classes:,} training classes, {len(split.train):,} images",
                          base.bad_images, test)
    raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")


def _test_set(test, base, split: IdentitySplit, path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, training labels)`` of the images of ``test`` whose class trains (classes kept out of training
    for verification are left out). Classes match by folder name (ImageFolder) or identity label (RecordIO);
    a test class the training data lacks is refused, naming ``path``."""
    names = getattr(base, "classes", None)
    if names is not None:   # folder names -> the training folder's class numbers (sorted names)
        keys, known = np.asarray(test.classes)[test.labels], np.asarray(names)
    else:
        keys, known = np.asarray(test.labels), np.unique(base.labels)
    unknown = sorted(set(keys.tolist()) - set(known.tolist()))
    if unknown:
        raise ValueError(f"--eval-data-path {path}: {len(unknown)} class(es) not in the training data, e.g. "
                         f"{', '.join(map(str, unknown[:5]))} (class names must match the training data's)")
    original = np.searchsorted(known, keys) if names is not None else keys
    keep = np.nonzero(np.isin(original, split.original_classes))[0]
    if not len(keep):
        raise ValueError(f"--eval-data-path {path}: none of its classes is a training class (all were held out)")
    return stack_inputs(test, keep), torch.from_numpy(np.searchsorted(split.original_classes, original[keep]))
