"""What a model repository serves, pinned by hashes: ``clfpipe repo`` records the sha256 of every
file it writes, and ``serve up`` and ``verify`` refuse a repository whose files changed, went
missing or appeared since (a swapped model file, an edited weight, an injected model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clfpipe.contract.manifest import atomic_write_bytes, sha256_file

HASHES_FILE = "clfpipe_repository.json"  # at the repository's root; Triton ignores files there
_RUNTIME_FILES = ("__pycache__",)  # what the python backend writes beside model.py when it imports it


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file under root (the hashes file and caches excluded)."""
    hashes = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.as_posix() != HASHES_FILE and not any(part in _RUNTIME_FILES for part in rel.parts):
            hashes[rel.as_posix()] = sha256_file(path)
    return hashes


def write_tree_hashes(root: Path, about: dict[str, Any]) -> None:
    atomic_write_bytes(Path(root) / HASHES_FILE, (json.dumps({**about, "files": tree_hashes(root)}, indent=1) + "\n").encode())


def recorded_hashes(root: Path) -> dict[str, Any] | None:
    path = Path(root) / HASHES_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tree_problems(root: Path) -> list[str]:
    """What differs from the recorded hashes ('changed: x', 'missing: y', 'unexpected: z'); [] if nothing."""
    recorded = recorded_hashes(root)
    if recorded is None or not isinstance(recorded.get("files"), dict):
        return [f"no readable {HASHES_FILE}"]
    now, then = tree_hashes(root), recorded["files"]
    problems = [f"changed: {p}" for p in sorted(now) if p in then and now[p] != then[p]]
    problems += [f"missing: {p}" for p in sorted(then) if p not in now]
    problems += [f"unexpected: {p}" for p in sorted(now) if p not in then]
    return problems
