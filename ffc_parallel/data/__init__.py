"""Data: distributed samplers, mixup, CAM-based sampling and data sets."""
from .samplers import (ClassIndex, ClassProbabilitySampler, DeferredResampling, InstanceBalancedSampler,  # noqa: F401
                       RandomOverSampler, RandomUnderSampler, class_probabilities)
