"""Triton python-backend model: encoded JPEG/PNG bytes -> uint8 (crop, crop, 3) pixels.

uint8 between the ensemble's steps is 4x fewer bytes than float32, and every image of the
dynamic batch is decoded at once on a thread pool (reference section 2, #5082).
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
        images = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy() for r in requests]
        responses = []
        for result in self.preprocessor.batch(images):
            if isinstance(result, ValueError):
                # One bad request fails alone; the others in this dynamic batch still get answers.
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PIXELS", result)]))
        return responses
