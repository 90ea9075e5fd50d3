"""Data: the built-in synthetic long-tailed identities, ImageFolder, insightface RecordIO, sklearn digits,
identity splits for evaluation, per-rank epoch batches; distributed samplers and FFC's dual loader."""
from ..compat import moved_names
from .decoded import DecodedImages
from .digits import TensorData, load_digits_tensors
from .imagefolder import BadImages, ImageFolder, UnreadableImage, decode_image
from .loader import EpochBatches, FeistelPermutation, RankLoader
from .recordio import AmbiguousLabel, RecordIOFaces, RecordIOReader, RecordIOWriter, write_face_recordio
from .sources import DEFAULT_BUCKET_EDGES, SOURCES, DataBundle, build_data, frequency_buckets
from .splits import IdentitySplit, Subset, split_identities
from .synthetic import SyntheticLongTail, zipf_image_counts
from .samplers import (SAMPLERS, ClassIndex, ClassProbabilitySampler, DeferredResampling,  # noqa: F401
                       InstanceBalancedSampler, RandomOverSampler, RandomUnderSampler, build_sampler,
                       class_probabilities)
from .dual_loader import DualBatchSampler, dual_loader, labels_of  # noqa: F401

__all__ = ["AmbiguousLabel", "BadImages", "build_data", "build_sampler", "class_probabilities", "ClassIndex",
           "ClassProbabilitySampler",
           "DataBundle", "decode_image", "DecodedImages", "DEFAULT_BUCKET_EDGES", "DeferredResampling", "dual_loader",
           "DualBatchSampler", "EpochBatches", "FeistelPermutation",
           "frequency_buckets", "IdentitySplit", "ImageFolder", "InstanceBalancedSampler", "labels_of",
           "load_digits_tensors", "RandomOverSampler", "RandomUnderSampler", "RankLoader",
           "RecordIOFaces", "RecordIOReader", "RecordIOWriter", "SAMPLERS", "SOURCES", "split_identities", "Subset",
           "SyntheticLongTail", "TensorData", "UnreadableImage", "write_face_recordio", "zipf_image_counts"]

__getattr__ = moved_names(__name__, {name: "ffc_parallel.algorithms" for name in (
    "CamBalancer", "Mixup", "OnlineCamBalancer", "fetch_class_centers")})
