"""predict.py: classify, evaluate, visualise and scan, on real images and on bad input."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_lightning.commands.predict import run
from crack_lightning.data.decode import load_rgb
from crack_lightning.errors import PredictionError

from .conftest import ROOT, run_python


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def true_label(path: str) -> str:
    return Path(path).parent.name


def first_image(sample_root: Path, cls: str, index: int = 0) -> Path:
    return sorted((sample_root / cls).iterdir())[index]


def test_predict_writes_one_row_per_image_and_is_accurate(predict_cfg, sample_root, tmp_path):
    output = tmp_path / "preds.csv"
    summary = run(predict_cfg(f"inputs=[{sample_root}]", f"output={output}"))
    rows = read_csv(output)
    assert len(rows) == summary["classified"] == 481
    assert set(rows[0]) == {"path", "label", "prob_crack", "true_label"}
    assert all(
        row["label"] == ("Positive" if float(row["prob_crack"]) >= 0.5 else "Negative")
        for row in rows
    )
    accuracy = np.mean([row["label"] == true_label(row["path"]) for row in rows])
    print(f"accuracy on the 481 sample images: {accuracy:.4f}")
    assert accuracy >= 0.95


def test_eval_report_matches_a_hand_computation(predict_cfg, sample_root, tmp_path):
    output = tmp_path / "preds.csv"
    run(
        predict_cfg(
            f"inputs=[{sample_root}]",
            f"output={output}",
            "mode=eval",
            f"report_dir={tmp_path / 'report'}",
        )
    )
    rows = read_csv(output)
    truth = np.array([true_label(r["path"]) == "Positive" for r in rows])
    probs = np.array([float(r["prob_crack"]) for r in rows])
    pred = probs >= 0.5
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
    # ROC-AUC = P(score of a random positive > score of a random negative), ties count half
    pos, neg = probs[truth][:, None], probs[~truth][None, :]
    auc = float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["confusion_matrix"]["counts"] == [[tn, fp], [fn, tp]]
    assert metrics["accuracy"] == pytest.approx((tp + tn) / len(rows))
    assert metrics["precision"] == pytest.approx(tp / (tp + fp))
    assert metrics["recall"] == pytest.approx(tp / (tp + fn))
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert metrics["roc_auc"] == pytest.approx(auc, abs=1e-4)  # CSV probabilities are rounded
    negative = metrics["classification_report"]["Negative"]
    assert negative["precision"] == pytest.approx(tn / (tn + fn))
    assert negative["recall"] == pytest.approx(tn / (tn + fp))
    assert negative["support"] == tn + fp == 240
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png"):
        assert Image.open(tmp_path / "report" / name).size[0] >= 300
    assert "macro avg" in (tmp_path / "report" / "report.txt").read_text()


def test_eval_refuses_images_outside_class_folders(predict_cfg, sample_root, tmp_path):
    loose = tmp_path / "photo.jpg"
    Image.open(first_image(sample_root, "Positive")).save(loose)
    with pytest.raises(PredictionError, match="mode=eval needs every image inside"):
        run(predict_cfg(f"inputs=[{loose}]", "mode=eval"))


def make_awkward_inputs(sample_root: Path, folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Real crack images in every format and mode a user may have, and broken files."""
    folder.mkdir()
    crack = Image.open(first_image(sample_root, "Positive")).convert("RGB")
    good = {
        "png": ("crack.png", crack),
        "bmp": ("crack.bmp", crack),
        "tiff": ("crack.tiff", crack),
        "webp": ("crack.webp", crack),
        "grey": ("grey.jpg", crack.convert("L")),
        "rgba": ("rgba.png", crack.convert("RGBA")),
        "palette": ("palette.png", crack.convert("P")),
        "cmyk": ("cmyk.jpg", crack.convert("CMYK")),
        "huge": ("huge.jpg", crack.resize((6000, 4500))),
    }
    paths = {}
    for key, (name, image) in good.items():
        image.save(folder / name)
        paths[key] = folder / name
    grey16 = np.asarray(crack.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(folder / "grey16.png")
    paths["grey16"] = folder / "grey16.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    crack.transpose(Image.Transpose.ROTATE_90).save(folder / "exif.jpg", exif=exif)
    paths["exif"] = folder / "exif.jpg"

    jpeg = first_image(sample_root, "Negative").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("inspection notes, not a photo")
    bad = {
        "truncated.jpg": "corrupt or truncated",
        "empty.jpg": "empty file",
        "notes.jpg": "not an image",
    }
    return paths, bad


def test_awkward_inputs_are_classified_and_broken_ones_skipped_with_reasons(
    predict_cfg, sample_root, tmp_path, capsys
):
    good, bad = make_awkward_inputs(sample_root, tmp_path / "in")
    output = tmp_path / "preds.json"
    summary = run(predict_cfg(f"inputs=[{tmp_path / 'in'}]", f"output={output}"))
    rows = json.loads(output.read_text())
    assert {Path(r["path"]).name for r in rows} == {p.name for p in good.values()}
    assert summary == {
        "classified": len(good),
        "skipped": 3,
        "positive": summary["positive"],
        "output": str(output),
    }
    # every variant shows the same crack; all but the squashed huge one are confidently positive
    assert all(r["label"] == "Positive" for r in rows if "huge" not in r["path"])
    errors = capsys.readouterr().err
    for name, reason in bad.items():
        assert f"{name}: {reason}" in errors


def test_image_modes_are_converted_faithfully(sample_root, tmp_path):
    good, _ = make_awkward_inputs(sample_root, tmp_path / "in")
    reference = np.asarray(load_rgb(good["png"]), dtype=np.int16)
    grey = np.asarray(load_rgb(good["png"]).convert("L"), dtype=np.int16)
    assert np.abs(np.asarray(load_rgb(good["grey16"]), dtype=np.int16)[..., 0] - grey).max() <= 1
    assert np.abs(np.asarray(load_rgb(good["exif"]), dtype=np.int16) - reference).mean() < 3
    assert np.asarray(load_rgb(good["rgba"])).shape == reference.shape
    assert np.abs(np.asarray(load_rgb(good["cmyk"]), dtype=np.int16) - reference).mean() < 8


def test_visualize_saves_a_grid_of_the_inputs(predict_cfg, sample_root, tmp_path):
    inputs = [
        first_image(sample_root, cls, i) for cls in ("Positive", "Negative") for i in range(5)
    ]
    summary = run(
        predict_cfg(
            f"inputs=[{','.join(map(str, inputs))}]", "visualize=true", f"report_dir={tmp_path}"
        )
    )
    grid = Image.open(summary["grid"])
    assert grid.size == (8 * 160, 2 * 180)  # 10 images: 8 columns, 2 rows


def test_globs_and_files_are_expanded_once(predict_cfg, sample_root, tmp_path):
    one = first_image(sample_root, "Positive")
    pattern = str(sample_root / "Positive" / "0000*.jpg")
    output = tmp_path / "p.csv"
    run(predict_cfg(f"inputs=[{one},'{pattern}']", f"output={output}"))
    expected = {str(p) for p in sorted((sample_root / "Positive").glob("0000*.jpg"))} | {str(one)}
    rows = read_csv(output)
    assert [r["path"] for r in rows].count(str(one)) == 1
    assert {r["path"] for r in rows} == expected


def run_predict_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python(str(ROOT / "predict.py"), *args, timeout=300)


def test_cli_exits_non_zero_when_nothing_can_be_classified(trained_run, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a photo")
    (tmp_path / "empty_dir").mkdir()
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    result = run_predict_cli(
        f"ckpt_path={ckpt}",
        f"inputs=[{tmp_path}]",
        f"paths.output_dir={tmp_path / 'out'}",
        "num_workers=0",
    )
    assert result.returncode == 2
    assert "notes.jpg: not an image" in result.stderr
    assert "error: No input could be classified" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_predict_cli(
        f"ckpt_path={ckpt}",
        f"inputs=[{tmp_path / 'empty_dir'}]",
        f"paths.output_dir={tmp_path / 'out2'}",
    )
    assert result.returncode == 2
    assert "the folder holds no images" in result.stderr and "name no image files" in result.stderr


LIGHTNING_PROBE = """
import atexit, sys
atexit.register(lambda: print(
    "lightning modules:",
    sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")),
))
sys.argv = ["predict.py", *sys.argv[1:]]
from crack_lightning.commands.predict import predict
predict()
"""


@pytest.mark.parametrize("mode", ["predict", "scan"])
def test_predict_and_scan_run_without_importing_lightning(trained_run, sample_root, tmp_path, mode):
    """Prediction builds the network from the checkpoint in plain torch: a whole predict
    or scan run, in its own process, never imports Lightning."""
    photo = first_image(sample_root, "Positive")
    result = run_python(
        "-c",
        LIGHTNING_PROBE,
        f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
        f"inputs=[{photo}]",
        f"mode={mode}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"output={tmp_path / 'preds.csv'}",
        f"report_dir={tmp_path / 'scan'}",
        "num_workers=0",
        "progress=false",
    )
    assert result.returncode == 0, result.stderr
    written = tmp_path / ("preds.csv" if mode == "predict" else "scan")
    assert written.exists() and (mode == "scan" or len(read_csv(written)) == 1)
    assert "lightning modules: []" in result.stdout


def test_the_prediction_commands_import_no_lightning():
    code = (
        "import sys, crack_lightning.commands.predict, crack_lightning.commands.scan_eval; "
        "print('lightning' in sys.modules)"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_missing_or_foreign_checkpoint_is_a_clear_error(predict_cfg, sample_root, backbone_weights):
    with pytest.raises(PredictionError, match="ckpt_path=.*missing.ckpt does not exist"):
        run(predict_cfg("ckpt_path=/nowhere/missing.ckpt", f"inputs=[{sample_root}]"))
    with pytest.raises(PredictionError, match="is not a training checkpoint of this framework"):
        run(predict_cfg(f"ckpt_path={backbone_weights}", f"inputs=[{sample_root}]"))


# --- scan ----------------------------------------------------------------------------------

CRACKED_TILES = {(1, 0), (4, 1), (3, 2), (0, 3)}  # (column, row) in a 5 x 4 mosaic


def test_scan_finds_the_cracked_tiles_of_an_assembled_photo(
    predict_cfg, sample_root, tmp_path, caplog
):
    positives = sorted((sample_root / "Positive").iterdir())
    negatives = sorted((sample_root / "Negative").iterdir())
    photo = Image.new("RGB", (5 * 227, 4 * 227))
    for row in range(4):
        for col in range(5):
            source = positives if (col, row) in CRACKED_TILES else negatives
            photo.paste(Image.open(source[row * 5 + col]), (col * 227, row * 227))
    photo.save(tmp_path / "wall.png")

    with caplog.at_level(logging.WARNING):
        summary = run(
            predict_cfg(
                f"inputs=[{tmp_path / 'wall.png'}]", "mode=scan", f"report_dir={tmp_path / 'scan'}"
            )
        )
    rows = read_csv(tmp_path / "scan" / "wall_scan.csv")
    assert len(rows) == 20
    assert set(rows[0]) == {"x", "y", "width", "height", "prob_crack", "unfamiliar", "label"}
    assert all(r["unfamiliar"] == "" for r in rows)  # this checkpoint has no feature statistics
    assert "no unfamiliar score: the checkpoint holds no feature statistics" in caplog.text
    assert "callbacks.feature_stats" in caplog.text  # and how to get them
    probs = {(int(r["x"]) // 227, int(r["y"]) // 227): float(r["prob_crack"]) for r in rows}
    cracked = [probs[t] for t in CRACKED_TILES]
    clean = [p for t, p in probs.items() if t not in CRACKED_TILES]
    assert min(cracked) > max(clean)  # the known cracked tiles rank highest
    flagged = sum(p >= 0.5 for p in probs.values())
    assert flagged >= 3 and all(p < 0.5 for p in clean)
    assert summary["photos"][0]["cracked_patches"] == flagged
    assert summary["photos"][0]["cracked_area_share"] == pytest.approx(flagged / 20)
    assert Image.open(tmp_path / "scan" / "wall_scan.png").size == photo.size


def test_scan_with_overlap_covers_the_far_edges(predict_cfg, sample_root, tmp_path):
    Image.open(first_image(sample_root, "Negative")).resize((500, 300)).save(tmp_path / "p.jpg")
    run(
        predict_cfg(
            f"inputs=[{tmp_path / 'p.jpg'}]",
            "mode=scan",
            "scan.stride=150",
            f"report_dir={tmp_path}",
        )
    )
    rows = read_csv(tmp_path / "p_scan.csv")
    xs = sorted({int(r["x"]) for r in rows})
    ys = sorted({int(r["y"]) for r in rows})
    assert xs == [0, 150, 273] and ys == [0, 73]  # the last window sits flush with the edge


def test_workers_classify_and_scan_as_the_main_process_does(
    trained_run, sample_root, tmp_path, monkeypatch
):
    from crack_lightning.inference.classifiers import classify_files, load_classifier
    from crack_lightning.inference.scan import scan_photo

    classifier = load_classifier(trained_run / "checkpoints" / "best.ckpt", "cpu")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    files = [*sorted(sample_root.rglob("*.jpg"))[::12], tmp_path / "broken.jpg"]
    alone, skipped_alone = classify_files(classifier, files, 8, 0, progress=False)
    calls = []
    original = classifier.predict
    monkeypatch.setattr(
        classifier, "predict", lambda images: calls.append(len(images)) or original(images)
    )
    shared, skipped = classify_files(classifier, files, 8, 2, progress=False)
    assert calls == [1]  # here only the probe that folds the backbone: batches ran in workers
    assert skipped == skipped_alone and [path for path, _ in skipped] == files[-1:]
    assert np.isnan(shared[-1]) and not np.isnan(shared[:-1]).any()
    np.testing.assert_allclose(shared, alone, atol=1e-6)
    assert ((shared[:-1] >= 0.5) == (alone[:-1] >= 0.5)).all()  # the same labels

    photo = Image.new("RGB", (3 * 227, 2 * 227))
    for tile, path in enumerate(files[:6]):
        photo.paste(Image.open(path), ((tile % 3) * 227, (tile // 3) * 227))
    calls.clear()
    scans = [
        scan_photo(classifier, photo, tmp_path / "wall.png", 227, 113, 4, 0.5, num_workers=n)
        for n in (0, 2)
    ]
    assert len(scans[0].probs) == 24  # 6 batches of 4 windows each
    assert calls == [4] * 6 + [1]  # here: all 6 without workers, the probe with them
    np.testing.assert_allclose(scans[1].probs, scans[0].probs, atol=1e-6)
