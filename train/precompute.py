"""precompute=True: pooled activations of the frozen body, cached on disk under a content key.

The key covers the body's weights (architecture, pretrained or seeded init), the preprocessing
spec and the bytes and labels of every image, so a changed image, size or model is a miss,
never a silent reuse (fastai 0.7 reused its tmp/ until a user deleted it). Each array file
carries its sha256 in a sidecar; a file that does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clfpipe.contract.dataset import Split
from clfpipe.contract.manifest import atomic_write_bytes, sha256_file
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.progress import progress
from clfpipe.nn.models import Classifier
from clfpipe.train.data import ImageDataset, make_loader

CACHE_VERSION = 1


def default_cache_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "clfpipe" / "features"


def body_digest(model: Classifier) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.body.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def split_digest(split: Split) -> str:
    digest = hashlib.sha256()
    for path, label in zip(split.files, split.labels):
        digest.update(sha256_file(path).encode())
        digest.update(str(label).encode())
    return digest.hexdigest()


def cache_key(model: Classifier, spec: PreprocessSpec, split: Split) -> str:
    parts = {"version": CACHE_VERSION, "body": body_digest(model), "spec": spec.to_dict(), "images": split_digest(split)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@torch.inference_mode()
def pooled_features(model: Classifier, split: Split, spec: PreprocessSpec, *, batch_size: int, device: torch.device) -> np.ndarray:
    """body + concat pool + flatten on every image (validation transforms), as float32 (N, 2C)."""
    model.eval()
    loader = make_loader(ImageDataset(split, spec), batch_size, shuffle=False, num_workers=0, seed=0)
    pool = model.head[:2]
    batches = progress(loader, f"precompute {len(split)} images", unit="batch")
    return np.concatenate([pool(model.body(x.to(device))).float().cpu().numpy() for x, _ in batches])


@dataclass(frozen=True)
class CacheResult:
    features: np.ndarray
    key: str
    status: str  # "hit", "miss" or "rebuilt (corrupt)"


class FeatureCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def _load(self, key: str) -> np.ndarray | None:
        array_path, meta_path = self.paths(key)
        if not array_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != sha256_file(array_path):
                return None
            return np.load(array_path, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> CacheResult:
        cached = self._load(key)
        if cached is not None:
            return CacheResult(cached, key, "hit")
        existed = self.paths(key)[0].exists()
        features = compute().astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, features, allow_pickle=False)
        array_path, meta_path = self.paths(key)
        atomic_write_bytes(array_path, buf.getvalue())
        atomic_write_bytes(meta_path, json.dumps({"sha256": sha256_file(array_path), "shape": list(features.shape)}).encode())
        return CacheResult(features, key, "rebuilt (corrupt)" if existed else "miss")


def cached_features(model: Classifier, split: Split, spec: PreprocessSpec, cache: FeatureCache, *, batch_size: int,
                    device: torch.device) -> CacheResult:
    key = cache_key(model, spec, split)
    return cache.get(key, lambda: pooled_features(model, split, spec, batch_size=batch_size, device=device))
