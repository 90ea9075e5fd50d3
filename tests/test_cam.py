"""CAM-based balanced sampling on synthetic images with a known foreground (a bright square)."""
import math

import torch
import torch.nn.functional as F

from ffc_parallel.algorithms.cam import (CamBalancer, class_activation_maps, foreground_masks,
                                   paste_transformed_foreground, random_affines)

H = W = 16


def _image(top=4, left=3, side=5, seed=0):
    """1x16x16 dim noise background in [0, 0.1] with a bright square (value 1) of known position
    (the image mean, about 0.14, lies above every background pixel)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, H, W, generator=g, dtype=torch.float64) * 0.1
    img[:, top:top + side, left:left + side] = 1.0
    square = torch.zeros(H, W, dtype=torch.bool)
    square[top:top + side, left:left + side] = True
    return img, square


def _features(images):
    """A fixed conv 'backbone' without downsampling: 4 channels, 2 of which respond to brightness."""
    weight = torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=images.dtype).view(4, 1, 1, 1)
    return F.conv2d(images, weight, bias=torch.tensor([0.3, 0.1, -0.2, 0.7], dtype=images.dtype))


def test_cam_mask_recovers_the_square():
    img, square = _image()
    center = torch.tensor([[1.0, 0.0, 1.0, 5.0]], dtype=torch.float64)   # CAM = 3*img + constant
    cams = class_activation_maps(_features(img[None]), center, (H, W))
    assert torch.equal(foreground_masks(cams)[0], square)
    # Through a projection P[D, K] (embedding = P . GAP(F)): the effective CAM weights are w^T P.
    projection = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    cams = class_activation_maps(_features(img[None]), torch.tensor([[1.0, 1.0]], dtype=torch.float64), (H, W),
                                 projection)
    assert torch.equal(foreground_masks(cams)[0], square)
    # A backbone that downsamples by 2: the upsampled CAM covers the square and blurs it by at most
    # one pixel (the bilinear upsampling's reach).
    img2, square2 = _image(top=4, left=6, side=6)
    pooled = F.avg_pool2d(_features(img2[None]), 2)
    mask = foreground_masks(class_activation_maps(pooled, torch.tensor([[0.0, 0.0, 1.0, 0.0]]).double(), (H, W)))[0]
    dilated = F.max_pool2d(square2[None, None].double(), 3, stride=1, padding=1)[0, 0].bool()
    assert (mask & square2).equal(square2) and not (mask & ~dilated).any()


def test_flip_and_shift_move_only_the_foreground_and_keep_the_background():
    img, square = _image()
    theta_flip = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    theta_shift = torch.tensor([[[1.0, 0.0, -2 * 4 / W], [0.0, 1.0, -2 * 2 / H]]], dtype=torch.float64)  # +4 px x, +2 px y
    for theta, expected_mask in ((theta_flip, square.flip(1)), (theta_shift, square.roll((2, 4), (0, 1)))):
        out, moved = paste_transformed_foreground(img[None], square[None], theta)
        assert torch.equal(moved[0], expected_mask)
        assert torch.allclose(out[0][:, expected_mask], torch.ones(1, int(expected_mask.sum()), dtype=torch.float64))
        assert torch.equal(out[0][:, ~expected_mask], img[:, ~expected_mask]), "background changed"


def test_rotate_and_scale_keep_the_background_and_the_foreground_area():
    img, square = _image(top=5, left=5, side=6)
    theta, kinds = random_affines(64, torch.Generator().manual_seed(0), ("rotate", "scale"), max_degrees=30,
                                  scale_range=(0.8, 1.25))
    assert set(kinds) == {"rotate", "scale"}
    out, moved = paste_transformed_foreground(img.expand(64, 1, H, W), square.expand(64, H, W), theta)
    for i in range(64):
        assert torch.equal(out[i][:, ~moved[i]], img[:, ~moved[i]]), "background changed"
        assert torch.allclose(out[i][:, moved[i]], torch.ones_like(out[i][:, moved[i]]), atol=1e-9)
        area = int(moved[i].sum())
        det = float(torch.linalg.det(theta[i, :, :2]))           # output area = input area / det
        assert abs(area - 36 / det) <= 0.45 * math.sqrt(36 / det) * 4, (kinds[i], area, 36 / det)


def test_balancer_plans_max_minus_count_per_class_and_augments_with_the_class_center():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 1 + [3] * 6)
    centers = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 4, dtype=torch.float64)
    balancer = CamBalancer(_features, lambda classes: centers[classes], seed=4)
    sources = balancer.plan(labels)
    assert torch.equal(torch.bincount(labels[sources], minlength=4), torch.tensor([0, 4, 5, 0]))
    images, squares = zip(*[_image(top=2 + i % 5, left=1 + i % 7, side=5, seed=i) for i in range(labels.numel())])
    images, squares = torch.stack(images), torch.stack(squares)
    new_images, new_labels = balancer.generate(images, labels, batch_size=4)
    assert new_images.shape == (9, 1, H, W) and torch.equal(torch.bincount(new_labels, minlength=4), torch.tensor([0, 4, 5, 0]))
    _, masks, kinds = balancer.augment(images[sources], labels[sources])
    assert torch.equal(masks, squares[sources]), "the CAM foreground must be the square of each source image"
    assert all(k in ("flip", "translate", "rotate", "scale") for k in kinds)


def test_small_resnet_cam_projection_maps_pooled_feature_maps_to_the_embedding():
    from ffc_parallel.models import SmallResNet
    torch.manual_seed(0)
    net = SmallResNet((1, 12, 12), 6).double()
    net.train()
    for _ in range(3):                                   # non-trivial BatchNorm running statistics
        net(torch.randn(8, 1, 12, 12, dtype=torch.float64))
    net.eval()
    x = torch.randn(5, 1, 12, 12, dtype=torch.float64)
    pooled = net.feature_maps(x).mean(dim=(2, 3))
    via_projection = pooled @ net.cam_projection().t()
    offset = net(x) - via_projection                     # the same constant for every image
    assert torch.allclose(offset, offset[:1].expand_as(offset), atol=1e-10)


def test_online_balancer_replaces_draws_of_class_c_with_probability_one_minus_n_c_over_max():
    import ffc_parallel as fp
    from ffc_parallel.algorithms.cam import OnlineCamBalancer
    from ffc_parallel.models import SmallResNet
    torch.manual_seed(0)
    net = SmallResNet((1, H, W), 8)
    head = fp.ShardedClassifier(8, 3)
    counts = [40, 10, 30]                                # p_generated = 0, 3/4, 1/4
    balancer = OnlineCamBalancer(counts, seed=1, transforms=("translate",))
    labels = torch.tensor([0, 1, 2] * 40)
    images = torch.stack([_image(seed=i)[0] for i in range(labels.numel())]).float()
    changed = torch.zeros(3)
    for step in range(20):
        out = balancer.augment(net, head, images, labels, step)
        assert out.shape == images.shape and net.training
        moved = (out != images).flatten(1).any(1)
        changed += torch.bincount(labels[moved], minlength=3).float()
        again = balancer.augment(net, head, images, labels, step)
        assert torch.equal(out, again)                    # draws depend on (seed, rank, step) only
    rate = changed / (20 * 40)
    assert rate[0] == 0                                  # the largest class is never generated
    assert abs(rate[1] - 0.75) < 0.06 and abs(rate[2] - 0.25) < 0.06, rate
