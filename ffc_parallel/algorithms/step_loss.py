"""One training step's loss, composed from the algorithms: CAM balancing, mixup, the head's loss (or sigmoid
focal), hardest-class smoothing's soft targets, cross-batch memory.

    loss_fn = StepLoss(mixup=Mixup(alpha=1.0), xbm=CrossBatchMemory(8192, 512))
    model = fp.HybridModel(backbone, head, loss_fn=loss_fn)     # loss_fn(backbone, head, inputs, labels)

Every part is optional; without any, the loss is ``head(backbone(inputs), labels)``. The training loop
sets ``epoch`` and ``step`` (the micro-batch counter, the same on every rank): mixup and CAM balancing
draw from them, so every rank draws the same.
"""
from __future__ import annotations

from functools import partial


class StepLoss:
    """``HybridModel.loss_fn`` of a classification or instance run.

    ``inputs`` (CAM-transformed by ``cam`` from ``cam_epoch`` on) -> ``backbone(inputs)`` (mixed by
    ``mixup`` while it is active: :meth:`~ffc_parallel.algorithms.Mixup.two_target_loss`) -> the head's
    loss (with ``smoothing``'s soft targets, or ``focal`` = sigmoid focal instead of the softmax) ->
    plus the cross-batch-memory loss ``xbm``.
    """

    def __init__(self, mixup=None, xbm=None, focal=None, smoothing=None, cam=None, cam_epoch: int = 0):
        self.mixup, self.xbm, self.focal, self.smoothing = mixup, xbm, focal, smoothing
        self.cam, self.cam_epoch = cam, cam_epoch
        self.epoch = self.step = 0

    def __call__(self, backbone, head, inputs, labels):
        if self.cam is not None and self.epoch >= self.cam_epoch:
            inputs = self.cam.augment(backbone, head, inputs, labels, self.step)
        head_loss = partial(self.head_loss, head)
        if self.mixup is not None and self.mixup.active(self.epoch):
            embeddings, plan = self.mixup.forward_embeddings(backbone, inputs, self.step)
            loss = self.mixup.two_target_loss(head_loss, embeddings, labels, plan)
        else:
            embeddings = backbone(inputs)
            loss = head_loss(embeddings, labels)
        if self.xbm is not None:
            loss = loss + self.xbm(embeddings, labels)
        return loss

    def head_loss(self, head, embeddings, labels):
        """The head's part for one set of targets: sigmoid focal, or the softmax with soft targets."""
        if self.focal is not None:
            return self.focal(head, embeddings, labels)
        soft = self.smoothing.soft_targets(labels) if self.smoothing is not None else None
        return head(embeddings, labels, soft_targets=soft)
