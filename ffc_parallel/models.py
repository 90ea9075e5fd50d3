"""Backbones: inputs ``[b, *input_shape]`` -> embeddings ``[b, embedding_dim]``.

Built-in presets (no extra packages): ``"mlp"``, ``"cnn"`` and ``"cnn-wide"`` (plain CNNs, the fast choice
for images of 8 to 64 pixels), ``"resnet"`` (a small ResNet for such images) and insightface's
face-recognition backbones ``"r18"``, ``"r34"``, ``"r50"``, ``"r100"``, ``"r200"`` and ``"mbf"`` (:mod:`ffc_parallel.backbones`). Any other name is looked up in torchvision
(``"torchvision:resnet18"`` or plain ``"resnet18"``) and then timm (``"timm:..."``), when those packages
are installed; their classifier layer is sized to ``embedding_dim``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .backbones import FACE_BACKBONES, build_face_backbone

PRESETS = ("mlp", "cnn", "cnn-wide", "resnet", *FACE_BACKBONES)


class MLP(nn.Module):
    """Flatten -> ``[Linear -> BatchNorm -> ReLU] x len(hidden)`` -> Linear -> BatchNorm (the embedding)."""

    def __init__(self, input_shape, embedding_dim: int, hidden=(512, 512)):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Linear(width, embedding_dim), nn.BatchNorm1d(embedding_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet for small images ``[C, H, W]``: 3x3 stem, one block per stage (stride 2 after the first),
    global average pooling, Linear -> BatchNorm to ``embedding_dim`` (insightface-style embedding layer)."""

    def __init__(self, input_shape, embedding_dim: int, widths=(32, 64, 128)):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"the resnet backbone needs images [C, H, W], got input shape {tuple(input_shape)}; "
                             "use the mlp backbone for feature vectors")
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c, embedding_dim), nn.BatchNorm1d(embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output ``[N, K, h, w]``, before global average pooling (for CAMs)."""
        return self.features[:-2](x)

    def cam_projection(self) -> torch.Tensor:
        """``P[D, K]`` with ``embedding = P @ pooled + const`` in eval mode: the Linear scaled by the
        BatchNorm's ``γ / sqrt(running_var + eps)`` (its shift is the same at every position, so it
        does not move a CAM's foreground split)."""
        linear, bn = self.embed
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None] * linear.weight


CNN_WIDTHS = {"cnn": (32, 64, 128), "cnn-wide": (48, 96, 192)}


class SmallCNN(nn.Module):
    """The plain CNN for small images ``[C, H, W]`` (8 to 64 pixels): three stages of conv3x3 - BatchNorm -
    ReLU - max-pool 2, flatten (the ``H/8 x W/8`` map keeps where a stroke is), Linear -> BatchNorm to
    ``embedding_dim``. ``cnn`` (widths 32, 64, 128) costs 20 MFLOP per 32 x 32 grey image, a fifth of ``resnet``."""

    def __init__(self, input_shape, embedding_dim: int, widths=CNN_WIDTHS["cnn"]):
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 8:
            raise ValueError(f"the cnn backbones need images [C, H, W] of at least 8 x 8 pixels, got input shape "
                             f"{tuple(input_shape)}; use the mlp backbone for feature vectors")
        layers, c = [], input_shape[0]
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        side = 2 ** len(widths)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c * (input_shape[1] // side) * (input_shape[2] // side), embedding_dim),
                                   nn.BatchNorm1d(embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))


class _RepeatChannels(nn.Module):
    """Feeds greyscale images ``[b, 1, H, W]`` to a model that expects ``channels`` channels."""

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, self.channels, -1, -1))


def _torchvision(name: str, input_shape, embedding_dim: int) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=embedding_dim)
    return _RepeatChannels(model, 3) if input_shape[0] == 1 else model


def _timm(name: str, input_shape, embedding_dim: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=embedding_dim, in_chans=input_shape[0])


def build_backbone(name: str, input_shape, embedding_dim: int, **options) -> nn.Module:
    """A backbone by name: a preset (:data:`PRESETS`, ``options`` go to its constructor),
    ``"torchvision:<model>"``, ``"timm:<model>"`` or a bare torchvision/timm model name."""
    input_shape = tuple(input_shape)
    if name == "mlp":
        return MLP(input_shape, embedding_dim, **options)
    if name in CNN_WIDTHS:
        return SmallCNN(input_shape, embedding_dim, **{"widths": CNN_WIDTHS[name], **options})
    if name == "resnet":
        return SmallResNet(input_shape, embedding_dim, **options)
    if name in FACE_BACKBONES:
        return build_face_backbone(name, input_shape, embedding_dim, **options)
    library, _, model = name.rpartition(":")
    if library not in ("", "torchvision", "timm"):
        raise ValueError(f"unknown backbone library {library!r} in {name!r}: use torchvision:<model> or timm:<model>")
    if len(input_shape) != 3:
        raise ValueError(f"backbone {name!r} needs images [C, H, W], got input shape {input_shape}")
    tried = []
    for lib, build in (("torchvision", _torchvision), ("timm", _timm)):
        if library not in ("", lib):
            continue
        try:
            return build(model, input_shape, embedding_dim)
        except ImportError:
            tried.append(f"{lib} is not installed (pip install {lib})")
        except (ValueError, KeyError, RuntimeError) as exc:
            tried.append(f"{lib}: {exc}")
    raise ValueError(f"unknown backbone {name!r}: presets are {', '.join(PRESETS)}; " + "; ".join(tried))
