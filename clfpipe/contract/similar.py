"""Near copies: images that look alike though their bytes differ (one resized or saved again at
another JPEG quality), found by a perceptual hash (imagehash's pHash: the signs of an image's
lowest DCT frequencies against their median) and the Hamming distance between hashes.

A 256-bit hash (hash size 16) rather than pHash's usual 64: on the demo data, whose images of a
class are stripes of one kind, no two distinct images came closer than 66 bits of 256, while a
copy at two thirds of the size in JPEG quality 70 stayed within 24 (at half the size in quality
50, within 52); at 64 bits the two overlapped (6 against 8). Random colour fields with detail
at every scale of a 12 or 48-cell grid (photos' stand-in) sat 98 bits or more apart, their copies
within 16. An image with almost no detail (a blur of a 6-cell grid) is where it falls short:
its higher frequencies are near zero, their signs noise, and a resized copy drifted up to 68 bits
away: missed, not confused with another. Unmeasured on real photos."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from clfpipe.contract.errors import DataError
from clfpipe.contract.preprocess import load_image

HASH_SIZE = 16  # pHash over the 16x16 lowest frequencies: 256 bits
HASH_BITS = HASH_SIZE * HASH_SIZE
NEAR_BITS = 40  # at most this many bits apart is a near copy: 16% of the bits, as imagededup's 10 of 64
MAX_NEAR_BITS = HASH_BITS // 2  # two unrelated hashes differ in about half their bits
_ROWS = 256  # hashes compared at once against all: 108 MB at its peak for 20,000 hashes here, ~0.5 GB at 100,000


def check_near_bits(near_bits: int | None) -> None:
    """``--near-copies``: None (not asked for) or a bound that can tell a copy from another image."""
    if near_bits is not None and not 0 <= near_bits <= MAX_NEAR_BITS:
        raise DataError(f"--near-copies: expected 0 to {MAX_NEAR_BITS} bits of {HASH_BITS}, got {near_bits}")


def perceptual_hash(img: Image.Image) -> np.ndarray:
    """The image's pHash as HASH_BITS booleans."""
    import imagehash  # scipy with it: only for the commands that ask

    return np.asarray(imagehash.phash(img, hash_size=HASH_SIZE).hash, dtype=bool).reshape(-1)


def file_hash(path: Path) -> np.ndarray | None:
    """An image file's pHash as training decodes it (``load_image``); None where it does not decode."""
    try:
        return perceptual_hash(load_image(path))
    except ValueError:
        return None


def _earlier_distances(hashes: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, distances): for a block of rows from ``start``, each row's Hamming distance to every
    earlier hash (HASH_BITS + 1 to itself and later ones). By a matrix product, |a| + |b| - 2 a.b, a
    block at a time: n hashes cost n^2 * HASH_BITS multiply-adds, not n^2 Python comparisons."""
    bits = np.asarray(hashes, dtype=np.float32)
    ones = bits.sum(axis=1)
    for start in range(0, len(bits), _ROWS):
        block = bits[start:start + _ROWS]
        dist = np.rint(ones[start:start + len(block), None] + ones[None, :] - 2 * block @ bits.T).astype(np.int32)
        earlier = np.arange(len(bits))[None, :] < np.arange(start, start + len(block))[:, None]
        yield start, np.where(earlier, dist, HASH_BITS + 1)  # exact integers: float32 holds them below 2^24


def nearest_earlier(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """(j, i, bits) for each hash j with an earlier one i at most ``max_bits`` apart: the nearest
    such i, the first on a tie."""
    found = []
    for start, dist in _earlier_distances(hashes):
        nearest = dist.argmin(axis=1)  # the first of equal minima
        found += [(start + row, int(i), int(dist[row, i])) for row, i in enumerate(nearest) if dist[row, i] <= max_bits]
    return found


def near_groups(hashes: np.ndarray, max_bits: int) -> list[list[int]]:
    """The hashes' indices grouped so that any two at most ``max_bits`` apart share a group (and
    so, through a chain, may two further apart); groups, and each group, in index order."""
    parent = list(range(len(hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start, dist in _earlier_distances(hashes):
        for row, i in zip(*np.nonzero(dist <= max_bits)):
            a, b = root(start + int(row)), root(int(i))
            parent[max(a, b)] = min(a, b)  # the first index roots its group
    groups: dict[int, list[int]] = {}
    for i in range(len(hashes)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())
