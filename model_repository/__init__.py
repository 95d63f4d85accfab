"""Committed pieces of the Triton model repository: the python-backend model code.

Each ``<model>/model.py`` is a thin adapter from Triton's python backend API to the contract
(tensor names, preprocessing, probabilities) and its engine's runtime; ``clfpipe.serve.repository``
copies them next to the generated ``config.pbtxt`` files.
"""

from pathlib import Path

TEMPLATES = Path(__file__).parent
