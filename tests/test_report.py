import logging
import re

import numpy as np
import pytest
from PIL import Image

from clfpipe.train.report import (
    LossPoint,
    confusion_matrix,
    loss_figure,
    matrix_layout,
    most_confused,
    most_correct,
    most_incorrect,
    most_uncertain,
    write_report,
)

# 6 images, 3 classes; rows are probabilities, labels the truth.
PROBS = np.array([
    [0.9, 0.05, 0.05],  # 0: class 0, correct, confident
    [0.5, 0.3, 0.2],    # 1: class 0, correct, less so
    [0.2, 0.7, 0.1],    # 2: class 0, wrong (says 1)
    [0.34, 0.33, 0.33], # 3: class 0, correct, the most uncertain
    [0.1, 0.8, 0.1],    # 4: class 1, correct
    [0.6, 0.1, 0.3],    # 5: class 2, wrong (says 0)
])
LABELS = np.array([0, 0, 0, 0, 1, 2])


def test_hand_checked_rankings():
    assert list(most_correct(PROBS, LABELS, 0, 10)) == [0, 1, 3]
    assert list(most_incorrect(PROBS, LABELS, 0, 10)) == [2]
    assert list(most_uncertain(PROBS, LABELS, 0, 2)) == [3, 2]  # |0.34-1/3| < |0.2-1/3| < |0.5-1/3|
    assert list(most_incorrect(PROBS, LABELS, 2, 10)) == [5]
    matrix = confusion_matrix(LABELS, PROBS.argmax(1), 3)
    assert matrix.tolist() == [[3, 1, 0], [0, 1, 0], [1, 0, 0]]


def _images(tmp_path) -> list:
    """The six validation images PROBS and LABELS describe, as files."""
    files = []
    for i in range(6):
        f = tmp_path / "images" / f"img_{i}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(f)
        files.append(f)
    return files


def test_report_names_every_file_and_lists_confusions(tmp_path):
    files = _images(tmp_path)
    losses = [LossPoint("head", 1, 1.2, 1.1), LossPoint("head", 2, 1.0, 0.9), LossPoint("all", 1, 0.8, 0.7)]
    index = write_report(tmp_path / "report", files=files, labels=LABELS, probs=PROBS, classes=["a", "b", "c"], k=4,
                         losses=losses, next_step="clfpipe data clean --run runs/<a&b>")
    text = index.read_text()
    assert "ranked by its loss, to fix or remove the wrong ones: <code>clfpipe data clean --run runs/&lt;a&amp;b&gt;</code>" in text
    for f in files:  # each image appears under its grid by its path relative to the report
        assert f"../images/{f.name}" in text
    assert "plain predictions, no TTA: accuracy 0.6667 on 6 images" in text
    assert "<tr><td>a</td><td>b</td><td>1</td></tr>" in text and "<tr><td>c</td><td>a</td><td>1</td></tr>" in text
    assert most_confused(confusion_matrix(LABELS, PROBS.argmax(1), 3), ["a", "b", "c"]) == [("a", "b", 1), ("c", "a", 1)]
    for png in ("confusion_matrix.png", "loss.png", "a_most_incorrect.png"):
        assert png in text and (tmp_path / "report" / png).stat().st_size > 1000
    assert len(list((tmp_path / "report").glob("*_most_*.png"))) == 9


def test_every_image_the_report_links_is_there_whatever_the_class_names(tmp_path):
    """Folder names may hold '#', '%', quotes, spaces: each <img> still finds its PNG."""
    import html
    import re
    from urllib.parse import unquote

    classes = ["C#", '50% "off"', "a b?"]
    index = write_report(tmp_path / "report", files=_images(tmp_path), labels=LABELS, probs=PROBS, classes=classes, k=4)
    sources = re.findall(r'<img src="([^"]*)"', index.read_text())
    # the confusion matrix, then a grid for each class and kind with picks: not "b" most incorrect, "c" most correct
    assert len(sources) == 1 + 3 * 3 - 2
    for src in sources:  # a path a browser reads as one: no fragment, query, quote or space left raw
        assert not set(html.unescape(src)) & set('#?" ') and (tmp_path / "report" / unquote(html.unescape(src))).is_file(), src


