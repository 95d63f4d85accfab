"""Triton python-backend model: an exported ONNX variant on ONNX Runtime, one run per dynamic batch.

Outputs PROBS and LABELS (top-k 'label:prob', k from the request parameter top_k or the config).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from clfpipe.postprocess import requested_top_k, top_k_labels
from serve.pipeline import OnnxProbabilities


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.model = OnnxProbabilities.from_parameters(params, args["model_repository"], args["model_version"])
        self.classes = json.loads(params["classes"]["string_value"])
        self.top_k = int(params["top_k"]["string_value"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        probs = self.model(np.concatenate(inputs))  # every request of the dynamic batch in one run
        bounds = np.cumsum([len(x) for x in inputs])[:-1]
        responses = []
        for request, p in zip(requests, np.split(probs, bounds)):
            try:
                k = requested_top_k(request.parameters(), self.top_k)
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            labels = pb_utils.Tensor("LABELS", top_k_labels(p, self.classes, k))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PROBS", p), labels]))
        return responses
