"""Final evaluation: the plain metric, and the metric with each TTA policy.

Single-label: accuracy. Multi-label: F2 at the threshold searched on the plain predictions
(fastai lesson 2), the same threshold then applied to the TTA predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clfpipe.dataset import Split
from clfpipe.models import Classifier
from clfpipe.preprocess import PreprocessSpec
from clfpipe.tta import DETERMINISTIC_VIEWS, average_probs
from train.data import ImageDataset, make_loader
from train.metrics import accuracy, best_threshold, f2_score


@dataclass(frozen=True)
class Evaluation:
    probs: np.ndarray  # plain pass, (N, classes)
    scores: dict[str, float]  # "plain" and "tta_<policy>"
    threshold: float | None = None  # multi-label only


def _activate(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)


@torch.inference_mode()
def predict_probs(model: Classifier, split: Split, spec: PreprocessSpec, batch_size: int, device: torch.device,
                  augment: str = "none") -> np.ndarray:
    model.eval()
    loader = make_loader(ImageDataset(split, spec, augment), batch_size, False, 0, 0)
    return np.concatenate([_activate(model(x.to(device)), split.multi_label).float().cpu().numpy() for x, _ in loader])


@torch.inference_mode()
def deterministic_tta(model: Classifier, split: Split, spec: PreprocessSpec, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    loader = make_loader(ImageDataset(split, spec), batch_size, False, 0, 0)
    return np.concatenate([average_probs(model, x.to(device), DETERMINISTIC_VIEWS, split.multi_label).float().cpu().numpy()
                           for x, _ in loader])


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
    threshold = None
    if split.multi_label:
        threshold, _ = best_threshold(plain, labels)
        score = lambda probs: f2_score(probs, labels, threshold)  # noqa: E731
    else:
        score = lambda probs: accuracy(probs, labels)  # noqa: E731
    result = {"plain": score(plain)}
    if "fastai" in policies:
        result["tta_fastai"] = score(fastai_tta(model, split, spec, batch_size, device, augment, n_aug, seed, plain))
    if "deterministic" in policies:
        result["tta_deterministic"] = score(deterministic_tta(model, split, spec, batch_size, device))
    return Evaluation(plain, result, threshold)
