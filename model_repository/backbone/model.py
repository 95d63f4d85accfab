"""Triton python-backend model: an exported ONNX variant on ONNX Runtime, one run per dynamic batch."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from serve.pipeline import OnnxProbabilities


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model = OnnxProbabilities.from_parameters(config["parameters"], args["model_repository"], args["model_version"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        probs = self.model(np.concatenate(inputs))
        bounds = np.cumsum([len(x) for x in inputs])[:-1]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PROBS", p)]) for p in np.split(probs, bounds)]
