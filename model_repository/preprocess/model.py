"""Triton python-backend model: encoded JPEG/PNG bytes -> uint8 (crop, crop, 3) pixels.

uint8 between the ensemble's steps is 4x fewer bytes than float32 (reference section 2, #5082).
"""

import json

import triton_python_backend_utils as pb_utils

try:
    from clfpipe.preprocess import Preprocessor  # embedded target: the project's environment
except ImportError:
    from clfpipe_preprocess import Preprocessor  # container target: the copy shipped beside this file


class TritonPythonModel:
    def initialize(self, args):
        self.preprocessor = Preprocessor.from_parameters(json.loads(args["model_config"])["parameters"])

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                pixels = self.preprocessor(images)
            except ValueError as exc:
                # One bad request fails alone; the others in this dynamic batch still get answers.
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PIXELS", pixels)]))
        return responses
