"""Reference PyTorch inference on image files: what every exported and served form is checked against."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clfpipe.manifest import Manifest, RunDir
from clfpipe.models import Classifier, build_model, load_checkpoint
from clfpipe.preprocess import PreprocessSpec, load_pixels, normalize

CHECKPOINT = "checkpoint"


def load_run_model(run: RunDir, manifest: Manifest) -> Classifier:
    """The trained model in eval mode, its checkpoint checked against the manifest's sha256."""
    path = run.artifact_path(manifest, CHECKPOINT)
    recipe = manifest.recipe
    # The checkpoint holds every weight: never fetch pretrained ones to be overwritten.
    model = build_model(dataclasses.replace(recipe.model, weights="none"), len(manifest.classes))
    return load_checkpoint(model, path)


def files_to_batch(files: Sequence[Path], spec: PreprocessSpec) -> np.ndarray:
    return normalize(load_pixels(files, spec), spec)


@torch.inference_mode()
def torch_logits(model: Classifier, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(batch[i : i + batch_size])).float().numpy() for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs)


def probabilities(logits: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Softmax over classes, or an independent sigmoid per tag (multi-label)."""
    if multi_label:
        return 1.0 / (1.0 + np.exp(-logits))
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
