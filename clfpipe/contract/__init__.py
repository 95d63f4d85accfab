"""The contract: the vocabulary every stage shares, in plain Python, NumPy and Pillow (no torch).

- ``errors``: the one exception family the CLI turns into one-line messages;
- ``recipe``: the training recipe as frozen dataclasses, loaded from TOML;
- ``manifest``: the run directory and its manifest, the only channel between stages;
- ``dataset``: the image folder layouts (class folders, or a tags CSV);
- ``preprocess``: the one preprocessing spec and the Pillow pixels it defines;
- ``archs``: architecture table (body cut, layer groups), after fastai's ``model_meta``;
- ``augment`` and ``tta``: training augmentation policies and TTA views, as data;
- ``engines`` and ``tensors``: what an exported artifact is (engine, precision, folding, input
  form, file name, tensor names, activation) and the served ensembles' tensor names;
- ``probabilities``, ``metrics`` and ``gates``: activations, top-k labels, metrics, the agreement
  figures and the per-precision gates.

Nothing here imports torch, a runtime or another clfpipe layer: stages, Triton model code and the
front import it, never the other way round.
"""
