"""Export stage: ONNX from the trained checkpoint, gated on agreement with PyTorch."""
