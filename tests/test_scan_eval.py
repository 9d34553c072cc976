"""Whole-photo scores (crack-scan-eval over folders, evaluation/scan_masks.py): exact
figures on hand-made photos and masks, scored by a model whose P(crack) is a patch's
brightness, per photo, per folder (micro) and pooled; the summary as CSV, Markdown and
TensorBoard scalars. The end-of-training scan is tested in test_adapt.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crack_lightning.inference.classifiers import LoadedModel

TILE = 64
# P(crack) of a uniform tile is its grey level / 255 (BrightnessNetwork)
LEVELS = {0.9: 230, 0.8: 204, 0.4: 102, 0.3: 77, 0.2: 51, 0.15: 38, 0.1: 26, 0.05: 13}


class BrightnessNetwork:
    """P(crack) = the patch's mean brightness: figures that can be worked out by hand."""

    device = torch.device("cpu")  # where it runs, as every network says

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return images.float().mean(dim=(1, 2, 3)).numpy() / 255


def brightness_model() -> LoadedModel:
    return LoadedModel("brightness", BrightnessNetwork(), TILE, 0.5, None, "test model")


def photo(folder: Path, name: str, probs: list[float], cracked: list[bool]) -> Path:
    """A 128x128 photo of 4 uniform 64 px tiles (row by row) with P(crack) probs, and its
    mask with an 8x8 crack (1.6% of a tile) in the tiles marked cracked."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((2 * TILE, 2 * TILE, 3), dtype=np.uint8)
    mask = np.zeros((2 * TILE, 2 * TILE), dtype=np.uint8)
    for index, (prob, crack) in enumerate(zip(probs, cracked, strict=True)):
        y, x = divmod(index, 2)
        pixels[y * TILE : (y + 1) * TILE, x * TILE : (x + 1) * TILE] = LEVELS[prob]
        if crack:
            mask[y * TILE + 20 : y * TILE + 28, x * TILE + 20 : x * TILE + 28] = 255
    path = folder / f"{name}.png"
    Image.fromarray(pixels).save(path)
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return path


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Folder a: one photo, TP FP FN TN; folder b: one photo, one crack missed."""
    a, b = tmp_path / "a", tmp_path / "b"
    photo(a, "wall", [0.9, 0.8, 0.3, 0.1], [True, False, True, False])
    photo(b, "deck", [0.4, 0.2, 0.15, 0.05], [False, True, False, False])
    return a, b


def run_scan_eval(monkeypatch, *args: str) -> int:
    from crack_lightning.commands import scan_eval

    monkeypatch.setattr(scan_eval, "load_classifier", lambda path, device: brightness_model())
    return scan_eval.main(
        ["ckpt_path=unused.ckpt", "scan.patch_size=64", "scan.stride=64", "threshold=0.5", *args]
    )


def test_scan_eval_figures_per_folder_worked_out_by_hand(monkeypatch, two_folders, tmp_path):
    a, b = two_folders
    out, logs = tmp_path / "out", tmp_path / "tb"
    photos = f"photos=[{a},{b},{a / 'wall.png'}]"
    assert run_scan_eval(monkeypatch, photos, f"out={out}", f"log_dir={logs}") == 0
    with (out / "scan_summary.csv").open() as handle:
        rows = {row["folder"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["a", "b", "wall.png", "all"]
    # a: tiles 0.9 (crack, found), 0.8 (false alarm), 0.3 (crack, missed), 0.1
    assert [rows["a"][k] for k in ("photos", "patches", "cracked_patches")] == ["1", "4", "2"]
    assert (rows["a"]["found_patches"], rows["a"]["false_alarms"]) == ("1", "1")
    figures = {k: float(rows["a"][k]) for k in ("precision", "recall", "f1", "auroc")}
    # ROC-AUC: of the 4 (crack, clean) pairs, 3 ranked right (0.3 < 0.8 is the wrong one)
    assert figures == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "auroc": 0.75})
    # b: nothing called cracked, its one crack (0.2) missed; it outranks 0.15 and 0.05
    b_figures = {k: float(rows["b"][k]) for k in ("precision", "recall", "f1", "auroc")}
    assert b_figures == pytest.approx({"precision": 0, "recall": 0, "f1": 0, "auroc": 2 / 3})
    # the photo given alone is its own row, scanned once
    assert [rows["wall.png"][k] for k in ("patches", "f1")] == ["4", rows["a"]["f1"]]
    # micro over every photo once: TP 1, FP 1, FN 2; pooled ROC-AUC from the 8 patches'
    # ranks: 0.9 outranks the 5 clean ones, 0.3 and 0.2 three each
    everything = {k: float(rows["all"][k]) for k in ("precision", "recall", "f1", "auroc")}
    assert [rows["all"][k] for k in ("photos", "patches", "cracked_patches")] == ["2", "8", "3"]
    assert everything == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / (2 + 1 + 2), "auroc": 11 / 15}
    )
    # the per-photo report and the Markdown table say the same
    report = json.loads((out / "scan_eval.json").read_text())
    assert report["wall.png"]["f1"] == pytest.approx(0.5)
    assert report["deck.png"]["found_patches"] == 0
    table = (out / "scan_summary.md").read_text()
    assert "| a | 1 | 4 | 2 | 1 | 1 | 0.5000 | 0.5000 | 0.5000 | 0.7500 |" in table
    # TensorBoard: one scalar per item and figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    assert {"scan_eval/a/f1", "scan_eval/b/auroc", "scan_eval/all/recall"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Scalars("scan_eval/a/precision")[0].value == pytest.approx(0.5)


