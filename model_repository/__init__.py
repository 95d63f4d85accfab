"""Committed pieces of the Triton model repository: the python-backend model code.

Each ``<model>/model.py`` is a thin adapter from Triton's python backend API to functions in
``serve``; ``serve.repository`` copies them next to generated ``config.pbtxt`` files.
"""

from pathlib import Path

TEMPLATES = Path(__file__).parent
