"""The unfamiliar score: far from the training features on other surfaces, near on concrete;
scans label such patches Unfamiliar and average overlapping windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crack_lightning.data.decode import decode
from crack_lightning.inference.scan import ScanResult
from crack_lightning.inference.unfamiliar import fit_statistics, unfamiliar_score
from crack_lightning.training.run import build

SIZE = 128


@pytest.fixture(scope="module")
def features_of(backbone_weights):
    from .conftest import compose_config

    cfg = compose_config(
        "train", [f"model.weights_path={backbone_weights}", f"data.image_size={SIZE}"]
    )
    net = build(cfg.model).net.eval()

    def _features(paths: list[Path]) -> torch.Tensor:
        images = torch.stack([decode(p, SIZE) for p in paths])
        with torch.inference_mode():
            return net.features(images).float()

    return _features


def spread(folder: Path, count: int, offset: int = 0) -> list[Path]:
    files = sorted(folder.rglob("*.jpg"))
    return files[offset :: max(1, len(files) // count)][:count]


def test_other_surfaces_score_as_more_unfamiliar_than_concrete(features_of, sample_root):
    brickwork = sample_root.parent / "brickwork-sample"
    concrete = spread(sample_root, 160)
    train, held_out = concrete[::2], concrete[1::2]
    stats = fit_statistics(features_of(train))
    familiar = unfamiliar_score(features_of(held_out), stats).numpy()
    bricks = unfamiliar_score(features_of(spread(brickwork, 40)), stats).numpy()
    print(f"median score: concrete {np.median(familiar):.2f}, brickwork {np.median(bricks):.2f}")
    assert np.median(bricks) > 2 * np.median(familiar)
    assert (familiar > 1).mean() <= 0.05 and (bricks > 1).mean() > 0.3


def test_overlapping_windows_average_and_unfamiliar_patches_are_not_cracks():
    result = ScanResult(
        path=Path("p.png"),
        width=4,
        height=2,
        patch_size=2,
        boxes=np.array([(0, 0), (1, 0), (2, 0)]),
        probs=np.array([0.9, 0.3, 0.8]),
        threshold=0.5,
        unfamiliar=np.array([0.5, 0.5, 3.0]),
        unfamiliar_limit=1.5,
    )
    assert np.allclose(result.probability_map()[0], [0.9, 0.6, 0.55, 0.8])
    assert result.labels() == ["Positive", "Negative", "Unfamiliar"]
    assert result.cracked.tolist() == [True, False, False]


def test_patch_truth_and_scores_against_a_mask():
    from crack_lightning.evaluation.scan_masks import patch_scores, patch_truth

    mask = np.zeros((2, 6), dtype=bool)
    mask[:, 0] = True  # a crack in the first patch only
    result = ScanResult(
        path=Path("p.png"),
        width=6,
        height=2,
        patch_size=2,
        boxes=np.array([(0, 0), (2, 0), (4, 0)]),
        probs=np.array([0.9, 0.8, 0.1]),
        threshold=0.5,
        unfamiliar=np.array([0.5, 3.0, 0.5]),
        unfamiliar_limit=1.5,
    )
    truth = patch_truth(result, mask, min_share=0.25)
    assert truth.tolist() == [True, False, False]
    scores = patch_scores(result, truth)
    assert scores["precision"] == scores["recall"] == 1.0  # the unfamiliar false alarm is gone
    assert scores["classifier_precision"] == 0.5 and scores["unfamiliar_patches"] == 1


def test_scan_eval_scores_patches_against_the_real_masks(trained_run, tmp_path, capsys):
    """crack-scan-eval end to end: the two masked photos, a report per photo, maps written."""
    import json

    from crack_lightning.commands.scan_eval import main
    from tests.conftest import SHARED, shared_path

    photos = [shared_path(SHARED / "data" / "photos" / f"crackconcrete_00{n}.png") for n in (4, 6)]
    out = tmp_path / "scan_eval"
    args = [f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", f"out={out}"]
    assert main([*args, f"photos=[{','.join(map(str, photos))}]", "scan.stride=181"]) == 0
    report = json.loads((out / "scan_eval.json").read_text())
    assert set(report) == {"crackconcrete_004.png", "crackconcrete_006.png"}
    for scores in report.values():
        assert scores["patches"] == 16  # 768 px, window 227, stride 181: 4 x 4
        assert 0 < scores["cracked_patches"] <= 16  # both photos have cracks in their masks
        # the figures are the counts' (patches the scan found, false alarms), by hand
        found, alarms = scores["found_patches"], scores["false_alarms"]
        assert scores["recall"] == pytest.approx(found / scores["cracked_patches"])
        assert scores["precision"] == pytest.approx(found / (found + alarms) if found else 0.0)
        # the trained model finds most masked cracks (all of them, with no false alarm,
        # when written) where chance would find half
        assert scores["recall"] >= 0.75 and scores["precision"] >= 0.75
    assert (out / "crackconcrete_004_scan.png").is_file()
    capsys.readouterr()
    missing_mask = tmp_path / "no_mask.png"
    missing_mask.write_bytes(photos[0].read_bytes())
    assert main([*args, f"photos=[{missing_mask}]"]) == 2
    assert "No crack mask" in capsys.readouterr().err
    # the scan loop predict mode=scan uses: an unreadable photo is skipped and named
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG")
    assert main([*args, f"photos=[{broken},{photos[0]}]", "scan.stride=181"]) == 0
    assert f"Skipped {broken}" in capsys.readouterr().err
    assert set(json.loads((out / "scan_eval.json").read_text())) == {"crackconcrete_004.png"}
