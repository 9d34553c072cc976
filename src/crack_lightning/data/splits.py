"""Seeded, stratified train/val/test splits and the manifest that records them."""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from crack_lightning.data.layout import CLASS_NAMES
from crack_lightning.errors import DataError
from crack_lightning.settings import check_fractions

SPLITS = ("train", "val", "test")


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Split indices class by class, so every split keeps the data set's class ratio.

    Within a class the split sizes are rounded, so each split's class ratio differs
    from the whole set's by less than one image.
    """
    check_fractions(val_fraction, test_fraction)
    rng = random.Random(seed)
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label in sorted(set(labels)):
        indices = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(indices)
        n_test = round(len(indices) * test_fraction)
        n_val = round(len(indices) * val_fraction)
        if n_val == 0 or n_val + n_test >= len(indices) or (test_fraction > 0 and n_test == 0):
            raise DataError(
                f"Class {CLASS_NAMES[label]} has only {len(indices)} images: too few for "
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}."
            )
        result["test"] += indices[:n_test]
        result["val"] += indices[n_test : n_test + n_val]
        result["train"] += indices[n_test + n_val :]
    return {name: sorted(idx) for name, idx in result.items()}


def write_manifest(
    path: Path, root: Path, samples: Sequence[tuple[str, int]], split: dict[str, list[int]]
) -> None:
    """CSV of every image (relative to root), its class and its split, sorted by path."""
    rows = [
        (Path(samples[i][0]).relative_to(root).as_posix(), CLASS_NAMES[samples[i][1]], name)
        for name, indices in split.items()
        for i in indices
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(sorted(rows))


def grouped_split(
    labels: Sequence[int],
    groups: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[int]]:
    """Like stratified_split, but all images of a group land in the same split.

    Groups are dealt out in a seeded random order; each goes to the split it overfills
    least (per class), ties to the one with the most room left relative to its target.
    With only one-image groups this meets the stratified sizes exactly; large groups make
    the sizes drift by up to a group's size. (Dealing the largest first would fit sizes
    more tightly, but then groups of distinct sizes, such as SDNET2018's photos, land in
    the same splits whatever the seed, and seeds could not cross-validate over them.)
    """
    check_fractions(val_fraction, test_fraction)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = sorted(members)
    random.Random(seed).shuffle(order)

    totals = Counter(labels)
    fractions = {"test": test_fraction, "val": val_fraction}
    target = {
        name: {c: round(n * fractions[name]) for c, n in totals.items()} for name in fractions
    }
    target["train"] = {c: n - target["val"][c] - target["test"][c] for c, n in totals.items()}
    for label, n in totals.items():
        if (
            target["val"][label] == 0
            or target["train"][label] <= 0
            or (test_fraction > 0 and target["test"][label] == 0)
        ):
            raise DataError(
                f"Class {CLASS_NAMES[label]} has only {n} images: too few for "
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}."
            )
    candidates = SPLITS if test_fraction > 0 else ("train", "val")
    filled = {name: Counter() for name in SPLITS}
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group in order:
        counts = Counter(labels[i] for i in members[group])

        def cost(name: str, counts: Counter = counts) -> tuple[int, float]:
            over = sum(max(0, filled[name][c] + n - target[name][c]) for c, n in counts.items())
            room = sum(
                (target[name][c] - filled[name][c]) / max(target[name][c], 1) for c in counts
            )
            return over, -room

        best = min(candidates, key=cost)
        filled[best].update(counts)
        result[best] += members[group]
    for name in candidates:
        for label in totals:
            if filled[name][label] == 0:
                raise DataError(
                    f"The grouped split left no {CLASS_NAMES[label]} image in {name}: the "
                    f"near-duplicate groups are too large for these fractions. Lower "
                    f"data.group_distance or use data.split=random."
                )
    return {name: sorted(indices) for name, indices in result.items()}
