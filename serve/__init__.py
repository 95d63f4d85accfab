"""Serving stage: Triton model repository, the embedded server, and clients."""
