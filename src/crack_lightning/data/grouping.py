"""Groups of near-duplicate images, for splits that keep each group on one side.

The METU crops were cut from 458 photos, and some crops of one photo overlap, so a
random split can put almost the same image in train and in validation. A 64-bit
difference hash (dHash: is each pixel of a 9x8 grey thumbnail brighter than its right
neighbour?) changes little under small shifts and re-encoding; images whose hashes
differ in at most `max_distance` bits are neighbours, and neighbours of neighbours form
one group (union-find). Exact duplicates have distance 0.

Finding neighbours without comparing all pairs: cut the 64 bits into max_distance + 1
bands; two hashes within max_distance bits agree exactly on at least one band
(pigeonhole), so only hashes that share a band value are compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from crack_lightning.errors import DataError
from crack_lightning.progress import track
from crack_lightning.settings import check_distance

HASH_BITS = 64


def dhash(path: str) -> int:
    """64-bit difference hash of an image file.

    JPEGs are decoded at reduced scale (at least 32x32; 1/4 for 227 px crops), which is
    faster than a full decode. Of the variants tried on the real sample (1/8 or 1/4
    or full scale, box, bilinear or Lanczos filter) this one put the visibly overlapping
    crops closest together (4-8 bits) while unrelated crops stay about 31 bits apart.
    """
    try:
        with Image.open(path) as image:
            image.draft("L", (32, 32))
            grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    except Exception as err:  # PIL raises many types for bad files
        raise DataError(
            f"{path} cannot be decoded ({type(err).__name__}: {err}); run "
            f"`crack-data check root=DATA_ROOT` to list every damaged file."
        ) from None
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image_hashes(paths: Sequence[str], progress: bool = True) -> np.ndarray:
    """dHash of every path, as uint64."""
    iterator = track(paths, "Hashing images", "img", progress)
    return np.array([dhash(path) for path in iterator], dtype=np.uint64)


def neighbour_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(k, 2) index pairs i < j of distinct hashes at most max_distance bits apart."""
    check_distance(max_distance)
    hashes = np.asarray(hashes, dtype=np.uint64)
    bands = max_distance + 1
    widths = [HASH_BITS // bands + (1 if b < HASH_BITS % bands else 0) for b in range(bands)]
    found = []
    shift = 0
    for width in widths:
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members = order[start:end]
            found.append(_close_pairs(hashes, members, max_distance))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def _close_pairs(hashes: np.ndarray, members: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs among members (indices into hashes) within max_distance, in row blocks."""
    pairs = []
    values = hashes[members]
    for lo in range(0, len(members), 1024):
        block = values[lo : lo + 1024]
        distance = np.bitwise_count(block[:, None] ^ values[None, :])
        rows, cols = np.nonzero(distance <= max_distance)
        rows = rows + lo
        keep = rows < cols
        a, b = members[rows[keep]], members[cols[keep]]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.concatenate(pairs)


def near_duplicate_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group id of each hash (0, 1, ... in order of first appearance); near ones share one."""
    unique, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    parent = list(range(len(unique)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in neighbour_pairs(unique, max_distance).tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(len(unique))], dtype=np.int64)[inverse.ravel()]
    _, first, ids = np.unique(roots, return_index=True, return_inverse=True)
    # renumber by first appearance, so ids do not depend on hash values
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[ids.ravel()]
