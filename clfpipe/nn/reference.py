"""Reference PyTorch inference: what every exported and served form is checked against."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clfpipe.contract.engines import CHUNK, Prepare, Variant, in_chunks
from clfpipe.contract.manifest import CHECKPOINT, Manifest, RunDir
from clfpipe.contract.preprocess import PreprocessSpec, load_pixels, normalize
from clfpipe.nn.folded import Folded
from clfpipe.nn.models import Classifier, build_model, load_checkpoint


def load_run_model(run: RunDir, manifest: Manifest) -> Classifier:
    """The trained model in eval mode, its checkpoint checked against the manifest's sha256."""
    path = run.artifact_path(manifest, CHECKPOINT)
    # The checkpoint holds every weight: never fetch pretrained ones to be overwritten.
    model = build_model(dataclasses.replace(manifest.recipe.model, weights="none"), len(manifest.classes))
    return load_checkpoint(model, path)


def files_to_batch(files: Sequence[Path], spec: PreprocessSpec) -> np.ndarray:
    return normalize(load_pixels(files, spec), spec)


@torch.inference_mode()
def torch_logits(model: torch.nn.Module, batch: np.ndarray, batch_size: int = CHUNK,
                 prepare: Prepare | None = None) -> np.ndarray:
    """The model's outputs for a batch, in chunks; `prepare` turns each chunk into the model's input
    (``in_chunks``)."""
    model.eval()
    return in_chunks(lambda x: model(torch.from_numpy(x)).float().numpy(), batch, batch_size, prepare)


def reference_outputs(model: Classifier, manifest: Manifest, variant: Variant, pixels: np.ndarray) -> np.ndarray:
    """PyTorch fp32 through the variant's folded graph, on the spec's uint8 pixels."""
    folded = Folded(model, manifest.preprocess, variant, manifest.recipe.multi_label)
    return torch_logits(folded, pixels, prepare=variant.input_form.preparer(manifest.preprocess))
