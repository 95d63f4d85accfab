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

import numpy as np
import torch

from clfpipe.contract.dataset import Split
from clfpipe.contract.errors import DataError
from clfpipe.contract.manifest import atomic_write_bytes, sha256_file
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.progress import progress
from clfpipe.nn.models import Classifier
from clfpipe.train.data import ImageDataset, make_loader
from clfpipe.train.distributed import SINGLE, Dist, barrier, broadcast, gather_rows

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

    def load(self, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or not matching its recorded sha256."""
        array_path, meta_path = self.paths(key)
        if not array_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != sha256_file(array_path):
                return None
            return np.load(array_path, allow_pickle=False)
        except (OSError, ValueError, AttributeError):  # AttributeError: JSON of another shape than ours
            return None

    def store(self, key: str, features: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, features, allow_pickle=False)
        array_path, meta_path = self.paths(key)
        atomic_write_bytes(array_path, buf.getvalue())
        atomic_write_bytes(meta_path, json.dumps({"sha256": sha256_file(array_path), "shape": list(features.shape)}).encode())


def _shard(split: Split, dist: Dist) -> Split:
    return Split(split.files[dist.rank :: dist.world], split.labels[dist.rank :: dist.world], split.classes)


def _unshard(rows: np.ndarray, n: int, dist: Dist) -> np.ndarray:
    """Rows gathered in rank order ([rank 0's], [rank 1's], ...) back to the split's order."""
    order = np.concatenate([np.arange(r, n, dist.world) for r in range(dist.world)])
    out = np.empty_like(rows)
    out[order] = rows
    return out


def cached_features(model: Classifier, split: Split, spec: PreprocessSpec, cache: FeatureCache, *, batch_size: int,
                    device: torch.device, dist: Dist = SINGLE) -> CacheResult:
    """The split's pooled features from the cache, or computed and cached. With several ranks each
    computes its shard, every rank receives all of them, and rank 0 alone writes the cache file
    (the same content-keyed file one process writes)."""
    key = broadcast(cache_key(model, spec, split) if dist.main else None, dist)
    cached = cache.load(key) if dist.main else None
    state = broadcast(("hit" if cached is not None else "rebuilt (corrupt)" if cache.paths(key)[0].exists() else "miss")
                      if dist.main else None, dist)
    if state == "hit":
        features = cached if dist.main else cache.load(key)  # the other ranks read what rank 0 checked
        if features is None:
            raise DataError(f"rank {dist.rank} cannot read the feature cache {cache.paths(key)[0]} that rank 0 found: "
                            "expected a cache folder every rank shares (data.cache_dir)")
        return CacheResult(features, key, "hit")
    rows = pooled_features(model, _shard(split, dist), spec, batch_size=batch_size, device=device).astype(np.float32)
    features = _unshard(gather_rows(rows, dist), len(split), dist) if dist.active else rows
    if dist.main:
        cache.store(key, features)
    barrier(dist)
    return CacheResult(features, key, state)
