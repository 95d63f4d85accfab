"""Training stage: runs a recipe's stages on a folder of images into a run directory."""
