"""Triton python-backend model: already-decoded uint8 HWC images -> the spec's resize and crop."""

import json

import triton_python_backend_utils as pb_utils

try:
    from clfpipe.contract.preprocess import PixelsPreprocessor
except ImportError:
    from clfpipe_preprocess import PixelsPreprocessor  # container target: the copy shipped beside this file


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name, self.output_name = config["input"][0]["name"], config["output"][0]["name"]
        self.preprocessor = PixelsPreprocessor.from_parameters(config["parameters"])

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                pixels = self.preprocessor(images)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)  # the input's fault: HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, pixels)]))
        return responses

    def finalize(self):
        self.preprocessor = None
