"""A crack map's adaptation to a few masked photos: every photo trains, and the epochs and
threshold are chosen by leaving each photo out in turn (training/leave_one_out.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from crack_lightning.training.leave_one_out import choose

from .test_masks_source import spec

CRACK_COLUMN, JOINT_COLUMN = 20, 40


def write_site_photo(folder: Path, name: str) -> Path:
    """A 64 px grey photo whose mask marks a 2 px crack at CRACK_COLUMN."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, CRACK_COLUMN : CRACK_COLUMN + 2] = 255
    Image.fromarray(mask, mode="L").save(folder / f"{name}_mask.png")
    return folder / f"{name}.png"


def lines(crack: float, joint: float) -> np.ndarray:
    """An 8-bit map: P(crack) `crack` on the crack, `joint` on a joint 20 px beside it."""
    crack_map = np.zeros((64, 64), dtype=np.float32)
    crack_map[:, CRACK_COLUMN : CRACK_COLUMN + 2] = crack
    crack_map[:, JOINT_COLUMN : JOINT_COLUMN + 2] = joint
    return np.round(crack_map * 255).astype(np.uint8)


def test_the_left_out_photos_choose_the_fewest_epochs_and_the_threshold_nearest_half(tmp_path):
    """By hand: init_from marks crack and joint at 0.6 (pixel F1 at 0.5: P 1/2, R 1 ->
    2/3; tiles of 32 px: 2 cracked of 4 per photo, 2 false alarms). After one epoch the
    crack is at 0.35 and the joint at 0.15: thresholds 0.2 and 0.3 find the crack alone
    (F1 1); after two, 0.8 and 0.45: 0.5 to 0.8 do. The best F1 with the fewest epochs is
    epoch 1, and of its thresholds the one nearest 0.5: 0.3."""
    root = tmp_path / "site"
    photos = [write_site_photo(root, name) for name in ("a", "b")]
    maps = {photo: [lines(0.6, 0.6), lines(0.35, 0.15), lines(0.8, 0.45)] for photo in photos}
    choice = choose(maps, spec(root, "tile_size=32", "stride=32"), 2, start_threshold=0.5)
    assert (choice.epochs, choice.threshold) == (1, 0.3)
    assert choice.pixel_f1 == 1.0 and choice.before_f1 == 2 / 3
    row = next(line for line in choice.table.splitlines() if line.startswith("tiles |"))
    # tile P, R, F1, pixel F1: before (init_from at 0.5) -> after (epoch 1 at 0.3)
    assert row == "tiles | 2 | 0.500 -> 1.000 | 1.000 -> 1.000 | 0.667 -> 1.000 | 0.667 -> 1.000"


def test_init_from_itself_is_chosen_where_no_epoch_maps_the_left_out_photos_better(tmp_path):
    """Epoch 0 is init_from: its crack at 0.8 and joint at 0.3 give F1 1 from 0.4 to 0.8,
    while training blurred them both to 0.4 (F1 2/3 at best): no epoch is trained, and
    of init_from's thresholds the one nearest 0.5 is kept."""
    root = tmp_path / "site"
    photos = [write_site_photo(root, name) for name in ("a", "b")]
    maps = {photo: [lines(0.8, 0.3), lines(0.4, 0.4)] for photo in photos}
    choice = choose(maps, spec(root, "tile_size=32", "stride=32"), 1, start_threshold=0.9)
    assert (choice.epochs, choice.threshold, choice.pixel_f1) == (0, 0.5, 1.0)
    assert choice.before_f1 == 0.0  # init_from at its own 0.9 finds nothing
