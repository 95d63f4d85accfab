"""Triton python-backend model: encoded JPEG/PNG bytes -> normalised float32 CHW tensors."""

import json

import triton_python_backend_utils as pb_utils

from serve.pipeline import Preprocessor


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preprocessor = Preprocessor.from_parameters(config["parameters"])

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                batch = self.preprocessor(images)
            except ValueError as exc:
                # One bad request fails alone; the others in this dynamic batch still get answers.
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("INPUT", batch)]))
        return responses
