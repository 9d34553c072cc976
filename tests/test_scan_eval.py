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
