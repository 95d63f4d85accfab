"""The data-cleaning report (fastai lesson 1): most correct, most incorrect and most uncertain images
per class, the confusion matrix and per-class accuracy, linked from RUN_DIR/report/index.html."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np

from clfpipe.contract.preprocess import load_image


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """rows: true class, columns: predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def most_correct(probs: np.ndarray, labels: np.ndarray, cls: int, k: int) -> np.ndarray:
    """Correctly classified images of cls, highest probability of the true class first."""
    idx = np.where((labels == cls) & (probs.argmax(1) == cls))[0]
    return idx[np.argsort(-probs[idx, cls], kind="stable")][:k]


def most_incorrect(probs: np.ndarray, labels: np.ndarray, cls: int, k: int) -> np.ndarray:
    """Misclassified images of cls, lowest probability of the true class first."""
    idx = np.where((labels == cls) & (probs.argmax(1) != cls))[0]
    return idx[np.argsort(probs[idx, cls], kind="stable")][:k]


def most_uncertain(probs: np.ndarray, labels: np.ndarray, cls: int, k: int) -> np.ndarray:
    """Images of cls whose probability of cls is closest to 1/num_classes."""
    idx = np.where(labels == cls)[0]
    return idx[np.argsort(np.abs(probs[idx, cls] - 1.0 / probs.shape[1]), kind="stable")][:k]


def _grid(files: Sequence[Path], titles: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(files))
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6), squeeze=False)
    for ax, f, t in zip(axes[0], files, titles):
        ax.imshow(load_image(f))
        ax.set_title(t, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    if not files:
        axes[0][0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _confusion_png(matrix: np.ndarray, classes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, *, files: Sequence[Path], labels: np.ndarray, probs: np.ndarray,
                 classes: Sequence[str], k: int = 8) -> Path:
    """Write PNGs and index.html into out_dir; returns the index path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(1)
    matrix = confusion_matrix(labels, predicted, len(classes))
    _confusion_png(matrix, classes, out_dir / "confusion_matrix.png")
    rows = []
    for c, name in enumerate(classes):
        total = int(matrix[c].sum())
        acc = matrix[c, c] / total if total else float("nan")
        links = []
        for kind, pick in (("most_correct", most_correct), ("most_incorrect", most_incorrect), ("most_uncertain", most_uncertain)):
            idx = pick(probs, labels, c, k)
            png = f"{name}_{kind}.png"
            _grid([files[i] for i in idx], [f"{classes[predicted[i]]} {probs[i, c]:.2f}" for i in idx], out_dir / png,
                  f"{name}: {kind.replace('_', ' ')} (title: predicted, p({name}))")
            links.append(f'<a href="{png}">{kind.replace("_", " ")}</a>')
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{total}</td><td>{acc:.4f}</td><td>{' | '.join(links)}</td></tr>")
    index = out_dir / "index.html"
    index.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>clfpipe data-cleaning report</title></head><body>"
        "<h1>Data-cleaning report (validation set)</h1>"
        f"<p>accuracy {float((predicted == labels).mean()):.4f} on {len(labels)} images</p>"
        "<table border='1' cellpadding='4'><tr><th>class</th><th>images</th><th>accuracy</th><th>grids</th></tr>"
        + "".join(rows) + "</table>"
        '<h2>Confusion matrix</h2><img src="confusion_matrix.png" alt="confusion matrix">'
        "</body></html>\n"
    )
    return index
