"""``clfpipe data clean``: every image of a run's data, training split too, ranked by its loss under
the trained model (fastai's ``top_losses``; lesson 2 cleans the training images, where a
scraped dataset's wrong labels sit), into the table ``clfpipe.contract.cleaning`` reads back, and
a page that draws the highest losses."""

from __future__ import annotations

import html
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clfpipe.contract.cleaning import NO_TAGS, TABLE, Ranked, rank, relative, table_bytes
from clfpipe.contract.dataset import SPLITS, check_outside_splits
from clfpipe.contract.errors import DataError, ManifestError
from clfpipe.contract.lock import holding_run
from clfpipe.contract.manifest import Manifest, RunDir, check_out_folder
from clfpipe.nn.reference import load_run_model
from clfpipe.train.data import run_splits
from clfpipe.train.evaluate import predict_logits, view_logits
from clfpipe.train.report import PLAIN, STYLE, image_grid, warn_undrawable
from clfpipe.train.stage import pick_device

log = logging.getLogger(__name__)

OUT = "clean"  # RUN/clean unless --out says
PER_GRID = 5  # a grid of 5 (1,048 px) shows at its size in the page (1,200 px at most); 8 were scaled to 0.6
MAX_SHOWN = 480
PREDICTIONS = {False: PLAIN,
               True: "the mean probabilities of the deterministic TTA views (identity, flip, zoom, zoom + flip)"}


@dataclass(frozen=True)
class Ranking:
    """A run's data ranked: where it lies, its rows, and a multi-label run's tags table ("" for class folders)."""

    data_dir: Path
    rows: list[Ranked]
    tags_table: str = ""
    predictions: str = ""  # what ranked them, in words (PREDICTIONS)

    def edits(self) -> str:
        """What a row's action may become."""
        if self.tags_table:
            return (f"delete (the file is moved aside), or the image's tags, space-separated as 'predicted' names them "
                    f"({NO_TAGS} for none; its row of {self.tags_table} is rewritten)")
        return "delete (the file is moved aside), or the class the image belongs to"


@holding_run("data clean")
def clean_run(run_dir: Path, shown: int, out: Path | None = None, data_dir: Path | None = None,
              tta: bool = False) -> tuple[Path, Ranking]:
    """``clfpipe data clean``: the run's data (default: the folder training read) ranked into
    OUT/cleaning.csv and drawn in OUT/index.html (default OUT: RUN/clean); returns (the table, the
    ranking). OUT and --show are checked before the ranking's work."""
    out = Path(out) if out else Path(run_dir) / OUT
    check_out(out, shown)
    run = RunDir(run_dir)
    manifest = run.read()
    check_outside_splits(out, run.data_dir(manifest, data_dir), "--out")  # its PNGs would be read as images
    ranking = rank_run(run, manifest, data_dir, tta)
    _write(out, ranking, run_dir, shown)
    return out / TABLE, ranking


def rank_run(run: RunDir, manifest: Manifest, data_dir: Path | None = None, tta: bool = False) -> Ranking:
    """Both splits of the run's data (default: the folder training read) ranked by the run's loss
    on the evaluation transforms (no augmentation), highest first; with `tta`, by the loss of the
    deterministic TTA views' mean probabilities (what the served TTA ensemble answers)."""
    splits = run_splits(run, manifest, data_dir)
    device = pick_device("auto")
    model = load_run_model(run, manifest).to(device)
    predict = view_logits if tta else predict_logits
    logits = [predict(model, split, spec=manifest.preprocess, batch_size=manifest.recipe.data.batch_size, device=device)
              for split in splits]
    data = run.data_dir(manifest, data_dir)
    files = [relative(f, data) for split in splits for f in split.files]
    names = [name for name, split in zip(SPLITS, splits) for _ in split.files]
    labels = np.concatenate([np.asarray(split.labels, dtype=np.int64) for split in splits])
    multi = manifest.recipe.multi_label
    rows = rank(files, names, labels, np.concatenate(logits, axis=-2), manifest.classes, manifest.threshold if multi else None)
    return Ranking(data, rows, manifest.recipe.data.labels_csv if multi else "", PREDICTIONS[tta])


def check_out(out: Path, shown: int) -> None:
    """``--out`` (a new folder, or one this wrote) and ``--show`` in range."""
    if not 0 <= shown <= MAX_SHOWN:
        raise DataError(f"--show: expected 0 to {MAX_SHOWN} images, got {shown}")
    if out.exists() and not (out.is_dir() and ((out / TABLE).is_file() or not any(out.iterdir()))):
        raise ManifestError(f"--out {out}: expected a new folder or one 'clfpipe data clean' wrote (no {TABLE} there): "
                            "it is left as it was")
    check_out_folder(out, "data clean")


def _write(out: Path, ranking: Ranking, run_dir: Path, shown: int) -> None:
    """OUT/cleaning.csv (every row) and OUT/index.html (the ``shown`` highest losses, in grids),
    written whole or not at all, into an OUT that ``check_out`` passed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except OSError as exc:
        raise ManifestError(f"--out {out}: cannot write there: {exc.strerror or exc}") from exc
    try:
        (staging / TABLE).write_bytes(table_bytes(ranking.rows))
        _page(staging, ranking, shown, f"clfpipe data clean --run {run_dir} --apply {out / TABLE}")
        staging.chmod(0o755)  # mkdtemp's 0700
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except OSError as exc:
        raise ManifestError(f"--out {out}: cannot write there: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where the rename took it


def _cell(value: object) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def _page(out: Path, ranking: Ranking, shown: int, apply: str) -> None:
    """index.html: the top rows in grids of PER_GRID, each grid over its rows' table."""
    top, data_dir = ranking.rows[:shown], ranking.data_dir
    warn_undrawable("".join(row.label + row.predicted for row in top), "data clean")
    sections = []
    for start in range(0, len(top), PER_GRID):
        part = top[start:start + PER_GRID]
        png = f"top_losses_{start + 1}.png"
        image_grid([data_dir / row.file for row in part],
                   [f"{Path(row.file).name}\n{row.label} \u2192 {row.predicted} {row.loss:.2f}" for row in part],
                   out / png, f"losses {start + 1} to {start + len(part)} (file, label \u2192 predicted, loss)")
        rows = "".join("<tr>" + "".join(_cell(v) for v in (start + i + 1, row.file, row.split, row.label, row.predicted,
                                                            f"{row.p_label:.4f}", f"{row.loss:.3f}")) + "</tr>"
                       for i, row in enumerate(part))
        sections.append(f"<img src=\"{png}\" alt=\"losses {start + 1} to {start + len(part)}\"><table><tr><th>rank</th>"
                        f"<th>file</th><th>split</th><th>label</th><th>predicted</th><th>p(label)</th><th>loss</th></tr>"
                        f"{rows}</table>")
    data = html.escape(str(data_dir))
    (out / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>clfpipe data cleaning</title>" + STYLE + "</head><body>"
        "<h1>Data cleaning: the highest losses</h1>"
        f"<p>The data <code>{data}</code>: {len(ranking.rows)} images of both splits ranked by their loss under "
        f"{html.escape(ranking.predictions)}, "
        f"the top {len(top)} drawn here. Every one is a row of <code>{TABLE}</code> beside this page, its action "
        f"<code>keep</code>. Set it to {html.escape(ranking.edits())}, then:</p><pre>{html.escape(apply)}</pre>"
        "<p>File paths are under the data folder.</p>" + "".join(sections) + "</body></html>\n", encoding="utf-8")
