"""The data-cleaning report (fastai lesson 1): per class the most correct, most incorrect and most
uncertain validation images (each named, so a user can find and fix the file), the most confused
pairs of classes (fastai's ``most_confused``), the confusion matrix and per-class accuracy, and the
loss curves; RUN_DIR/report/index.html links them."""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from clfpipe.contract.preprocess import load_image

log = logging.getLogger(__name__)

KINDS = ("most_correct", "most_incorrect", "most_uncertain")
PLAIN = "plain predictions, no TTA"  # what the report's figures count, unless told otherwise


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


PICKERS = {"most_correct": most_correct, "most_incorrect": most_incorrect, "most_uncertain": most_uncertain}


def most_confused(matrix: np.ndarray, classes: Sequence[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) for every off-diagonal cell with at least min_count images, most first."""
    pairs = [(classes[i], classes[j], int(matrix[i, j])) for i in range(len(classes)) for j in range(len(classes))
             if i != j and matrix[i, j] >= min_count]
    return sorted(pairs, key=lambda pair: -pair[2])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_TILE, _GAP, _CAPTION, _TITLE = 200, 8, 32, 34  # grid geometry, pixels


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for."""
    from matplotlib import ft2font

    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot read is one we do not use
        return frozenset()


@functools.lru_cache(maxsize=None)
def _dejavu() -> str:
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))


@functools.lru_cache(maxsize=None)
def _installed_fonts() -> tuple[str, ...]:
    """Font files to draw what DejaVu Sans lacks: the system's (read now: matplotlib's cached list
    misses a font installed after it was made), then matplotlib's own; never its Last Resort font,
    whose 'glyph' for every code point is a box."""
    from matplotlib import font_manager

    files = [*sorted(font_manager.findSystemFonts()), *(e.fname for e in font_manager.fontManager.ttflist)]
    return tuple(f for f in dict.fromkeys(files) if not Path(f).name.startswith("LastResort") and Path(f).suffix != ".afm")


@functools.lru_cache(maxsize=None)
def _family(path: str) -> str:
    """The family name matplotlib knows the font file by, adding it to its list where it was missing."""
    from matplotlib import font_manager

    font_manager.fontManager.addfont(path)
    return font_manager.FontProperties(fname=path).get_name()


def _code_points(text: str) -> set[int]:
    return {ord(c) for c in text if not c.isspace()}


@functools.lru_cache(maxsize=None)
def _coverage(text: str) -> tuple[tuple[str, ...], frozenset[int]]:
    """For the characters of text DejaVu Sans lacks (a class folder named in Chinese or Japanese):
    the installed font files that have some of them, each adding some, and what none has. The other
    fonts are read only when DejaVu lacks something."""
    missing = _code_points(text) - _charmap(_dejavu())
    adding = []
    for path in _installed_fonts() if missing else ():
        if have := missing & _charmap(path):
            adding.append(path)
            missing -= have
    return tuple(adding), frozenset(missing)


def _fallbacks(text: str) -> list[str]:
    """Families matplotlib falls back to, after DejaVu Sans, to draw text."""
    return [_family(path) for path in _coverage(text)[0]]


def undrawable(text: str) -> str:
    """The characters of text that no font here has (each drawn as a box), in order, once each."""
    missing = _coverage(text)[1]
    return "".join(dict.fromkeys(c for c in text if ord(c) in missing))


def warn_undrawable(names: str, what: str) -> None:
    """One warning for the characters of class names that no font here has (the PNGs draw boxes)."""
    if missing := undrawable(names):
        log.warning("%s: no font here has %r (in class names): the PNGs draw them as boxes (install one that has "
                    "them, e.g. Debian's fonts-noto-cjk)", what, missing[:20])


def _font_file(text: str) -> str:
    """DejaVu Sans, the font matplotlib ships and draws the report's plots with, where it has every
    character of text; else an installed font that has them all. Pillow's default (Aileron) has no
    glyph for 'ü' or 'é', and DejaVu none for '猫': such names were drawn as boxes."""
    chars = _code_points(text)
    if chars <= _charmap(_dejavu()):
        return _dejavu()
    return next((path for path in _installed_fonts() if chars <= _charmap(path)), _dejavu())


