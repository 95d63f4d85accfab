"""clfpipe: from a folder of images to a verified Triton server."""

__version__ = "0.1.0"