def test_a_folder_without_photos_is_one_error_line(monkeypatch, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "wall_mask.png").write_bytes(b"")  # a mask alone is no photo
    assert run_scan_eval(monkeypatch, f"photos=[{empty}]", f"out={tmp_path / 'out'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"folder {empty} holds no photos" in err[0]
    assert not (tmp_path / "out").exists()


# --- crack maps: pixel figures beside the patch figures ---------------------------------


def mapped_result(path: str, crack_map: np.ndarray, threshold: float = 0.5):
    """A scan of one whole-photo patch that carries a crack map, as a segmenter's does."""
    from crack_lightning.inference.scan import ScanResult

    height, width = crack_map.shape
    return ScanResult(
        path=Path(path),
        width=width,
        height=height,
        patch_size=min(width, height),
        boxes=np.array([(0, 0)]),
        probs=np.array([float(crack_map.max())]),
        threshold=threshold,
        name=Path(path).stem,
        crack_map=crack_map.astype(np.float32),
    )


def test_pixel_scores_of_a_hand_made_map_per_photo_and_pooled(tmp_path):
    from crack_lightning.evaluation.scan_masks import (
        format_scores,
        pixel_scores,
        score_groups,
        write_scan_summary,
    )

    # photo one: the mask's crack is row 10, x 0..39; the map draws it 2 px lower (0.7)
    # over x 0..19 only, and a false alarm (0.9) at row 3, x 30..34; a 0.4 line above
    # the threshold's reach at row 18 (never a crack)
    masks = {"one.png": np.zeros((20, 40), dtype=bool), "two.png": np.zeros((20, 40), dtype=bool)}
    masks["one.png"][10, :] = True
    first = np.zeros((20, 40))
    first[12, :20] = 0.7
    first[3, 30:35] = 0.9
    first[18, :] = 0.4
    # photo two: a clean surface, and a map with nothing above the threshold
    second = np.full((20, 40), 0.3)
    results = [mapped_result("one.png", first), mapped_result("two.png", second)]
    # within 2 px: the 20 drawn pixels are right, the 5 false alarms not; of the 40 crack
    # pixels, x 0..21 lie within 2 px of the drawn ones (x 20 and 21 diagonally: 2 rows,
    # then sqrt(5) > 2 for x 21: only x 0..20 are found)
    one = pixel_scores(results[0], masks["one.png"], 2.0)
    assert (one["predicted_pixels"], one["matched_pixels"]) == (25, 20)
    assert (one["crack_pixels"], one["found_pixels"]) == (40, 20)
    assert one["pixel_precision"] == pytest.approx(20 / 25)
    assert one["pixel_recall"] == pytest.approx(20 / 40)
    assert one["pixel_f1"] == pytest.approx(2 * 0.8 * 0.5 / 1.3)
    # at tolerance 3 the crack row is 2 px from the drawn one (x 0..19) and x 20, 21 are
    # sqrt(5), sqrt(8) away: found 22
    assert pixel_scores(results[0], masks["one.png"], 3.0)["found_pixels"] == 22
    two = pixel_scores(results[1], masks["two.png"], 2.0)
    assert (two["pixel_precision"], two["pixel_recall"], two["pixel_f1"]) == (None, None, None)
    # a classifier's scan has no map, and no pixel figures
    plain = mapped_result("one.png", first)
    plain.crack_map = None
    assert pixel_scores(plain, masks["one.png"]) is None

    groups = [("both", [Path("one.png"), Path("two.png")]), ("two", [Path("two.png")])]
    report, rows = score_groups(
        groups, results, 0.01, lambda path, size: masks[path.name], pixel_tolerance=2.0
    )
    assert report["one.png"]["pixel_recall"] == pytest.approx(0.5)
    assert report["one.png"]["patches"] == 1  # the patch figures stay beside them
    assert report["two.png"]["pixel_precision"] is None
    # pooled: the counts add (the clean photo adds nothing to either side)
    both, clean, everything = rows
    assert (both["mapped_photos"], both["predicted_pixels"], both["found_pixels"]) == (2, 25, 20)
    assert both["pixel_precision"] == pytest.approx(0.8)
    assert both["pixel_f1"] == pytest.approx(one["pixel_f1"])
    assert (clean["pixel_precision"], clean["pixel_recall"], clean["pixel_f1"]) == (None,) * 3
    assert everything["folder"] == "all" and everything["crack_pixels"] == 40

    summary = write_scan_summary(tmp_path, report, rows, 0.5, pixel_tolerance=2.0)
    assert summary.startswith("threshold 0.5, pixels within 2.0 px\n")
    # patches: one's found, two's rightly clear (ROC-AUC 1); then P, R and F1 of pixels
    pixel_f1 = f"{2 * 0.8 * 0.5 / 1.3:.4f}"
    patches = "| both | 2 | 2 | 1 | 1 | 0 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |"
    row = f"{patches} 0.8000 | 0.5000 | {pixel_f1} |"
    assert row in summary
    with (tmp_path / "scan_summary.csv").open() as handle:
        table = {row["folder"]: row for row in csv.DictReader(handle)}
    assert float(table["both"]["pixel_recall"]) == pytest.approx(0.5)
    assert table["two"]["pixel_f1"] == "" and table["two"]["crack_pixels"] == "0"
    printed = format_scores(report).splitlines()
    assert printed[0].split()[-3:] == ["pixel_precision", "pixel_recall", "pixel_f1"]
    assert printed[2].split()[-3:] == ["n/a", "n/a", "n/a"]


def with_brightness_maps(scan_files):
    """scan_files whose results carry a crack map: each pixel's brightness / 255."""

    def scan(*args, **kwargs):
        for result in scan_files(*args, **kwargs):
            grey = np.asarray(Image.open(result.path).convert("L"), dtype=np.float32)
            result.crack_map = grey / 255
            yield result

    return scan


def test_scan_eval_scores_a_maps_pixels_beside_its_patches(monkeypatch, two_folders, tmp_path):
    from crack_lightning.commands import scan_eval

    a, b = two_folders
    monkeypatch.setattr(scan_eval, "scan_files", with_brightness_maps(scan_eval.scan_files))
    out = tmp_path / "out"
    assert run_scan_eval(monkeypatch, f"photos=[{a},{b}]", f"out={out}") == 0
    report = json.loads((out / "scan_eval.json").read_text())
    wall, deck = report["wall.png"], report["deck.png"]
    # wall: tiles 0.9 and 0.8 are above 0.5, 2 x 64 x 64 pixels; its mask's 8 x 8 cracks
    # sit in tiles 0 and 2. Within 2 px of the square in tile 0: its 12 x 12 border less
    # 3 pixels at each corner (sqrt(5), sqrt(5), sqrt(8) away): 132 right
    assert (wall["predicted_pixels"], wall["matched_pixels"]) == (2 * 64 * 64, 132)
    assert (wall["crack_pixels"], wall["found_pixels"]) == (128, 64)
    assert wall["pixel_precision"] == pytest.approx(132 / 8192)
    assert wall["pixel_recall"] == 0.5
    assert wall["f1"] == pytest.approx(0.5)  # the patch figures as before
    # deck: nothing above 0.5, its crack missed
    assert (deck["pixel_precision"], deck["pixel_recall"], deck["pixel_f1"]) == (None, 0.0, 0.0)
    with (out / "scan_summary.csv").open() as handle:
        rows = {row["folder"]: row for row in csv.DictReader(handle)}
    precision, recall = 132 / 8192, 64 / 192
    assert float(rows["all"]["pixel_precision"]) == pytest.approx(precision)
    assert float(rows["all"]["pixel_recall"]) == pytest.approx(recall)
    assert float(rows["all"]["pixel_f1"]) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )
    assert "pixels within 2.0 px" in (out / "scan_summary.md").read_text()
    # pixel_tolerance=0: a pixel is right only on the crack itself
    assert run_scan_eval(monkeypatch, f"photos=[{a}]", f"out={out}", "pixel_tolerance=0") == 0
    exact = json.loads((out / "scan_eval.json").read_text())["wall.png"]
    assert exact["pixel_precision"] == pytest.approx(64 / 8192)


def test_a_classifiers_scan_has_no_pixel_columns(monkeypatch, two_folders, tmp_path, capsys):
    a, _ = two_folders
    out = tmp_path / "out"
    assert run_scan_eval(monkeypatch, f"photos=[{a}]", f"out={out}") == 0
    with (out / "scan_summary.csv").open() as handle:
        assert next(csv.reader(handle))[-1] == "auroc"
    assert "pixel_f1" not in json.loads((out / "scan_eval.json").read_text())["wall.png"]
    assert "pixel" not in capsys.readouterr().out


def test_a_negative_pixel_tolerance_is_one_error_line(monkeypatch, two_folders, tmp_path, capsys):
    a, _ = two_folders
    args = [f"photos=[{a}]", f"out={tmp_path / 'out'}", "pixel_tolerance=-1"]
    assert run_scan_eval(monkeypatch, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: pixel_tolerance=-1.0 must be a distance in pixels >= 0."]