@functools.lru_cache(maxsize=None)
def _font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path or _dejavu(), size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """text, shortened in the middle with an ellipsis until it fits width pixels (long file names)."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 2 and draw.textlength(text[: keep // 2] + "..." + text[len(text) - keep // 2 :], font=font) > width:
        keep -= 2
    return text[: keep // 2] + "..." + text[len(text) - keep // 2 :]


def _tile(img: Image.Image) -> Image.Image:
    """img scaled to fit a tile: enlarged with nearest pixels (an 8x8 digit stays a pixel grid), shrunk with Lanczos."""
    scale = _TILE / max(img.size)
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return ImageOps.contain(img, (_TILE, _TILE), method=method)


def image_grid(files: Sequence[Path], titles: Sequence[str], path: Path, title: str) -> None:
    """One row of images, each under its caption, under the grid's title. Drawn with Pillow: a
    matplotlib figure per grid took 0.26 s (8 s of a 10-class report, more than the run's
    evaluation)."""
    face = _font_file(title + "".join(titles))
    font, title_font = _font(11, face), _font(15, face)
    # rounded up: rounded down, the title no longer fitted and lost its middle to an ellipsis
    width = max(max(1, len(files)) * (_TILE + _GAP) + _GAP, math.ceil(title_font.getlength(title)) + 2 * _GAP)
    canvas = Image.new("RGB", (width, _TITLE + _CAPTION + _TILE + _GAP), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width // 2, _TITLE // 2), _fit_text(draw, title, title_font, width - 2 * _GAP), fill="black",
              font=title_font, anchor="mm")
    for i, (f, caption) in enumerate(zip(files, titles)):
        left = _GAP + i * (_TILE + _GAP)
        lines = "\n".join(_fit_text(draw, line, font, _TILE) for line in caption.split("\n"))
        draw.multiline_text((left + _TILE // 2, _TITLE + _CAPTION // 2), lines, fill="black", font=font, anchor="mm",
                            align="center")
        tile = _tile(load_image(f))
        canvas.paste(tile, (left + (_TILE - tile.width) // 2, _TITLE + _CAPTION + (_TILE - tile.height) // 2))
    if not files:
        draw.text((width // 2, _TITLE + _CAPTION + _TILE // 2), "none", fill="black", font=font, anchor="mm")
    canvas.save(path)


@dataclass(frozen=True)
class MatrixLayout:
    """How a confusion matrix of n classes is drawn: the figure stays at most ~22 inches (2,250 px)
    whatever n is; counts and names are written while their cells can hold them."""

    figure_in: float
    counts_pt: float | None  # None: cells too small to hold a count
    names_pt: float | None  # None: too many classes to name on the axes (the tables name them)


_CELL_IN, _MATRIX_IN, _MARGIN_IN = 1.1, 20.0, 2.5


def matrix_layout(n: int) -> MatrixLayout:
    """A cell is 1.1 in until n cells would pass 20 in; then the cells shrink. At 120 classes the
    figure was 134 in (13,450 px square, 6.6 GB to draw); from ~600 matplotlib refused it."""
    cell = min(_CELL_IN, _MATRIX_IN / max(n, 1))
    counts = min(11.0, cell * 72 * 0.35)
    names = min(10.0, cell * 72 * 0.7)
    return MatrixLayout(cell * n + _MARGIN_IN, counts if counts >= 5 else None, names if names >= 4 else None)


def confusion_png(matrix: np.ndarray, classes: Sequence[str], path: Path, predictions: str) -> None:
    """Counts on every cell, in white on the dark cells and black on the light ones."""
    plt = _plt()
    layout = matrix_layout(len(classes))
    families = ["DejaVu Sans", *_fallbacks("".join(classes))]
    # matplotlib draws each glyph from the first family that has it
    with plt.rc_context({"font.family": families}), _quiet_font_weights(), warnings.catch_warnings():
        # a glyph no font has: write_report says so once, not matplotlib once per character and use
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        _draw_matrix(plt, matrix, classes, layout, path, predictions)


class _NoWeightWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to find font weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_font_weights():
    """Without matplotlib's 'Failed to find font weight normal' warning: a fallback font of one weight
    (WenQuanYi Zen Hei is 'medium') draws what it has all the same."""
    logger = logging.getLogger("matplotlib.font_manager")
    quiet = _NoWeightWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _draw_matrix(plt, matrix: np.ndarray, classes: Sequence[str], layout: MatrixLayout, path: Path, predictions: str) -> None:
    fig, ax = plt.subplots(figsize=(layout.figure_in, layout.figure_in))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    if layout.counts_pt is not None:
        for (i, j), value in np.ndenumerate(matrix):
            dark = value > matrix.max() / 2
            ax.text(j, i, str(value), ha="center", va="center", fontsize=layout.counts_pt, color="white" if dark else "black")
    if layout.names_pt is not None:
        labels = [_short(name) for name in classes]  # the report's tables carry the whole names
        upright = len(classes) > 30  # slanted names of many narrow columns run into each other
        ax.set_xticks(range(len(classes)), labels, rotation=90 if upright else 45, ha="center" if upright else "right",
                      fontsize=layout.names_pt)
        ax.set_yticks(range(len(classes)), labels, fontsize=layout.names_pt)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted" if layout.names_pt is not None else "predicted (classes in the order of the table above)")
    ax.set_ylabel("actual")
    ax.set_title(f"confusion matrix ({predictions})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # the title stays whole above a narrow matrix
    plt.close(fig)


def _short(name: str, most: int = 24) -> str:
    """A class name of at most `most` characters, its middle given up to an ellipsis: a 40-character
    folder name squeezed the matrix to a third of the figure and pushed its title out of it."""
    if len(name) <= most:
        return name
    keep = most - 1
    return name[: (keep + 1) // 2] + "\u2026" + name[len(name) - keep // 2 :]


@dataclass(frozen=True)
class LossPoint:
    stage: str
    epoch: int
    train_loss: float
    valid_loss: float
    kept: bool = False  # the epoch whose weights a stage kept when it stopped at over-fitting
    metric: float = math.nan  # the validation metric (accuracy, or F2)


# The top of the loss plot is a band for the stage names: the losses are drawn below it.
_LABEL_BAND = 0.38


def _below_band(ax, values: Sequence[float]) -> None:
    """The y range that draws `values` below the band of stage names (a diverged epoch's nan aside)."""
    finite = np.array([v for v in values if math.isfinite(v)] or [0.0, 1.0])
    lo, hi = float(finite.min()), float(finite.max())
    span = (hi - lo) or max(abs(hi), 1.0) * 0.1
    ax.set_ylim(lo - 0.05 * span, lo + span / (1 - _LABEL_BAND))


def loss_figure(points: Sequence[LossPoint], metric: str = "accuracy"):
    """Train and valid loss per epoch across every stage, stage boundaries marked (fastai's plot_loss),
    and the validation `metric` on an axis of its own at the right: a stage that trains until
    over-fitting watches both. Each stage's name is written at its start, in a band above the
    curves, the legend below the axes: neither is drawn over the other or over a loss, however
    short the run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.4), layout="constrained")
    x = np.arange(1, len(points) + 1)
    train, valid = [p.train_loss for p in points], [p.valid_loss for p in points]
    ax.plot(x, train, marker="o", label="train loss")
    ax.plot(x, valid, marker="s", label="valid loss")
    kept = [i for i, p in enumerate(points) if p.kept]
    if kept:  # the epochs after it ran, and their weights were dropped
        ax.plot(x[kept], [valid[i] for i in kept], linestyle="none", marker="*", markersize=16, color="tab:red",
                label="weights kept (over-fitting after)")
    ax.set_xlim(0.5, len(points) + 0.5)  # stage 0 starts at 0.5 as the others start at a boundary
    _below_band(ax, train + valid)
    values = [p.metric for p in points]
    if any(math.isfinite(v) for v in values):
        right = ax.twinx()
        right.plot(x, values, marker="^", linestyle=":", color="tab:green", label=f"valid {metric} (right)")
        right.set_ylabel(f"valid {metric}")
        _below_band(right, values)
        bottom, top = right.get_ylim()
        right.set_yticks([t for t in right.get_yticks() if bottom <= t <= min(top, 1.0)])  # the band's room: no 1.2 accuracy
    starts = [i for i, p in enumerate(points) if i == 0 or p.stage != points[i - 1].stage]
    for index, start in enumerate(starts):
        if start:
            ax.axvline(start + 0.5, color="grey", linestyle="--", linewidth=0.8)
        label = ax.text(start + 0.55, 0.98, f"{index}: {points[start].stage}", fontsize=8, va="top", rotation=90,
                        transform=ax.get_xaxis_transform(), clip_on=True)
        label.set_in_layout(False)  # a long stage name must not squeeze the plot
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("loss")
    ax.set_xticks(x)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def loss_png(points: Sequence[LossPoint], path: Path, metric: str = "accuracy") -> None:
    fig = loss_figure(points, metric)
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


def _class_section(name: str, c: int, picks: dict[str, np.ndarray], files: Sequence[Path], probs: np.ndarray,
                   classes: Sequence[str], out_dir: Path) -> str:
    """One class: a grid per kind, and under it each image's file, prediction and p(class)."""
    parts = [f"<h3>{html.escape(name)}</h3>"]
    for kind in KINDS:
        png = f"{name}_{kind}.png"
        idx = picks[kind]
        rows = "".join(f"<tr><td>{html.escape(_rel(files[i], out_dir))}</td><td>{html.escape(classes[int(probs[i].argmax())])}</td>"
                       f"<td>{probs[i, c]:.3f}</td></tr>" for i in idx)
        # the class name quoted in the URL: "C#" or "50%" broke the link, and a quote in it ended the attribute
        grid = f"<img src=\"{html.escape(quote(png))}\" alt=\"{html.escape(name)} {kind}\"><br>"
        parts.append(f"<h4>{kind.replace('_', ' ')}</h4>"  # no picks: "none", not a blank grid above it
                     + (grid + f"<table><tr><th>file</th><th>predicted</th><th>p({html.escape(name)})</th></tr>{rows}</table>"
                        if len(idx) else "<p>none</p>"))
    return "".join(parts)


STYLE = ("<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:.4em 0}"
         "td,th{border:1px solid #bbb;padding:2px 8px;font-size:13px;text-align:left}img{max-width:100%}</style>")


CONFUSED_ROWS = 50  # of a many-class matrix's thousands of confused pairs, the most frequent


def write_report(out_dir: Path, *, files: Sequence[Path], labels: np.ndarray, probs: np.ndarray,
                 classes: Sequence[str], k: int = 8, predictions: str = PLAIN,
                 losses: Sequence[LossPoint] = (), next_step: str = "") -> Path:
    """Write the PNGs and index.html into out_dir; returns the index path. ``next_step``: the
    command that ranks the training images too (``clfpipe data clean``), named under the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    warn_undrawable("".join(classes), "report")
    predicted = probs.argmax(1)
    matrix = confusion_matrix(labels, predicted, len(classes))
    confusion_png(matrix, classes, out_dir / "confusion_matrix.png", predictions)
    rows, sections = [], []
    for c, name in enumerate(classes):
        total = int(matrix[c].sum())
        acc = matrix[c, c] / total if total else float("nan")
        picks = {kind: PICKERS[kind](probs, labels, c, k) for kind in KINDS}
        for kind, idx in picks.items():
            captions = [f"{Path(files[i]).name}\n{classes[predicted[i]]} {probs[i, c]:.2f}" for i in idx]
            image_grid([files[i] for i in idx], captions, out_dir / f"{name}_{kind}.png",
                       f"{name}: {kind.replace('_', ' ')} (file, predicted, p({name}))")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{total}</td><td>{acc:.4f}</td></tr>")
        sections.append(_class_section(name, c, picks, files, probs, classes, out_dir))
    confused = most_confused(matrix, classes)
    confused_rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{n}</td></tr>"
                            for a, b, n in confused[:CONFUSED_ROWS])
    if len(confused) > CONFUSED_ROWS:
        rest = confused[CONFUSED_ROWS:]
        confused_rows += (f"<tr><td colspan='3'>and {len(rest)} more pairs of {rest[0][2]} image"
                          f"{'s' if rest[0][2] > 1 else ''} or fewer</td></tr>")
    loss_html = ""
    if losses:
        loss_png(losses, out_dir / "loss.png")
        loss_html = '<h2>Loss and accuracy per epoch</h2><img src="loss.png" alt="train and valid loss, and valid accuracy, per epoch">'
    index = out_dir / "index.html"
    index.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>clfpipe data-cleaning report</title>" + STYLE + "</head><body>"
        "<h1>Data-cleaning report (validation set)</h1>"
        f"<p>{predictions}: accuracy {float((predicted == labels).mean()):.4f} on {len(labels)} images. "
        "Image paths are relative to this report.</p>"
        + (f"<p>Every image of both splits, training too, ranked by its loss, to fix or remove the wrong ones: "
           f"<code>{html.escape(next_step)}</code></p>" if next_step else "")
        + "<table><tr><th>class</th><th>images</th><th>accuracy</th></tr>" + "".join(rows) + "</table>"
        "<h2>Most confused (actual &rarr; predicted)</h2>"
        + ("<table><tr><th>actual</th><th>predicted</th><th>images</th></tr>" + confused_rows + "</table>" if confused
           else "<p>no confusions</p>")
        + '<h2>Confusion matrix</h2><a href="confusion_matrix.png"><img src="confusion_matrix.png" alt="confusion matrix"></a>'
        + loss_html + "<h2>Per class</h2>" + "".join(sections) + "</body></html>\n"
    )
    return index
