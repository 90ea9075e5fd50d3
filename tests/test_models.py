"""Backbone presets and lookup by name."""
import pytest
import torch

from ffc_parallel.models import MLP, SmallResNet, build_backbone


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("mlp", (1, 8, 8)), ("resnet", (1, 16, 16)),
                                        ("resnet", (3, 32, 32))])
def test_presets_map_inputs_to_embeddings_and_train(name, shape):
    torch.manual_seed(0)
    model = build_backbone(name, shape, embedding_dim=12)
    assert isinstance(model, MLP if name == "mlp" else SmallResNet)
    x = torch.randn(6, *shape)
    out = model(x)
    assert out.shape == (6, 12)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_names_and_shapes_give_clear_errors():
    with pytest.raises(ValueError, match="feature vectors"):
        build_backbone("resnet", (64,), 8)
    with pytest.raises(ValueError, match="presets are mlp, cnn, cnn-wide, resnet"):
        build_backbone("no_such_model_xyz", (3, 32, 32), 8)
    with pytest.raises(ValueError, match="unknown backbone library"):
        build_backbone("keras:resnet", (3, 32, 32), 8)


def test_torchvision_model_by_name_when_installed():
    pytest.importorskip("torchvision")
    model = build_backbone("torchvision:resnet18", (1, 32, 32), 16)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 16)
