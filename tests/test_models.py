import torch
from torch import nn

from clfpipe.contract.recipe import ModelConfig
from clfpipe.nn.models import build_model, set_trainable, train_mode


def test_three_layer_groups_and_head_shape():
    model = build_model(ModelConfig(), 5)
    groups = model.layer_groups()
    assert len(groups) == 3
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g.parameters()) == n_params
    assert model.head[2].num_features == 1024  # concat pool: 2 x 512 channels for resnet34
    model.eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_frozen_body_keeps_batchnorm_in_eval():
    model = build_model(ModelConfig(), 3)
    set_trainable(model, "head")
    train_mode(model)
    body_bn = [m for m in model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert body_bn and all(not m.training for m in body_bn)
    assert all(m.training for m in model.head.modules() if isinstance(m, nn.BatchNorm1d))
    assert not any(p.requires_grad for p in model.body.parameters())
    set_trainable(model, "all")
    train_mode(model)
    assert all(m.training for m in body_bn)


def test_any_resnet_family_classifier_splits():
    from clfpipe.contract.archs import arch_names
    from clfpipe.contract.errors import RecipeError

    assert {"resnet18", "resnet34", "resnext50_32x4d", "wide_resnet50_2"} <= set(arch_names())
    model = build_model(ModelConfig(arch="resnet18"), 4)
    assert model.head[2].num_features == 1024 and len(model.layer_groups()) == 3
    import pytest

    with pytest.raises(RecipeError, match="expected one of"):
        ModelConfig(arch="vit_b_16")
