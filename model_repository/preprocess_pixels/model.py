"""Triton python-backend model: already-decoded uint8 HWC images -> the spec's resize and crop."""

import json

import triton_python_backend_utils as pb_utils

try:
    from clfpipe.preprocess import PixelsPreprocessor
except ImportError:
    from clfpipe_preprocess import PixelsPreprocessor  # container target: the copy shipped beside this file


class TritonPythonModel:
    def initialize(self, args):
        self.preprocessor = PixelsPreprocessor.from_parameters(json.loads(args["model_config"])["parameters"])

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE_PIXELS").as_numpy()
            try:
                pixels = self.preprocessor(images)
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PIXELS", pixels)]))
        return responses
