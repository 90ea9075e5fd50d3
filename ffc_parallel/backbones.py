"""Face-recognition backbones of insightface's ``arcface_torch``: images ``[b, C, H, W]`` -> embeddings
``[b, embedding_dim]``.

* ``r18``, ``r34``, ``r50``, ``r100``, ``r200``: the improved-residual ResNets (IResNet) of ArcFace
  (Deng et al., CVPR 2019, "LResNetE-IR"): a stride-1 3x3 stem (64 channels) + BN + PReLU, four stages of
  IR blocks (64, 128, 256, 512 channels, stride 2 in each stage's first block), and the output layer
  "E": BN2d - dropout - flatten - FC - BN1d (the last BN's scale is fixed at 1, as in insightface).
* ``mbf``: insightface's MobileFaceNet (Chen et al., 2018; the variant of ``arcface_torch``: widths 128 /
  256, blocks 1-4-6-2, a global depthwise convolution (GDC) before the embedding).

Any ``H, W`` and ``C`` work: the FC (IResNet) and the GDC kernel (MobileFaceNet) follow the final feature
map, ``ceil(H / 16) x ceil(W / 16)`` (7 x 7 at the published 112 x 112). Module names and parameter
shapes are those of ``arcface_torch/backbones`` (``iresnet.py``, ``mobilefacenet.py``), so a
``state_dict`` of one loads into the other. Parameters are only touched in ``__init__`` and ``forward``
(ZeRO-3 partitions them in between).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                  "r200": (6, 26, 60, 6)}
IRESNET_WIDTHS = (64, 128, 256, 512)
FACE_BACKBONES = (*IRESNET_LAYERS, "mbf")


def _image_shape(name: str, input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"--backbone {name} needs images [C, H, W], got input shape {tuple(input_shape)} "
                         "(use --synthetic-mode image or image data; mlp takes feature vectors)")
    return tuple(int(v) for v in input_shape)


def _halved(size: int, times: int) -> int:
    """Side of a feature map after ``times`` stride-2 convolutions with kernel 3 and padding 1."""
    for _ in range(times):
        size = (size - 1) // 2 + 1
    return size


class IRBlock(nn.Module):
    """IR block ``[b, c_in, h, w] -> [b, c, ceil(h/stride), ceil(w/stride)]``:
    BN - conv3x3 - BN - PReLU - conv3x3 (``stride``) - BN, plus the input (through conv1x1 (``stride``)
    + BN when the shape changes)."""

    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.prelu = nn.PReLU(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
                           if stride != 1 or c_in != c else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class _KeepBatchNormStats:
    """Context: the running statistics of ``module``'s BatchNorm layers are put back on exit (a
    checkpointed stage is run twice in training mode; the statistics must move once)."""

    def __init__(self, module: nn.Module):
        self.buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def __enter__(self):
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc):
        for b, saved in zip(self.buffers, self.saved):
            b.copy_(saved)


class IResNet(nn.Module):
    """insightface's IResNet: ``[b, C, H, W] -> [b, embedding_dim]``.

    Args:
        layers: IR blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50 (:data:`IRESNET_LAYERS`).
        input_shape: ``(C, H, W)``; the FC takes ``512 * ceil(H/16) * ceil(W/16)`` inputs.
        dropout: dropout probability before the FC (arcface_torch trains with 0).
        gradient_checkpointing: in training, keep only each stage's input and recompute the stage in the
            backward pass (``torch.utils.checkpoint``); the gradients and BatchNorm statistics are those
            of the plain forward.
    """

    def __init__(self, layers, input_shape, embedding_dim: int = 512, dropout: float = 0.0,
                 gradient_checkpointing: bool = False, name: str = "iresnet"):
        super().__init__()
        c_in, h, w = _image_shape(name, input_shape)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages of at least one block, got layers={tuple(layers)}")
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.conv1 = nn.Conv2d(c_in, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        c = 64
        for i, (width, blocks) in enumerate(zip(IRESNET_WIDTHS, layers)):
            stage = [IRBlock(c, width, 2)] + [IRBlock(width, width, 1) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            c = width
        self.bn2 = nn.BatchNorm2d(c)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c * _halved(h, 4) * _halved(w, 4), embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        for m in self.modules():   # arcface_torch's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if recompute:
                x = checkpoint(stage, x, use_reentrant=False,
                               context_fn=lambda stage=stage: (nullcontext(), _KeepBatchNormStats(stage)))
            else:
                x = stage(x)
        return self.features(self.fc(torch.flatten(self.dropout(self.bn2(x)), 1)))


class Stack(nn.Module):
    """``layers`` applied in order, plus the input when ``residual`` (the module layout of
    arcface_torch's MobileFaceNet, whose parameter names are ``...layers.<i>...``)."""

    def __init__(self, *layers: nn.Module, residual: bool = False):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


def conv_bn(c_in: int, c_out: int, kernel=1, stride: int = 1, padding=0, groups: int = 1,
            prelu: bool = True) -> Stack:
    """Conv (no bias) - BN (- PReLU): ``[b, c_in, h, w] -> [b, c_out, h', w']``."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return Stack(*layers, nn.PReLU(c_out)) if prelu else Stack(*layers)


def depthwise(c_in: int, c_out: int, hidden: int, stride: int = 1, residual: bool = False) -> Stack:
    """MobileFaceNet bottleneck: 1x1 expansion to ``hidden`` - 3x3 depthwise (``stride``) - linear 1x1."""
    return Stack(conv_bn(c_in, hidden), conv_bn(hidden, hidden, 3, stride, 1, groups=hidden),
                 conv_bn(hidden, c_out, prelu=False), residual=residual)


class MobileFaceNet(nn.Module):
    """insightface's MobileFaceNet (``mbf``): ``[b, C, H, W] -> [b, embedding_dim]``; 2.06 M parameters
    at 112 x 112 and 512-d. The GDC is a ``ceil(H/16) x ceil(W/16)`` depthwise convolution."""

    def __init__(self, input_shape, embedding_dim: int = 512, name: str = "mbf"):
        super().__init__()
        c_in, h, w = _image_shape(name, input_shape)
        self.layers = nn.ModuleList([
            conv_bn(c_in, 128, 3, 2, 1),
            conv_bn(128, 128, 3, 1, 1, groups=64),
            depthwise(128, 128, 128, stride=2),
            Stack(*[depthwise(128, 128, 128, residual=True) for _ in range(4)]),
            depthwise(128, 256, 256, stride=2),
            Stack(*[depthwise(256, 256, 256, residual=True) for _ in range(6)]),
            depthwise(256, 256, 512, stride=2),
            Stack(*[depthwise(256, 256, 256, residual=True) for _ in range(2)]),
        ])
        self.conv_sep = conv_bn(256, 512)
        gdc = conv_bn(512, 512, (_halved(h, 4), _halved(w, 4)), groups=512, prelu=False)
        self.features = Stack(gdc, nn.Flatten(), nn.Linear(512, embedding_dim, bias=False),
                              nn.BatchNorm1d(embedding_dim))
        for m in self.modules():   # arcface_torch's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def build_face_backbone(name: str, input_shape, embedding_dim: int, **options) -> nn.Module:
    """``r18`` ... ``r200`` (options: ``dropout``, ``gradient_checkpointing``) or ``mbf`` (no options)."""
    if name in IRESNET_LAYERS:
        return IResNet(IRESNET_LAYERS[name], input_shape, embedding_dim, name=name, **options)
    if name == "mbf":
        if options:
            raise ValueError(f"--backbone mbf takes no options, got {', '.join(sorted(options))} "
                             "(gradient checkpointing is for the IResNets r18 ... r200)")
        return MobileFaceNet(input_shape, embedding_dim)
    raise ValueError(f"unknown face backbone {name!r}: choose one of {', '.join(FACE_BACKBONES)}")
