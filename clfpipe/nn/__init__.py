"""The torch half of the contract, shared by training and export: the classifier whose state dict
the checkpoint artifact holds, the spec, augmentation and TTA views as tensor operations, the
graph every variant is exported from, and the PyTorch reference every engine is gated against.
Imports the contract only (and torch, torchvision)."""
