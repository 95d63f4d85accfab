"""Tensor names: of every exported graph, and of the served Triton models.

Triton model code reads dtypes and shapes from its generated config; the names it looks up are
these, and the repository generator writes the configs with the same constants.
"""

# Exported graphs (ONNX, TensorRT plans, torch packages)
INPUT = "input"  # float32 NCHW normalised, or uint8 NHWC pixels with preprocessing folded in
LOGITS = "logits"  # the classifier's raw outputs
PROBS = "probs"  # probabilities, when the TTA average is folded into the graph

# The served models
IMAGE = "IMAGE"  # encoded image bytes (JPEG, PNG, BMP, WebP), one per batch row (TYPE_STRING, dims [1])
IMAGE_PIXELS = "IMAGE_PIXELS"  # decoded uint8 HWC RGB images of any size
PIXELS = "PIXELS"  # the spec's resized, cropped uint8 pixels between preprocessing and backbone
SCORES = "PROBS"  # probabilities per class, FP32 (the ensembles' main output)
LABELS = "LABELS"  # top-k b"label:prob" strings per image
TOP_K_PARAMETER = "top_k"  # request parameter that sets k for LABELS