def test_the_grids_font_draws_accented_class_names():
    """A glyph the font lacks is drawn as its 'missing' box: Pillow's default font drew 'ü' so."""
    from PIL import ImageDraw

    from clfpipe.train.report import _font

    def drawn(text: str) -> bytes:
        img = Image.new("L", (40, 40))
        ImageDraw.Draw(img).text((5, 5), text, font=_font(11), fill=255)
        return img.tobytes()

    missing = drawn("\U0010FFFF")  # a code point no font has
    assert all(drawn(c) != missing for c in "üéßΩ")


def test_long_class_names_are_shortened_on_the_matrix_only():
    """A 40-character folder name squeezed the matrix and pushed its title out of the figure."""
    from clfpipe.train.report import _short

    assert _short("vertical") == "vertical" and _short("x" * 24) == "x" * 24
    name = "horizontal_stripes_photographed_outdoors_in_daylight"
    short = _short(name)
    assert len(short) == 24 and short.startswith(name[:12]) and short.endswith(name[-11:]) and "\u2026" in short


def test_a_grids_title_is_drawn_whole_however_long(tmp_path):
    """The canvas was as wide as the title rounded down, so the title no longer fitted and lost its
    middle to an ellipsis."""
    from PIL import ImageDraw

    from clfpipe.train.report import _GAP, _fit_text, _font, image_grid

    files = _images(tmp_path)[:1]
    for n in range(20, 80, 7):
        title = f"{'class_' * (n // 6)}: most incorrect (file, predicted, p(class))"
        path = tmp_path / f"grid{n}.png"
        image_grid(files, ["img_0.png\nb 0.70"], path, title)
        width = Image.open(path).width
        assert _fit_text(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, _font(15), width - 2 * _GAP) == title, n


