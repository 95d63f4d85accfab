"""Triton python-backend model: encoded JPEG/PNG bytes -> uint8 (crop, crop, 3) pixels.

uint8 between the ensemble's steps is 4x fewer bytes than float32, and every image of the
dynamic batch is decoded at once: on a thread pool with Pillow, or by nvJPEG on the GPU when the
config says decode=nvjpeg and CUDA is there (reference section 2, #5082).
"""

import json

import triton_python_backend_utils as pb_utils

try:
    from clfpipe.preprocess import Preprocessor  # embedded target: the project's environment
except ImportError:
    from clfpipe_preprocess import Preprocessor  # container target: the copy shipped beside this file


def _device_preprocessor(spec):
    """nvJPEG when asked for and possible, else None (Pillow)."""
    try:
        import torch

        from clfpipe.gpu_decode import DevicePreprocessor
    except ImportError:
        return None
    return DevicePreprocessor(spec, "cuda") if torch.cuda.is_available() else None


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.preprocessor = Preprocessor.from_parameters(params)
        if params.get("decode", {}).get("string_value") == "nvjpeg":
            device = _device_preprocessor(self.preprocessor.spec)
            if device is None:
                pb_utils.Logger.log_warn("decode=nvjpeg: no CUDA device or torch here, decoding with Pillow")
            else:
                self.preprocessor = device

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
