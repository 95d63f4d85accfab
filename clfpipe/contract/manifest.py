"""The run directory and its manifest: how one stage hands its work to the next.

``RUN_DIR/manifest.json`` holds the schema version, the resolved recipe, the class names in
order, the preprocessing spec, one entry per artifact (path, sha256, stage, library versions)
and each stage's figures. A stage validates what it reads and commits what it writes in one
atomic replace, so a stage that fails leaves the manifest as it was.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from clfpipe.contract.errors import ManifestError, RecipeError
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.recipe import Recipe, recipe_from_dict

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKPOINT = "checkpoint"  # the trained weights' artifact name
CHECKPOINT_FILE = "model.pt"  # a state dict of clfpipe.nn.models.Classifier


def stage_start(index: int) -> tuple[str, str]:
    """(artifact name, file) of the weights stage `index` (from 0) started from; stage 0 starts from
    the recipe's seeded or pretrained initial weights, which need no file."""
    return f"stage{index}_start", f"checkpoints/stage{index}_start.pt"
_REQUIRED = ("schema_version", "recipe", "classes", "preprocess", "artifacts", "stages")
_ARTIFACT_KEYS = ("path", "sha256", "stage", "versions", "created")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def check_out_folder(out: Path, tool: str, option: str = "--out") -> None:
    """``--out``: a folder, or a place one can be made, that ``tool`` can write to, checked before
    the work whose results go there (a file or a read-only place named there failed only at the
    end, the work lost). Nothing is made here: a run that fails later leaves no empty folder."""
    if out.exists() and not out.is_dir():
        raise ManifestError(f"{option} {out}: expected a folder, got a file")
    _check_writable(out, f"{option} {out}: expected a folder {tool} can write to")


def check_out_file(out: Path, tool: str, option: str) -> None:
    """``option``: a file ``tool`` can write (replacing one there), checked before the work as
    ``check_out_folder`` is; nothing is made here."""
    if out.is_dir():
        raise ManifestError(f"{option} {out}: expected a file name, got a folder")
    _check_writable(out.parent, f"{option} {out}: expected a place {tool} can write to")


def _check_writable(folder: Path, expected: str) -> None:
    place = next(p for p in (folder, *folder.parents) if p.exists())  # where the folder would be made
    try:
        if not place.is_dir():
            raise NotADirectoryError(20, f"{place} is a file")
        tempfile.TemporaryFile(dir=place).close()
    except OSError as exc:
        raise ManifestError(f"{expected} ({exc.strerror or exc})") from exc


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see a torn file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ManifestError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """An immutable view of manifest.json; ``with_*`` methods return updated copies."""

    data: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def recipe(self) -> Recipe:
        return recipe_from_dict(self.data["recipe"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.data["preprocess"])

    @property
    def threshold(self) -> float:
        """A multi-label run's tags are those above it: training's F2-best threshold (0.5 before one is recorded)."""
        threshold = self.data["stages"].get("train", {}).get("threshold")
        return 0.5 if threshold is None else float(threshold)

    def stage(self, name: str) -> dict[str, Any]:
        if name not in self.data["stages"]:
            raise ManifestError(f"manifest has no {name!r} stage: run it first (stages done: {', '.join(self.data['stages']) or 'none'})")
        return self.data["stages"][name]

    def artifact(self, name: str) -> dict[str, Any]:
        if name not in self.data["artifacts"]:
            raise ManifestError(
                f"manifest has no artifact {name!r}: expected one of {', '.join(sorted(self.data['artifacts'])) or 'none'}"
            )
        return self.data["artifacts"][name]

    def with_stage(self, name: str, figures: dict[str, Any]) -> "Manifest":
        data = copy.deepcopy(self.data)
        data["stages"][name] = {**figures, "finished": _now()}
        return Manifest(data)

    def with_artifact(self, name: str, run_dir: Path, path: Path, *, stage: str, versions: dict[str, str], **extra: Any) -> "Manifest":
        data = copy.deepcopy(self.data)
        data["artifacts"][name] = {
            "path": str(path.relative_to(run_dir)),
            "sha256": sha256_file(path),
            "stage": stage,
            "versions": versions,
            "created": _now(),
            **extra,
        }
        return Manifest(data)


def relative_to_run(path: Path, run_dir: Path) -> str:
    """How the manifest records a path: relative to the run directory, so no build machine's
    absolute paths travel with a run and a run moved together with its data still finds it."""
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


def new_manifest(recipe: Recipe, classes: list[str], data_dir: Path, run_dir: Path) -> Manifest:
    return Manifest(
        {
            "schema_version": SCHEMA_VERSION,
            "recipe": recipe.to_dict(),
            "classes": list(classes),
            "preprocess": recipe.preprocess_spec().to_dict(),
            "data_dir": relative_to_run(data_dir, run_dir),
            "artifacts": {},
            "stages": {},
        }
    )


def validate_manifest(data: Any, where: str) -> Manifest:
    """Check structure and types; ManifestError says what was expected."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing keys {', '.join(missing)}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{where}: expected schema_version {SCHEMA_VERSION}, got {data['schema_version']!r}")
    classes = data["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{where}: expected 'classes' to be a list of at least 2 names, got {classes!r}")
    for name, entry in data["artifacts"].items():
        absent = [k for k in _ARTIFACT_KEYS if k not in entry]
        if absent:
            raise ManifestError(f"{where}: artifact {name!r} lacks {', '.join(absent)}")
    try:
        recipe_from_dict(data["recipe"])
        PreprocessSpec.from_dict(data["preprocess"])
    except (RecipeError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{where}: invalid recipe or preprocess section: {exc}") from exc
    return Manifest(data)


class RunDir:
    """A run directory: the only channel between the stages."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def resolve(self, recorded: str) -> Path:
        """A path the manifest recorded (relative to this directory, or absolute in older runs)."""
        return (self.path / recorded).resolve()

    def data_dir(self, manifest: Manifest, given: Path | None = None) -> Path:
        """The data folder a command reads: ``given`` (its --data) where set, else the one training read."""
        return Path(given) if given else self.resolve(manifest.data["data_dir"])

    def read(self) -> Manifest:
        if not self.path.is_dir():
            raise ManifestError(f"run directory not found: {self.path}")
        if not self.manifest_path.is_file():
            raise ManifestError(f"{self.path} has no {MANIFEST_NAME}: expected a run directory made by 'clfpipe train'")
        try:
            data = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{self.manifest_path}: corrupt manifest, not valid JSON ({exc})") from exc
        return validate_manifest(data, str(self.manifest_path))

    def write(self, manifest: Manifest) -> None:
        validate_manifest(manifest.data, "manifest to write")
        atomic_write_bytes(self.manifest_path, (json.dumps(manifest.data, indent=2) + "\n").encode())

    def artifact_path(self, manifest: Manifest, name: str, verify: bool = True) -> Path:
        """The artifact's file, checked against the recorded sha256."""
        entry = manifest.artifact(name)
        path = self.path / entry["path"]
        if not path.is_file():
            raise ManifestError(f"artifact {name!r} missing: expected file {path}")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ManifestError(
                f"artifact {name!r} changed since {entry['stage']} wrote it: sha256 of {path} differs from the manifest"
            )
        return path