@pytest.mark.parametrize("epochs", [[1, 1, 1, 1], [2, 1, 7, 3]])
def test_the_loss_plot_shows_every_stage_name_clear_of_the_losses_and_the_legend(epochs):
    """In a run of one epoch a stage, stage 0's name fell outside the axes (cut off), the last one's
    sat under the legend, and names were drawn across the curves."""
    names = ["head_precomputed", "head_augmented", "unfreeze", "grow"]
    rng = np.random.default_rng(0)
    points = [LossPoint(name, e + 1, float(rng.uniform(0.2, 1.6)), float(rng.uniform(0.2, 1.6)), metric=float(rng.uniform()))
              for name, n in zip(names, epochs) for e in range(n)]
    import matplotlib.pyplot as plt

    fig = loss_figure(points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = next(lg for lg in [*fig.legends, ax.get_legend()] if lg is not None).get_window_extent(renderer)
    box = ax.get_window_extent(renderer)
    labels = [text.get_window_extent(renderer) for text in ax.texts]
    assert [text.get_text() for text in ax.texts] == [f"{i}: {name}" for i, name in enumerate(names)]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "valid accuracy"  # the metric, on its own axis
    assert max(fig.axes[1].get_yticks()) <= 1.0
    markers = np.concatenate([a.transData.transform(line.get_xydata()) for a in fig.axes for line in a.lines
                              if line.get_marker() != "None"])
    for label in labels:
        assert box.x0 <= label.x0 and label.x1 <= box.x1 and box.y0 <= label.y0 and label.y1 <= box.y1
        assert not label.overlaps(legend), label
        assert not ((markers[:, 0] >= label.x0) & (markers[:, 0] <= label.x1) & (markers[:, 1] >= label.y0 - 4)).any()
    assert not legend.overlaps(box)  # the legend is outside the axes: no loss is drawn under it
    plt.close(fig)


def test_a_many_class_matrix_stays_a_drawable_size(tmp_path):
    """At 120 classes (dog breeds) the figure was 134 inches, 13,450 px square, 6.6 GB to draw and
    more pixels than Pillow opens; from ~600 classes matplotlib refused it and the run ended there."""
    from clfpipe.train.report import confusion_png

    small, many, most = matrix_layout(3), matrix_layout(120), matrix_layout(1000)
    assert small.figure_in == pytest.approx(3 * 1.1 + 2.5) and small.counts_pt == 11 and small.names_pt == 10
    assert many.figure_in == pytest.approx(22.5) and many.counts_pt is None and 4 <= many.names_pt < 10
    assert most.figure_in == pytest.approx(22.5) and most.counts_pt is None and most.names_pt is None
    n = 300
    matrix = np.random.default_rng(0).integers(0, 5, (n, n))
    confusion_png(matrix, [f"class_{i}" for i in range(n)], tmp_path / "m.png", "plain predictions, no TTA")
    with Image.open(tmp_path / "m.png") as img:
        assert max(img.size) <= 2400


def test_the_most_confused_table_lists_the_commonest_pairs_and_counts_the_rest(tmp_path, monkeypatch):
    """A many-class run's table listed every confused pair: thousands of rows."""
    from clfpipe.train import report

    monkeypatch.setattr(report, "CONFUSED_ROWS", 4)
    n = 12  # one image of each class, each predicted as the next class, but two of class 0 both taken for 5
    files = []
    for i in range(n):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(files[-1])
    labels = np.arange(n)
    labels[1] = 0
    predicted = (np.arange(n) + 1) % n
    predicted[:2] = 5
    probs = np.eye(n)[predicted] * 0.9 + 0.1 / n
    text = write_report(tmp_path / "report", files=files, labels=labels, probs=probs, classes=[f"c{i}" for i in range(n)],
                        k=2).read_text()
    table = text.split("Most confused", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>(c\d+)</td><td>(c\d+)</td><td>(\d+)</td></tr>", table)
    assert len(rows) == 4 and rows[0] == ("c0", "c5", "2")  # 11 pairs in all: the one of two images first
    assert "and 7 more pairs of 1 image or fewer" in table


def _cjk_font() -> str | None:
    from clfpipe.train.report import _charmap, _installed_fonts

    return next((f for f in _installed_fonts() if ord("猫") in _charmap(f)), None)


def test_class_names_dejavu_lacks_are_drawn_from_an_installed_font_that_has_them(tmp_path, caplog):
    """A class folder named '猫' was a box on the matrix and in the grids (DejaVu Sans has no CJK)."""
    import warnings

    from PIL import ImageDraw

    from clfpipe.train.report import _dejavu, _font, _font_file, confusion_png, image_grid

    assert _font_file("img_0.png\ncafé 0.70") == _dejavu()
    if _cjk_font() is None:
        pytest.skip("no installed font has CJK glyphs (Debian: apt-get install fonts-wqy-zenhei)")
    face = _font_file("img_0.png\n猫 0.70")
    assert face != _dejavu()

    def drawn(text: str, font) -> bytes:
        img = Image.new("L", (40, 40))
        ImageDraw.Draw(img).text((5, 5), text, font=font, fill=255)
        return img.tobytes()

    assert drawn("猫", _font(11, face)) != drawn("\U0010FFFF", _font(11, face))
    image_grid(_images(tmp_path)[:1], ["img_0.png\n猫 0.70"], tmp_path / "grid.png", "猫: most incorrect")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion_png(np.array([[3, 1], [0, 4]]), ["猫", "café"], tmp_path / "m.png", "plain predictions, no TTA")
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert "Failed to find font weight" not in caplog.text


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_class_name_no_font_has_is_one_warning_not_matplotlibs_per_glyph(tmp_path):
    import warnings

    from clfpipe.train.report import undrawable

    assert undrawable("abc café") == ""
    ghost = "\U000f0001"  # a private-use code point: no font has it
    assert undrawable(f"x{ghost}y{ghost}") == ghost
    kept, logger = _Kept(), logging.getLogger("clfpipe")  # the CLI stops its records at this logger
    logger.addHandler(kept)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write_report(tmp_path / "report", files=_images(tmp_path), labels=LABELS, probs=PROBS,
                         classes=["a", f"b{ghost}", "c"], k=4)
    finally:
        logger.removeHandler(kept)
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert [m for m in kept.messages if "no font here has" in m] == [
        f"report: no font here has {ghost!r} (in class names): the PNGs draw them as boxes (install one that has them, "
        "e.g. Debian's fonts-noto-cjk)"]
