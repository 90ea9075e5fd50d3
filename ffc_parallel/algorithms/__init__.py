"""The algorithms of the source papers, built on the sharded head and the rank protocols: FFC's class pool,
million-way instance classification, mixup and CAM balancing (long-tail bag of tricks), and the training
step's loss that composes them (cross-batch memory and re-weighting live in ``ffc_parallel.losses``)."""
from .cam import CamBalancer, OnlineCamBalancer, fetch_class_centers
from .ffc import FFC, ClassPool, pool_loss
from .instance import HardestClassSmoothing, contrastive_prior, hardest_class_neighbours, instance_classifier
from .mixup import Mixup
from .step_loss import StepLoss

__all__ = ["FFC", "CamBalancer", "ClassPool", "HardestClassSmoothing", "Mixup", "OnlineCamBalancer", "StepLoss",
           "contrastive_prior", "fetch_class_centers", "hardest_class_neighbours", "instance_classifier",
           "pool_loss"]
