"""The graph every variant is exported from: the classifier with the spec's normalisation (uint8
NHWC pixels in) and the TTA average folded in, as its variant says. PyTorch fp32 running this same
module is the reference each exported variant is gated against."""

from __future__ import annotations

import torch
from torch import nn

from clfpipe.contract.engines import Variant
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.probabilities import activation_for
from clfpipe.nn.models import Classifier
from clfpipe.nn.tta import average_probs


class Folded(nn.Module):
    """`dtype`: what the network computes in (the torch engines' fp16/bf16); the normalisation and
    the outputs stay float32."""

    def __init__(self, model: Classifier, spec: PreprocessSpec, variant: Variant, multi_label: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model, self.variant, self.dtype = model.eval().to(dtype), variant, dtype
        self.activation = activation_for(multi_label)  # what the folded TTA averages
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant.fold_preprocess:
            # (x/255 - mean)/std == (x - 255 mean) / (255 std): one fewer op
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        x = x.to(self.dtype)
        if self.variant.fold_tta:
            return average_probs(self.model, x, self.activation).float()
        return self.model(x).float()


def example_input(variant: Variant, size: int, batch: int = 2) -> torch.Tensor:
    """A zero batch in the variant's input form, for tracing."""
    dtype = getattr(torch, variant.input_form.dtype)
    shape = [batch if d == "batch" else d for d in variant.input_form.shape(size)]
    return torch.zeros(shape, dtype=dtype)
