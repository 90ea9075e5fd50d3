"""insightface's face-recognition backbones (r18 ... r200, mbf): parameter counts against the published
architectures, each block against its definition, any input size, gradient checkpointing."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ffc_parallel.backbones import FACE_BACKBONES, IRBlock, IResNet, MobileFaceNet, depthwise
from ffc_parallel.models import build_backbone

# Parameters of arcface_torch's own models at 112 x 112, 512-d: sum(p.numel() for p in model.parameters())
# of iresnet18/34/50/100/200(num_features=512) and get_mbf(False, 512) from recognition/arcface_torch/backbones
# (insightface commit 7fadd42); _hand_count below derives the same numbers from the papers' layer lists.
PUBLISHED = {"r18": 24_025_600, "r34": 34_139_328, "r50": 43_590_848, "r100": 65_156_160, "r200": 118_833_920,
             "mbf": 2_059_520}
LAYERS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3],
          "r200": [6, 26, 60, 6]}


def _bn(c):
    return 2 * c


def _conv(c_in, c_out, k, groups=1):
    return c_out * (c_in // groups) * k * k


def _hand_count(name, c_in=3, side=112, dim=512):
    """Parameters from the architecture's description alone (no module is built)."""
    if name == "mbf":
        def block(a, b, hidden):   # 1x1 + BN + PReLU, 3x3 depthwise + BN + PReLU, 1x1 + BN
            return (_conv(a, hidden, 1) + 3 * hidden + _conv(hidden, hidden, 3, hidden) + 3 * hidden
                    + _conv(hidden, b, 1) + _bn(b))
        n = _conv(c_in, 128, 3) + 3 * 128                  # stem conv3x3/2 + BN + PReLU
        n += _conv(128, 128, 3, groups=64) + 3 * 128         # grouped conv3x3 (64 groups) + BN + PReLU
        n += block(128, 128, 128) + 4 * block(128, 128, 128)
        n += block(128, 256, 256) + 6 * block(256, 256, 256)
        n += block(256, 256, 512) + 2 * block(256, 256, 256)
        n += _conv(256, 512, 1) + 3 * 512                    # conv_sep 1x1 + BN + PReLU
        fm = -(-side // 16)
        return n + 512 * fm * fm + _bn(512) + 512 * dim + _bn(dim)   # GDC + BN, FC without bias, BN1d
    n = _conv(c_in, 64, 3) + _bn(64) + 64                    # stem conv3x3 + BN + PReLU
    prev = 64
    for width, blocks in zip((64, 128, 256, 512), LAYERS[name]):
        for i in range(blocks):
            n += _bn(prev) + _conv(prev, width, 3) + _bn(width) + width + _conv(width, width, 3) + _bn(width)
            if i == 0:
                n += _conv(prev, width, 1) + _bn(width)      # the downsample shortcut
            prev = width
    fm = -(-side // 16)
    return n + _bn(512) + 512 * fm * fm * dim + dim + _bn(dim)       # BN2d, FC (with bias), BN1d


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_parameter_counts_at_112_are_the_published_models(name):
    with torch.device("meta"):
        model = build_backbone(name, (3, 112, 112), 512)
    count = sum(p.numel() for p in model.parameters())
    assert count == _hand_count(name) == PUBLISHED[name]
    with torch.device("meta"):   # 1 channel, 32 px, 128-d: the formula still holds
        small = build_backbone(name, (1, 32, 32), 128)
    assert sum(p.numel() for p in small.parameters()) == _hand_count(name, c_in=1, side=32, dim=128)


@pytest.mark.parametrize("name", ["r18", "r50", "mbf"])   # r34, r100, r200: the same code, more blocks
def test_any_image_size_and_channel_count_trains(name):
    torch.manual_seed(0)
    for shape in ((1, 16, 16), (3, 20, 28)):
        model = build_backbone(name, shape, 24)
        out = model(torch.randn(3, *shape))
        assert out.shape == (3, 24)
        out.square().sum().backward()
        for pname, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if name != "mbf":   # the embedding BatchNorm's scale is fixed at 1, as in insightface
        assert not model.features.weight.requires_grad and torch.equal(model.features.weight, torch.ones(24))
        assert model.fc.in_features == 512 * 2 * 2   # ceil(20/16) x ceil(28/16)
    else:
        assert model.features.layers[0].layers[0].kernel_size == (2, 2)


def _bn_train(x, bn):
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=1e-5)


@pytest.mark.parametrize("c_in,c,stride", [(8, 8, 1), (8, 16, 2)])
def test_ir_block_is_bn_conv_bn_prelu_conv_bn_plus_shortcut(c_in, c, stride):
    torch.manual_seed(0)
    block = IRBlock(c_in, c, stride)
    for m in block.modules():   # non-trivial affine parameters
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.PReLU)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(4, c_in, 9, 9)
    y = _bn_train(x, block.bn1)
    y = F.conv2d(y, block.conv1.weight, padding=1)
    y = F.prelu(_bn_train(y, block.bn2), block.prelu.weight)
    y = _bn_train(F.conv2d(y, block.conv2.weight, stride=stride, padding=1), block.bn3)
    if block.downsample is None:
        shortcut = x
    else:
        conv, bn = block.downsample
        shortcut = _bn_train(F.conv2d(x, conv.weight, stride=stride), bn)
    assert (block.downsample is None) == (stride == 1 and c_in == c)
    assert torch.allclose(block(x), y + shortcut, atol=1e-5)
    assert block(x).shape == (4, c, 5 if stride == 2 else 9, 5 if stride == 2 else 9)


