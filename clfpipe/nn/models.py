"""The classifier: a torchvision body cut before avgpool/fc (``contract.archs``) plus fastai's head.

Layer groups follow fastai 0.7: stem..layer2 | layer3..layer4 | head, so differential learning
rates are one value per group.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from clfpipe.contract.archs import ARCHS, arch_names
from clfpipe.contract.errors import ManifestError, RecipeError
from clfpipe.contract.recipe import ModelConfig


class AdaptiveConcatPool2d(nn.Module):
    """Max-pool and avg-pool over H, W concatenated (fastai): twice the body's channels.

    Written as ``amax`` and ``mean`` rather than adaptive pooling modules: the same numbers, and
    ops every ONNX exporter from torch 2.6 on lowers (torch 2.11's has no ``adaptive_max_pool2d``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)], dim=1)


class Classifier(nn.Module):
    """body -> head; forward returns logits (consumers apply the activation)."""

    def __init__(self, body: nn.Sequential, head: nn.Sequential, split: int) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def layer_groups(self) -> list[nn.Module]:
        """[stem..layer2, layer3..layer4, head]."""
        return [self.body[: self.split], self.body[self.split :], self.head]


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


def _imagenet(arch: str) -> nn.Module:
    try:  # torchvision's weights API: downloads once into $TORCH_HOME (~/.cache/torch/hub/checkpoints)
        return torchvision.models.get_model(arch, weights="DEFAULT")
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError
        raise RecipeError(f"model.weights = 'imagenet': cannot fetch the {arch} weights ({str(exc).splitlines()[0]}); "
                          "offline, set model.weights to the path of a torchvision state-dict file") from exc


def _from_state_dict(arch: str, path: Path) -> nn.Module:
    if not path.is_file():
        raise RecipeError(f"model.weights: expected 'imagenet', 'none' or a state-dict file, got {str(path)!r} (no such file)")
    net = torchvision.models.get_model(arch, weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a state dict
        raise RecipeError(f"model.weights: {path} is not a torch state-dict file ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict):
        raise RecipeError(f"model.weights: expected a state dict in {path}, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, _ = net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")]:
        raise RecipeError(f"model.weights: {path} is not a {arch} state dict (missing {missing[:3]}...)")
    return net


def _torchvision(config: ModelConfig) -> nn.Module:
    if config.arch not in ARCHS:
        raise RecipeError(f"model.arch: expected one of {', '.join(arch_names())}, got {config.arch!r}")
    if config.weights == "none":
        return torchvision.models.get_model(config.arch, weights=None)
    if config.weights == "imagenet":
        return _imagenet(config.arch)
    return _from_state_dict(config.arch, Path(config.weights))


def build_model(config: ModelConfig, num_classes: int) -> Classifier:
    net = _torchvision(config)  # checks the arch first
    meta = ARCHS[config.arch]
    body = nn.Sequential(*list(net.children())[: meta.cut])
    head = make_head(meta.features, num_classes, config.hidden, config.dropout)
    return Classifier(body, head, meta.split)


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
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def load_checkpoint(model: Classifier, path: Path) -> Classifier:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError) as exc:
        raise ManifestError(f"{path}: checkpoint does not load into the recipe's model ({str(exc).splitlines()[0]})") from exc
    return model.eval()
