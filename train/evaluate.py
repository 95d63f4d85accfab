"""Final evaluation: plain accuracy, and accuracy with each TTA policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clfpipe.dataset import Split
from clfpipe.models import Classifier
from clfpipe.preprocess import PreprocessSpec
from clfpipe.tta import DETERMINISTIC_VIEWS, average_probs
from train.data import ImageDataset, make_loader


@dataclass(frozen=True)
class Evaluation:
    probs: np.ndarray  # plain pass, (N, classes)
    accuracy: dict[str, float]  # "plain" and "tta_<policy>"


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


@torch.inference_mode()
def predict_probs(model: Classifier, split: Split, spec: PreprocessSpec, batch_size: int, device: torch.device,
                  augment: str = "none") -> np.ndarray:
    model.eval()
    loader = make_loader(ImageDataset(split, spec, augment), batch_size, False, 0, 0)
    return np.concatenate([torch.softmax(model(x.to(device)), -1).float().cpu().numpy() for x, _ in loader])


@torch.inference_mode()
def deterministic_tta(model: Classifier, split: Split, spec: PreprocessSpec, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    loader = make_loader(ImageDataset(split, spec), batch_size, False, 0, 0)
    return np.concatenate([average_probs(model, x.to(device), DETERMINISTIC_VIEWS).float().cpu().numpy() for x, _ in loader])


def fastai_tta(model: Classifier, split: Split, spec: PreprocessSpec, batch_size: int, device: torch.device,
               augment: str, n_aug: int, seed: int, plain: np.ndarray) -> np.ndarray:
    """fastai 0.7: the plain pass plus n_aug passes with the training augmentation, probabilities
    averaged. Seeded, so the same run reports the same figure twice."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        passes = [predict_probs(model, split, spec, batch_size, device, augment) for _ in range(n_aug)]
    finally:
        torch.set_rng_state(state)
    return np.mean([plain, *passes], axis=0)


def evaluate(model: Classifier, split: Split, spec: PreprocessSpec, batch_size: int, device: torch.device,
             policies: tuple[str, ...], augment: str, n_aug: int, seed: int) -> Evaluation:
    labels = np.asarray(split.labels)
    plain = predict_probs(model, split, spec, batch_size, device)
    result = {"plain": accuracy(plain, labels)}
    if "fastai" in policies:
        result["tta_fastai"] = accuracy(fastai_tta(model, split, spec, batch_size, device, augment, n_aug, seed, plain), labels)
    if "deterministic" in policies:
        result["tta_deterministic"] = accuracy(deterministic_tta(model, split, spec, batch_size, device), labels)
    return Evaluation(plain, result)
