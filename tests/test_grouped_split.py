"""Perceptual hashes, near-duplicate groups and the grouped split (data.split=grouped)."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_lightning.data.splits import (
    dhash,
    grouped_split,
    near_duplicate_groups,
    neighbour_pairs,
    stratified_split,
)
from crack_lightning.errors import DataError
from crack_lightning.training.check import check_train_settings
from crack_lightning.training.run import build

# crops of one crack in the real sample that overlap (found by eye after hashing)
OVERLAPPING = [
    ("Positive/14092_1.jpg", "Positive/14095_1.jpg"),
    ("Positive/14094_1.jpg", "Positive/14103_1.jpg"),
    ("Positive/14049_1.jpg", "Positive/14111_1.jpg"),
    ("Positive/14063_1.jpg", "Positive/14124_1.jpg"),
    ("Positive/14095_1.jpg", "Positive/14158_1.jpg"),
]


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def shifted_copy(source: Path, dest: Path, shift: int = 3, quality: int = 80) -> Path:
    """A crop of source moved by `shift` pixels and re-encoded: a near duplicate."""
    image = Image.open(source)
    w, h = image.size
    moved = image.crop((shift, shift, w, h)).resize((w, h))
    dest.parent.mkdir(parents=True, exist_ok=True)
    moved.save(dest, quality=quality)
    return dest


def random_hashes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**64, size=n, dtype=np.uint64)


# --- hashes and groups -------------------------------------------------------------------


def test_dhash_keeps_near_duplicates_close_and_others_apart(sample_root, tmp_path):
    original = sample_root / "Negative" / "00001.jpg"
    copy = shifted_copy(original, tmp_path / "copy.jpg")
    assert bits(dhash(str(original)), dhash(str(copy))) <= 8
    for a, b in OVERLAPPING:
        assert bits(dhash(str(sample_root / a)), dhash(str(sample_root / b))) <= 8, (a, b)
    others = sorted((sample_root / "Negative").iterdir())[:20]
    distances = [bits(dhash(str(x)), dhash(str(y))) for x, y in itertools.pairwise(others)]
    assert min(distances) > 8 and 24 <= np.median(distances) <= 40


def test_undecodable_image_is_named(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image")
    with pytest.raises(DataError, match=r"bad.jpg cannot be decoded .*crack-data check"):
        dhash(str(bad))


@pytest.mark.parametrize("distance", [0, 3, 8, 12])
def test_neighbour_search_finds_exactly_the_brute_force_pairs(distance):
    hashes = random_hashes(1500, seed=distance)
    rng = np.random.default_rng(1)
    for i in range(0, 300, 3):  # plant neighbours at 1..16 bits
        flips = rng.choice(64, size=1 + i % 16, replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(f) for f in flips))
    all_pairs = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    rows, cols = np.nonzero(np.triu(all_pairs <= distance, k=1))
    expected = set(zip(rows.tolist(), cols.tolist(), strict=True))
    found = {tuple(pair) for pair in neighbour_pairs(hashes, distance).tolist()}
    assert found == expected
    assert len(found) >= (0 if distance == 0 else 10)


def test_groups_are_transitive_and_numbered_by_first_appearance():
    a = 0x0123_4567_89AB_CDEF
    b = a ^ 0b111  # 3 bits from a
    c = b ^ (0b111 << 20)  # 3 bits from b, 6 from a: joins through b
    far = ~a & (2**64 - 1)
    hashes = np.array([far, c, a, far, b, a], dtype=np.uint64)
    assert near_duplicate_groups(hashes, 3).tolist() == [0, 1, 1, 0, 1, 1]
    assert near_duplicate_groups(hashes, 0).tolist() == [0, 1, 2, 0, 3, 2]


def test_group_distance_is_validated():
    with pytest.raises(DataError, match=r"data.group_distance=40 must be an integer in \[0, 16\]"):
        neighbour_pairs(random_hashes(3, 0), 40)


# --- the split ----------------------------------------------------------------------------


def straddling(groups, split) -> int:
    """Groups with members in more than one split."""
    side = {i: name for name, indices in split.items() for i in indices}
    sides: dict[int, set[str]] = {}
    for i, group in enumerate(groups):
        sides.setdefault(group, set()).add(side[i])
    return sum(len(s) > 1 for s in sides.values())


def test_one_image_groups_give_the_stratified_sizes():
    labels = [0] * 241 + [1] * 240
    split = grouped_split(labels, list(range(481)), 0.2, 0.1, seed=0)
    plain = stratified_split(labels, 0.2, 0.1, seed=0)
    for name in ("train", "val", "test"):
        got = Counter(labels[i] for i in split[name])
        assert got == Counter(labels[i] for i in plain[name]), name
    assert sorted(i for s in split.values() for i in s) == list(range(481))


def test_groups_never_straddle_and_classes_stay_balanced():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=400)  # groups of 1-5 images of one class
    groups = np.repeat(np.arange(400), sizes).tolist()
    labels = [int(g % 2) for g in groups]
    split = grouped_split(labels, groups, 0.3, 0.0, seed=3)
    assert straddling(groups, split) == 0
    assert split["test"] == []
    totals = Counter(labels)
    for label, total in totals.items():
        val = sum(labels[i] == label for i in split["val"])
        assert abs(val - 0.3 * total) <= 5, (label, val, total)  # within one group's size


def test_grouped_split_is_seeded():
    groups = [i // 3 for i in range(300)]
    labels = [g % 2 for g in groups]
    first = grouped_split(labels, groups, 0.3, 0.1, seed=1)
    assert first == grouped_split(labels, groups, 0.3, 0.1, seed=1)
    assert first != grouped_split(labels, groups, 0.3, 0.1, seed=2)
    assert straddling(groups, first) == 0 and all(first.values())


def test_a_group_too_large_for_the_split_is_refused():
    labels = [0] * 10 + [1] * 10
    groups = [0] * 10 + list(range(1, 11))  # all Negatives are one group
    with pytest.raises(DataError, match=r"left no Negative image in (val|train).*group_distance"):
        grouped_split(labels, groups, 0.3, 0.0, seed=0)


# --- in the data module ----------------------------------------------------------------------


def test_grouped_split_keeps_near_duplicates_together(make_cfg, sample_root, tmp_path, caplog):
    root = tmp_path / "root"
    originals = {
        "Negative": sorted((sample_root / "Negative").iterdir())[:20],
        "Positive": sorted((sample_root / "Positive").iterdir())[:20],
    }
    for name, files in originals.items():
        for path in files:
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / path.name).write_bytes(path.read_bytes())
            shifted_copy(path, root / name / f"near_{path.name}")
    caplog.set_level("INFO", logger="crack_lightning.data.splits")
    dm = build(make_cfg(f"data.root={root}", "data.split=grouped").data)
    dm.setup("fit")
    side = {Path(dm.samples[i][0]).name: n for n, idx in dm.split.items() for i in idx}
    for files in originals.values():
        for path in files:
            assert side[path.name] == side[f"near_{path.name}"], path.name
    val = Counter(label for _, label in dm.split_samples("val"))
    assert val == {0: 12, 1: 12}  # 40 per class in pairs: 0.3 * 40 = 12
    assert "Grouped split: 80 images in 40 groups (largest 2" in caplog.text


def test_on_the_real_sample_grouping_stops_overlapping_crops_straddling(make_cfg, sample_root):
    leaks = {}
    for kind in ("random", "grouped"):
        dm = build(make_cfg(f"data.root={sample_root}", f"data.split={kind}").data)
        dm.setup("fit")
        side = {
            Path(dm.samples[i][0]).relative_to(sample_root).as_posix(): name
            for name, indices in dm.split.items()
            for i in indices
        }
        leaks[kind] = sum(side[a] != side[b] for a, b in OVERLAPPING)
        assert abs(len(dm.split["val"]) - 144) <= 2, kind
    assert leaks["grouped"] == 0
    assert leaks["random"] >= 1  # with seed 42, overlapping crops land on both sides


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.split=blocks", r"data.split=blocks must be one of random, grouped"),
        ("data.group_distance=-1", r"data.group_distance=-1 must be an integer in \[0, 16\]"),
    ],
)
def test_bad_split_settings_are_refused(make_cfg, sample_root, override, message):
    cfg = make_cfg(f"data.root={sample_root}", "data.split=grouped", override)
    with pytest.raises(DataError, match=message):
        check_train_settings(cfg)
        build(cfg.data)


def test_manifest_of_a_grouped_split_is_reproducible(make_cfg, sample_root, tmp_path):
    paths = []
    for run in ("a", "b"):
        dm = build(make_cfg(f"data.root={sample_root}", "data.split=grouped").data)
        dm.setup("fit")
        paths.append(tmp_path / f"{run}.csv")
        dm.write_manifest(paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert io.StringIO(paths[0].read_text()).readline().strip() == "source,path,label,split"


def test_seeds_move_groups_of_distinct_sizes_between_splits():
    """Ten photos of different crop counts (as SDNET2018's): each seed holds out other
    photos, so runs over several seeds test on most of them."""
    sizes = [60, 56, 66, 70, 9, 23, 35, 81, 73, 24]
    groups = [g for g, n in enumerate(sizes) for _ in range(2 * n)]
    labels = [i % 2 for i in range(len(groups))]
    tested = set()
    for seed in range(6):
        split = grouped_split(labels, groups, 0.2, 0.2, seed=seed)
        assert straddling(groups, split) == 0 and all(split.values())
        tested |= {groups[i] for i in split["test"]}
    assert len(tested) >= 6


def test_too_few_images_of_a_class_says_how_many_are_needed():
    from crack_lightning.data.splits import min_class_images, stratified_split

    # val 0.2 and test 0.1 of n images, rounded: one each needs n = 6 (round(0.5) is 0)
    assert min_class_images(0.2, 0.1) == 6
    assert min_class_images(0.2, 0.0) == 3
    labels = [0] * 10 + [1] * 5
    with pytest.raises(
        DataError, match=r"Positive has only 5 images.*at least 6 of each class \(add 1 more"
    ):
        stratified_split(labels, 0.2, 0.1, seed=0)
    stratified_split([0] * 10 + [1] * 6, 0.2, 0.1, seed=0)  # one more is enough
