"""Triton python-backend model (container target): PROBS -> LABELS, 'label:prob' strings of the top-k
classes, or of a multi-label model's tags above its threshold."""

import json

import triton_python_backend_utils as pb_utils

try:
    from clfpipe.contract.probabilities import label_parameters, requested_top_k, served_labels
except ImportError:
    from clfpipe_probabilities import label_parameters, requested_top_k, served_labels  # the copy shipped beside this file


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.input_name, self.output_name = config["input"][0]["name"], config["output"][0]["name"]
        self.classes = json.loads(params["classes"]["string_value"])
        self.top_k, self.threshold = label_parameters(params, self.classes)

    def execute(self, requests):
        responses = []
        for request in requests:
            probs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                k = requested_top_k(request.parameters(), self.top_k)
                labels = served_labels(probs, self.classes, k, self.threshold)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)  # the input's fault: HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, labels)]))
        return responses

    def finalize(self):
        self.classes = None
