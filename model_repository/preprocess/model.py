"""Triton python-backend model: encoded JPEG, PNG, BMP or WebP bytes -> uint8 (crop, crop, 3) pixels.

uint8 between the ensemble's steps is 4x fewer bytes than float32, and every image of the dynamic
batch is decoded at once: on a thread pool with Pillow, or by nvJPEG on the GPU when the config
says decode=nvjpeg and CUDA is there (python-backend decoding is the usual bottleneck of image
ensembles: triton-inference-server/server#5082).
"""

import json

import triton_python_backend_utils as pb_utils

try:
    from clfpipe.contract.preprocess import Preprocessor  # embedded target: the project's environment
except ImportError:
    from clfpipe_preprocess import Preprocessor  # container target: the copy shipped beside this file


def _device_preprocessor(spec):
    """nvJPEG when asked for and possible, else None (Pillow)."""
    try:
        import torch

        from clfpipe.runtime.nvjpeg import DevicePreprocessor
    except ImportError:
        return None
    return DevicePreprocessor(spec, "cuda") if torch.cuda.is_available() else None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.input_name, self.output_name = config["input"][0]["name"], config["output"][0]["name"]
        self.preprocessor = Preprocessor.from_parameters(params)
        if params.get("decode", {}).get("string_value") == "nvjpeg":
            device = _device_preprocessor(self.preprocessor.spec)
            if device is None:
                pb_utils.Logger.log_warn("decode=nvjpeg: no CUDA device or torch here, decoding with Pillow")
            else:
                self.preprocessor = device

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        responses = []
        for result in self.preprocessor.batch(images):
            if isinstance(result, ValueError):
                # One bad request fails alone; the others in this dynamic batch still get answers.
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)  # the input's fault: HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, result)]))
        return responses

    def finalize(self):
        close = getattr(self.preprocessor, "close", None)
        if close:
            close()
