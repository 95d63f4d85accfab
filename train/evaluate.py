"""Final evaluation: the plain metric, and the metric with each TTA policy.

Single-label: accuracy. Multi-label: F2 at the threshold searched on the plain predictions
(fastai lesson 2), the same threshold then applied to the TTA predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from clfpipe.contract.dataset import Split
from clfpipe.contract.metrics import best_threshold, score
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.probabilities import activate, activation_for
from clfpipe.contract.progress import progress
from clfpipe.contract.tta import DETERMINISTIC_VIEWS, View
from clfpipe.nn.models import Classifier
from clfpipe.nn.tta import average_probs, view_outputs
from clfpipe.train.data import ImageDataset, make_loader


@dataclass(frozen=True)
class Evaluation:
    probs: np.ndarray  # plain pass, (N, classes)
    scores: dict[str, float]  # "plain" and "tta_<policy>"
    threshold: float | None = None  # multi-label only
    tta_probs: dict[str, np.ndarray] | None = None  # per policy


def _batches(split: Split, spec: PreprocessSpec, batch_size: int, *, augment: str, what: str):
    loader = make_loader(ImageDataset(split, spec, augment), batch_size, shuffle=False, num_workers=0, seed=0)
    return progress(loader, what, total=len(loader), unit="batch")


@torch.inference_mode()
def predict_logits(model: Classifier, split: Split, *, spec: PreprocessSpec, batch_size: int, device: torch.device,
                   augment: str = "none") -> np.ndarray:
    model.eval()
    return np.concatenate([model(x.to(device)).float().cpu().numpy()
                           for x, _ in _batches(split, spec, batch_size, augment=augment, what=f"predict ({augment})")])


def predict_probs(model: Classifier, split: Split, *, spec: PreprocessSpec, batch_size: int, device: torch.device,
                  augment: str = "none") -> np.ndarray:
    logits = predict_logits(model, split, spec=spec, batch_size=batch_size, device=device, augment=augment)
    return activate(logits, activation_for(split.multi_label))


@torch.inference_mode()
def view_logits(model: Classifier, split: Split, *, spec: PreprocessSpec, batch_size: int, device: torch.device,
                views: Sequence[View] = DETERMINISTIC_VIEWS) -> np.ndarray:
    """(views, N, classes): the model's logits on each TTA view of every image (``deterministic_tta``
    averages their probabilities; ``data clean --tta`` ranks by the loss of that mean)."""
    model.eval()
    return np.concatenate([view_outputs(model, x.to(device), views).float().cpu().numpy()
                           for x, _ in _batches(split, spec, batch_size, augment="none", what="predict (TTA views)")], axis=1)


@torch.inference_mode()
def deterministic_tta(model: Classifier, split: Split, *, spec: PreprocessSpec, batch_size: int,
                      device: torch.device) -> np.ndarray:
    model.eval()
    activation = activation_for(split.multi_label)
    return np.concatenate([average_probs(model, x.to(device), activation).float().cpu().numpy()
                           for x, _ in _batches(split, spec, batch_size, augment="none", what="TTA (deterministic views)")])


def fastai_tta(model: Classifier, split: Split, *, spec: PreprocessSpec, batch_size: int, device: torch.device,
               augment: str, n_aug: int, seed: int, plain: np.ndarray) -> np.ndarray:
    """fastai 0.7: the plain pass plus n_aug passes with the training augmentation, probabilities
    averaged. Seeded, so the same run reports the same figure twice."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        passes = [predict_probs(model, split, spec=spec, batch_size=batch_size, device=device, augment=augment)
                  for _ in range(n_aug)]
    finally:
        torch.set_rng_state(state)
    return np.mean([plain, *passes], axis=0)


def evaluate(model: Classifier, split: Split, *, spec: PreprocessSpec, batch_size: int, device: torch.device,
             policies: tuple[str, ...], augment: str, n_aug: int, seed: int) -> Evaluation:
    labels = np.asarray(split.labels)
    plain = predict_probs(model, split, spec=spec, batch_size=batch_size, device=device)
    threshold = best_threshold(plain, labels)[0] if split.multi_label else None
    tta: dict[str, np.ndarray] = {}
    if "fastai" in policies:
        tta["fastai"] = fastai_tta(model, split, spec=spec, batch_size=batch_size, device=device, augment=augment,
                                   n_aug=n_aug, seed=seed, plain=plain)
    if "deterministic" in policies:
        tta["deterministic"] = deterministic_tta(model, split, spec=spec, batch_size=batch_size, device=device)
    scores = {"plain": score(plain, labels, threshold), **{f"tta_{k}": score(v, labels, threshold) for k, v in tta.items()}}
    return Evaluation(plain, scores, threshold, tta)