def test_mobilefacenet_bottleneck_is_expand_depthwise_project_plus_input():
    torch.manual_seed(0)
    block = depthwise(6, 6, 12, residual=True)
    expand, dw, project = block.layers
    x = torch.randn(4, 6, 7, 7)
    y = F.prelu(_bn_train(F.conv2d(x, expand.layers[0].weight), expand.layers[1]), expand.layers[2].weight)
    y = F.conv2d(y, dw.layers[0].weight, padding=1, groups=12)
    y = F.prelu(_bn_train(y, dw.layers[1]), dw.layers[2].weight)
    y = _bn_train(F.conv2d(y, project.layers[0].weight), project.layers[1])
    assert dw.layers[0].weight.shape == (12, 1, 3, 3)   # depthwise
    assert torch.allclose(block(x), x + y, atol=1e-5)


@pytest.mark.parametrize("name", ["r18", "r50"])
def test_gradient_checkpointing_gives_the_same_gradients_and_batchnorm_statistics(name):
    torch.manual_seed(0)
    plain = build_backbone(name, (3, 16, 16), 16)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    calls = []
    ckpt.layer3[0].register_forward_hook(lambda *_: calls.append(1))
    x, target = torch.randn(4, 3, 16, 16), torch.randn(4, 16)
    for model in (plain, ckpt):
        for _ in range(2):
            F.mse_loss(model(x), target).backward()
    assert len(calls) == 4   # forward + recomputation in each backward: the stage really was recomputed
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n
    for (n, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), n   # the statistics moved once per forward, not again when recomputed
    with torch.no_grad():   # evaluation and no-grad forwards do not checkpoint
        ckpt.eval()
        assert torch.allclose(ckpt(x), plain.eval()(x), atol=1e-6)
    assert len(calls) == 5


def test_backbone_options_and_shapes_are_checked():
    assert isinstance(build_backbone("r34", (3, 16, 16), 8, gradient_checkpointing=True), IResNet)
    assert isinstance(build_backbone("mbf", (3, 16, 16), 8), MobileFaceNet)
    with pytest.raises(ValueError, match=r"--backbone r50 needs images \[C, H, W\], got input shape \(64,\)"):
        build_backbone("r50", (64,), 8)
    with pytest.raises(ValueError, match="--backbone mbf takes no options, got gradient_checkpointing"):
        build_backbone("mbf", (3, 16, 16), 8, gradient_checkpointing=True)


def test_ffc_train_takes_gradient_checkpointing_for_the_iresnets_only():
    from ffc_parallel.cli.recipe import check_options
    from ffc_parallel.cli.train import parse_options

    opts = parse_options(["--backbone", "r100", "--gradient-checkpointing", "--mixup-alpha", "0.2"])  # input mixup
    check_options(opts)
    assert opts.gradient_checkpointing and not parse_options(["--backbone", "r100"]).gradient_checkpointing
    with pytest.raises(ValueError, match="--gradient-checkpointing recomputes the stages of the IResNets "
                                         r"\(r18, r34, r50, r100, r200\), not of --backbone mbf"):
        check_options(parse_options(["--backbone", "mbf", "--gradient-checkpointing"]))
    with pytest.raises(ValueError, match="--gradient-checkpointing with manifold mixup"):
        check_options(parse_options(["--backbone", "r18", "--gradient-checkpointing", "--mixup-alpha", "0.2",
                                     "--mixup-layers", "input,layer2"]))
