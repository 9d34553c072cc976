"""Synthetic data: same layout as the real set, reproducible, and carrying a crack signal."""

from __future__ import annotations

import numpy as np
from PIL import Image

from crack_lightning.data.sources import scan_samples
from crack_lightning.data.synthetic import generate_dataset


def dark_line_share(path) -> float:
    """Share of pixels far darker than the image's median: cracks make many, pores few."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return float((grey < 0.75 * np.median(grey)).mean())


def test_layout_counts_and_labels(synthetic_root):
    samples = scan_samples(synthetic_root)
    assert [label for _, label in samples].count(0) == 24
    assert [label for _, label in samples].count(1) == 24
    assert Image.open(samples[0][0]).size == (64, 64)


def test_same_seed_same_images_and_second_call_reuses_them(tmp_path):
    a = generate_dataset(tmp_path / "a", images_per_class=3, image_size=48, seed=5)
    b = generate_dataset(tmp_path / "b", images_per_class=3, image_size=48, seed=5)
    c = generate_dataset(tmp_path / "c", images_per_class=3, image_size=48, seed=6)
    first = a / "Positive" / "00000.jpg"
    assert first.read_bytes() == (b / "Positive" / "00000.jpg").read_bytes()
    assert first.read_bytes() != (c / "Positive" / "00000.jpg").read_bytes()
    stamp = first.stat().st_mtime_ns
    generate_dataset(tmp_path / "a", images_per_class=3, image_size=48, seed=5)
    assert first.stat().st_mtime_ns == stamp
    assert not (tmp_path / "a.partial").exists()


def test_every_positive_has_a_crack_and_negatives_do_not(synthetic_root):
    positives = [dark_line_share(p) for p in sorted((synthetic_root / "Positive").iterdir())]
    negatives = [dark_line_share(p) for p in sorted((synthetic_root / "Negative").iterdir())]
    assert min(positives) > max(negatives)
