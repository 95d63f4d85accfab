"""Triton python-backend model: an exported variant on its engine, one run per dynamic batch.

The engine comes from the config: ONNX Runtime (``onnx``), or torch for an AOTInductor package
(``aoti``) or an exported program (``torch``); only that engine's runtime is imported, so an ONNX
Runtime backbone never loads torch. Outputs PROBS and LABELS (top-k 'label:prob', k from the
request parameter top_k or the config; a multi-label model's tags above its threshold).

Its input is uint8 pixels from the preprocessing step, or, for the fused step (``backbone_image``:
a torch engine with decode=nvjpeg on CUDA), the encoded IMAGE bytes: decoded by nvJPEG, resized
and run by the torch engine on the GPU, with no host round trip of pixels.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from clfpipe.contract import tensors
from clfpipe.contract.preprocess import per_request
from clfpipe.contract.probabilities import label_parameters, requested_top_k, served_labels


def _engine(params, model_dir):
    engine = params["engine"]["string_value"]
    if engine == "onnx":
        from clfpipe.runtime.ort import OnnxProbabilities

        return OnnxProbabilities.from_parameters(params, model_dir)
    from clfpipe.runtime.torch_engine import TorchProbabilities

    return TorchProbabilities.from_parameters(params, model_dir)


def _decoder(params, device):
    """The fused step's decoder: nvJPEG on the engine's device (torchvision's CPU decoder without CUDA)."""
    from clfpipe.contract.preprocess import spec_from_parameters
    from clfpipe.runtime.nvjpeg import DevicePreprocessor

    return DevicePreprocessor(spec_from_parameters(params), device)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.input_name = config["input"][0]["name"]
        self.probs_dtype = pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, tensors.SCORES)["data_type"])
        self.model = _engine(params, Path(args["model_repository"]) / args["model_version"])
        self.decoder = _decoder(params, self.model.device) if self.input_name == tensors.IMAGE else None
        self.classes = json.loads(params["classes"]["string_value"])
        self.top_k, self.threshold = label_parameters(params, self.classes)

    def _probs(self, inputs):
        """Per request its probabilities or the ValueError that fails it alone; one engine run for
        the whole dynamic batch."""
        if self.decoder is None:
            counts = [len(x) for x in inputs]
            probs = self.model(np.concatenate(inputs))
        else:
            pixels, counts = self.decoder.decode(inputs)
            probs = self.model.on_device(pixels) if pixels is not None else None
        return per_request(probs.astype(self.probs_dtype) if probs is not None else None, counts)

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        responses = []
        for request, p in zip(requests, self._probs(inputs)):
            if isinstance(p, ValueError):
                error = pb_utils.TritonError(str(p), pb_utils.TritonError.INVALID_ARG)  # the input's fault: HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            try:
                k = requested_top_k(request.parameters(), self.top_k, tensors.TOP_K_PARAMETER)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)  # the input's fault: HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            labels = pb_utils.Tensor(tensors.LABELS, served_labels(p, self.classes, k, self.threshold))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(tensors.SCORES, p), labels]))
        return responses

    def finalize(self):
        self.model.close()
