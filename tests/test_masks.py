"""Crack masks (data/masks.py): tile labels from a mask, masks scaled to their photo, bad
masks named in one line, and crack-scan-eval's report valid JSON whatever the mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_lightning.data.masks import CRACK, IGNORE, NOT_CRACK, load_mask, tile_is_crack

from .conftest import QUIET, SHARED, SMALL, compose_config, shared_path

PHOTOS = SHARED / "data" / "photos"


def test_tile_labels_from_a_hand_made_mask():
    mask = np.zeros((4, 12), dtype=bool)
    mask[:, 0] = True  # 4 of the first tile's 16 pixels
    mask[0, 4] = True  # 1 of the second's
    mask[:, 8:] = True  # the whole third
    boxes = np.array([(0, 0), (4, 0), (8, 0)])
    labels = tile_is_crack(mask, boxes, tile_size=4, min_share=0.25)
    assert labels.tolist() == [CRACK, NOT_CRACK, CRACK]
    # a tile reaching past the edge is judged on its part inside the mask
    assert tile_is_crack(mask, np.array([(10, 2)]), 4, min_share=1.0).tolist() == [CRACK]
    # an ambiguous band: some crack, but less than min_share, is neither
    banded = tile_is_crack(mask, boxes, tile_size=4, min_share=0.25, ambiguous=(0.0, 0.25))
    assert banded.tolist() == [CRACK, IGNORE, CRACK]
    # an empty mask gives only not-crack tiles
    assert not tile_is_crack(np.zeros((4, 12)), boxes, 4, min_share=0.01).any()


def test_a_smaller_mask_of_the_photos_shape_is_scaled_up():
    """../shared's 768x768 photos have 256x256 masks: each mask pixel covers 3x3."""
    photo = shared_path(PHOTOS / "crackconcrete_004.png")
    with Image.open(photo.with_name("crackconcrete_004_mask.png")) as small:
        crack = np.asarray(small.convert("L")) > 127
    mask = load_mask(photo, (768, 768))
    assert mask.shape == (768, 768) and crack.any()
    assert np.array_equal(mask, crack.repeat(3, axis=0).repeat(3, axis=1))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, synthetic_root) -> Path:
    """A random-init mobilenetv3_small trained one epoch on tiny synthetic images: scans
    fast; what it predicts does not matter here."""
    from crack_lightning.training.run import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    overrides = [f"paths.output_dir={run_dir}", f"data.root={synthetic_root}", "logger=none"]
    train(compose_config("train", [*overrides, *QUIET, *SMALL]))
    return run_dir / "checkpoints" / "best.ckpt"


def scan_eval(ckpt: Path, photo: Path, out: Path) -> int:
    from crack_lightning.commands.scan_eval import main

    return main(
        [f"ckpt_path={ckpt}", f"photos=[{photo}]", f"out={out}", "scan.stride=181", "device=cpu"]
    )


def photo_with_mask(folder: Path, mask: Image.Image | bytes | None) -> tuple[Path, Path]:
    """A copy of a real 768x768 photo in `folder` with the given mask file beside it."""
    photo = folder / "wall.png"
    photo.write_bytes(shared_path(PHOTOS / "crackconcrete_004.png").read_bytes())
    path = folder / "wall_mask.png"
    if isinstance(mask, bytes):
        path.write_bytes(mask)
    elif mask is not None:
        mask.save(path)
    return photo, path


def test_an_all_black_mask_gives_valid_json_with_null_where_undefined(tiny_ckpt, tmp_path, capsys):
    photo, _ = photo_with_mask(tmp_path, Image.new("L", (768, 768), 0))
    assert scan_eval(tiny_ckpt, photo, tmp_path / "out") == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in scan_eval.json")

    text = (tmp_path / "out" / "scan_eval.json").read_text()
    scores = json.loads(text, parse_constant=refuse)["wall.png"]
    assert scores["patches"] == 16 and scores["cracked_patches"] == 0
    assert scores["auroc"] is None  # one class only: undefined
    assert all(value is not None for name, value in scores.items() if name != "auroc")
    printed = capsys.readouterr().out
    assert "NaN" not in printed and "nan" not in printed
    (line,) = [line for line in printed.splitlines() if line.startswith("wall.png ")]
    assert line.split()[-1] == "n/a"  # the photo's ROC-AUC
    assert printed.splitlines()[-1].endswith("| n/a |")  # and its folder's in the summary


def colour_photo() -> Image.Image:
    with Image.open(shared_path(SHARED / "data" / "masked" / "crackforest" / "cfd_001.jpg")) as im:
        return im.convert("RGB").resize((768, 768))


@pytest.mark.parametrize(
    ("case", "mask", "expected"),
    [
        (
            "another aspect ratio",
            lambda: Image.new("L", (100, 400), 0),
            "Crack mask {mask} is 100x400 but its photo {photo} is 768x768",
        ),
        ("not an image", lambda: b"not a PNG", "Crack mask {mask} (of {photo}) cannot be read"),
        ("a colour photo", colour_photo, "Crack mask {mask} (of {photo}) is in colour"),
        (
            "a grey photo",
            lambda: Image.open(shared_path(PHOTOS / "crackconcrete_004.png")).convert("L"),
            "Crack mask {mask} (of {photo}) has ",
        ),
        ("missing", lambda: None, "No crack mask for {photo}: expected {mask}"),
    ],
)
def test_a_bad_mask_is_one_error_line_naming_it(tiny_ckpt, tmp_path, capsys, case, mask, expected):
    photo, path = photo_with_mask(tmp_path, mask())
    assert scan_eval(tiny_ckpt, photo, tmp_path / "out") == 2, case
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: " + expected.format(mask=path, photo=photo)), lines[0]
    assert not (tmp_path / "out" / "scan_eval.json").exists()


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "I;16"])
def test_black_and_white_masks_of_any_mode_read_the_same(tmp_path, mode):
    crack = np.zeros((30, 20), dtype=bool)
    crack[:, 5] = crack[10, :] = True
    photo = tmp_path / "wall.jpg"
    grey = Image.fromarray(crack.astype(np.uint8) * 255)
    if mode == "I;16":
        grey = Image.fromarray(crack.astype(np.uint16) * 65535)
    else:
        grey = grey.convert(mode)
    grey.save(tmp_path / "wall_mask.png")
    # on a photo twice its size: scaled up, not refused
    assert np.array_equal(load_mask(photo, (20, 30)), crack)
    assert np.array_equal(load_mask(photo, (40, 60)), crack.repeat(2, axis=0).repeat(2, axis=1))


def test_a_mask_within_a_pixel_of_the_photos_aspect_ratio_is_scaled(tmp_path):
    """A 1000x667 photo and its 300x200 mask (rounding) fit; 300x220 does not."""
    from crack_lightning.errors import DataError

    photo = tmp_path / "wall.jpg"
    Image.new("L", (300, 200), 255).save(tmp_path / "wall_mask.png")
    assert load_mask(photo, (1000, 667)).all()
    Image.new("L", (300, 220), 255).save(tmp_path / "wall_mask.png")
    with pytest.raises(DataError, match="is 300x220 but its photo .* is 1000x667"):
        load_mask(photo, (1000, 667))
