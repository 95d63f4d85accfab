"""Engine runtimes: one module per engine, each importing the contract and that engine's library
only, so a Triton model that runs an ONNX graph never loads torch. Export gates and verifies
through these; the served Triton models run through them."""
