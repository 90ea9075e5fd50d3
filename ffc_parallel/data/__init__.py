"""Data: the built-in synthetic long-tailed identities, ImageFolder, insightface RecordIO, sklearn digits,
identity splits for evaluation, per-rank epoch batches; distributed samplers, mixup, CAM-based sampling."""
from .digits import TensorData, load_digits_tensors
from .imagefolder import ImageFolder, decode_image
from .loader import EpochBatches, FeistelPermutation, RankLoader
from .recordio import RecordIOFaces, RecordIOReader, RecordIOWriter, write_face_recordio
from .sources import DEFAULT_BUCKET_EDGES, SOURCES, DataBundle, build_data, frequency_buckets
from .splits import IdentitySplit, Subset, split_identities
from .synthetic import SyntheticLongTail, zipf_image_counts
from .samplers import (ClassIndex, ClassProbabilitySampler, DeferredResampling, InstanceBalancedSampler,  # noqa: F401
                       RandomOverSampler, RandomUnderSampler, class_probabilities)
from .mixup import Mixup  # noqa: F401
from .cam import CamBalancer, OnlineCamBalancer, fetch_class_centers  # noqa: F401
from .dual_loader import DualBatchSampler, dual_loader, labels_of  # noqa: F401

__all__ = ["build_data", "CamBalancer", "class_probabilities", "ClassIndex", "ClassProbabilitySampler",
           "DataBundle", "decode_image", "DEFAULT_BUCKET_EDGES", "DeferredResampling", "dual_loader",
           "DualBatchSampler", "EpochBatches", "FeistelPermutation", "fetch_class_centers",
           "frequency_buckets", "IdentitySplit", "ImageFolder", "InstanceBalancedSampler", "labels_of", "OnlineCamBalancer",
           "load_digits_tensors", "Mixup", "RandomOverSampler", "RandomUnderSampler", "RankLoader",
           "RecordIOFaces", "RecordIOReader", "RecordIOWriter", "SOURCES", "split_identities", "Subset",
           "SyntheticLongTail", "TensorData", "write_face_recordio", "zipf_image_counts"]
