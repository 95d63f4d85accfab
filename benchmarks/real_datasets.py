"""Real image datasets that ship inside Python packages (no network), written as clfpipe/fastai
folders: train/<class>/*.png and valid/<class>/*.png, a stratified 80/20 split with a fixed seed.

    python benchmarks/real_datasets.py digits OUT_DIR    # scikit-learn's UCI handwritten digits: 1,797 8x8, 10 classes
    python benchmarks/real_datasets.py faces OUT_DIR     # scikit-image's LFW subset: 200 25x25, face / not a face

Needs the peer extra (pip install -e '.[peer]'): scikit-learn and scikit-image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images / 16.0 * 255).astype(np.uint8)  # 0..16 ink levels
    return images, data.target, [str(d) for d in range(10)]


def faces() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from skimage.data import lfw_subset

    images = np.round(lfw_subset() * 255).astype(np.uint8)
    labels = np.array([0] * 100 + [1] * 100)  # the first 100 are faces, the rest are not
    return images, labels, ["face", "not_face"]


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {"digits": digits, "faces": faces}


def write_split(images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path, seed: int = 0,
                valid_fraction: float = 0.2) -> dict[str, int]:
    """Stratified split, every class in both halves; returns the image count per half."""
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "valid": 0}
    for label, name in enumerate(classes):
        index = rng.permutation(np.flatnonzero(labels == label))
        n_valid = max(1, int(round(len(index) * valid_fraction)))
        for part, chosen in (("valid", index[:n_valid]), ("train", index[n_valid:])):
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).save(folder / f"{name}_{i:05d}.png")
            counts[part] += len(chosen)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, labels, classes = DATASETS[args.name]()
    counts = write_split(images, labels, classes, args.out, args.seed)
    print(json.dumps({"dataset": args.name, "classes": len(classes), **counts, "size": list(images.shape[1:3]), "out": str(args.out)}))


if __name__ == "__main__":
    main()
