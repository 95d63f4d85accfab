"""Model building: a torchvision body cut before avgpool/fc plus fastai's head.

Layer groups follow fastai 0.7: stem..layer2 | layer3..layer4 | head, so differential
learning rates are one value per group.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from clfpipe.errors import ManifestError, RecipeError
from clfpipe.recipe import ModelConfig

def splittable_archs() -> list[str]:
    """torchvision classifiers whose body splits into fastai's groups: the ResNet family
    (stem, layer1..layer4, avgpool, fc): resnet18..152, resnext*, wide_resnet*."""
    return sorted(name for name in torchvision.models.list_models(module=torchvision.models)
                  if name.startswith(("resnet", "resnext", "wide_resnet")))


class AdaptiveConcatPool2d(nn.Module):
    """Max-pool and avg-pool concatenated (fastai): twice the body's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.max = nn.AdaptiveMaxPool2d(1)
        self.avg = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.max(x), self.avg(x)], dim=1)


class Classifier(nn.Module):
    """body -> head; forward returns logits (softmax is applied by consumers)."""

    def __init__(self, body: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def layer_groups(self) -> list[nn.Module]:
        """[stem..layer2, layer3..layer4, head]."""
        return [self.body[:6], self.body[6:], self.head]


def make_head(in_features: int, num_classes: int, hidden: int, dropout: tuple[float, float]) -> nn.Sequential:
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * in_features),
        nn.Dropout(dropout[0]),
        nn.Linear(2 * in_features, hidden),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout[1]),
        nn.Linear(hidden, num_classes),
    )


def _load_torchvision(config: ModelConfig) -> nn.Module:
    if config.arch not in splittable_archs():
        raise RecipeError(f"model.arch: expected one of {', '.join(splittable_archs())}, got {config.arch!r}")
    if config.weights == "none":
        return torchvision.models.get_model(config.arch, weights=None)
    if config.weights == "imagenet":
        # torchvision's weights API: downloads once into TORCH_HOME's cache.
        return torchvision.models.get_model(config.arch, weights="DEFAULT")
    path = Path(config.weights)
    if not path.is_file():
        raise RecipeError(f"model.weights: expected 'imagenet', 'none' or a state-dict file, got {config.weights!r} (no such file)")
    net = torchvision.models.get_model(config.arch, weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, _ = net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")]:
        raise RecipeError(f"model.weights: {path} is not a {config.arch} state dict (missing {missing[:3]}...)")
    return net


def build_model(config: ModelConfig, num_classes: int) -> Classifier:
    net = _load_torchvision(config)
    body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    head = make_head(net.fc.in_features, num_classes, config.hidden, config.dropout)
    return Classifier(body, head)


def set_trainable(model: Classifier, trainable: str) -> None:
    """'head': body frozen; 'all': everything trains."""
    for p in model.body.parameters():
        p.requires_grad_(trainable == "all")
    for p in model.head.parameters():
        p.requires_grad_(True)


def train_mode(model: Classifier) -> None:
    """model.train(), but frozen groups keep BatchNorm in eval mode (running stats fixed)."""
    model.train()
    for module in model.body.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters())
            if frozen:
                module.eval()


def load_checkpoint(model: Classifier, path: Path) -> Classifier:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError) as exc:
        raise ManifestError(f"{path}: checkpoint does not load into the recipe's model ({str(exc).splitlines()[0]})") from exc
    return model.eval()
