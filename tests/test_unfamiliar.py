"""The unfamiliar score: far from the training features on other surfaces, near on concrete;
scans label such patches Unfamiliar and average overlapping windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from crack_lightning.data.decode import decode, resize
from crack_lightning.inference.scan import ScanResult, tile_boxes
from crack_lightning.inference.unfamiliar import (
    OLD_REFERENCE_PER_MEDIAN,
    fit_statistics,
    unfamiliar_score,
)
from crack_lightning.training.run import build

from .conftest import ROOT, SHARED, shared_path

SIZE = 224  # the recipe's image size
# the recipe (experiment=generalize) describes the frozen stages' pooled output
# features[:16]; the last 3 of MobileNetV2's 19 stages train
STAGE = 16
LIMIT = OmegaConf.load(ROOT / "conf" / "scan" / "default.yaml").unfamiliar_limit


@pytest.fixture(scope="module")
def features_of(backbone_weights):
    """Pooled stage-16 features of images (paths or 227 px PIL patches), as the recipe's
    statistics describe them."""
    from .conftest import compose_config

    cfg = compose_config(
        "train", [f"model.weights_path={backbone_weights}", f"data.image_size={SIZE}"]
    )
    net = build(cfg.model).net.eval()

    def _features(images: list) -> torch.Tensor:
        tensors = [decode(i, SIZE) if isinstance(i, Path) else resize(i, SIZE) for i in images]
        return torch.cat(
            [
                net.stage_output(torch.stack(tensors[i : i + 64]), STAGE).mean(dim=(2, 3))
                for i in range(0, len(tensors), 64)
            ]
        ).float()

    return _features


def spread(folder: Path, count: int, offset: int = 0) -> list[Path]:
    files = sorted(folder.rglob("*.jpg"))
    return files[offset :: max(1, len(files) // count)][:count]


def scan_patches(photo: Path, size: int = 227, stride: int = 76) -> list[Image.Image]:
    """The patches scan.patch_size=227 scan.stride=76 cuts (81 of a 768 px photo)."""
    image = Image.open(photo).convert("RGB")
    return [image.crop((x, y, x + size, y + size)) for x, y in tile_boxes(768, 768, size, stride)]


def not_concrete(kind: str, seed: int, size: int = 227) -> Image.Image:
    """Synthetic non-concrete patches: a sky gradient, the green noise pasted into the
    docs' composite, overlapping leaf shapes, lines of text, coloured objects."""
    rng = np.random.default_rng(seed)
    if kind == "sky":
        top = np.array([60, 120, 220]) + rng.integers(-30, 30, 3)
        share = np.linspace(0, 1, size)[:, None, None]
        sky = (
            top * (1 - share)
            + np.array([200, 225, 250]) * share
            + rng.normal(0, 2, (size, size, 3))
        )
        return Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    if kind == "green noise":
        noise = rng.integers(0, 255, (size, size, 3)) * np.array([0.35, 1.0, 0.3])
        return Image.fromarray(noise.astype(np.uint8))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range({"leaves": 120, "text": 0, "objects": 8}[kind]):
        x, y = (int(v) for v in rng.integers(-20, size, 2))
        w, h = (int(v) for v in rng.integers(8, 30 if kind == "leaves" else 90, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        if kind == "leaves":
            colour = (colour[0] // 3, 90 + colour[1] // 2, colour[2] // 4)
        (draw.ellipse if kind == "leaves" or seed % 2 else draw.rectangle)(
            [x, y, x + w, y + h], fill=colour
        )
    if kind == "text":
        for row in range(0, size, 14):
            line = "".join(chr(int(c)) for c in rng.integers(65, 122, 40))
            draw.text((int(rng.integers(0, 10)), row), line, fill=(0, 0, 0))
    return image


KINDS = ["sky", "green noise", "leaves", "text", "objects"]


@pytest.fixture(scope="module")
def metu_features(features_of, sample_root) -> torch.Tensor:
    """The 481 METU sample images' features: the narrowest training set."""
    return features_of(sorted(sample_root.rglob("*.jpg")))


@pytest.fixture(scope="module")
def metu_statistics(metu_features):
    return fit_statistics(metu_features)


def test_concrete_of_another_camera_is_familiar_and_non_concrete_is_not(
    features_of, metu_statistics
):
    """Fitted on METU only, the two photos of another camera's concrete (their 162 scan
    patches) stay below scan.unfamiliar_limit, sky, leaves, text and objects go above."""
    photos = SHARED / "data" / "photos"
    for n in (4, 6):
        patches = scan_patches(shared_path(photos / f"crackconcrete_00{n}.png"))
        scores = unfamiliar_score(features_of(patches), metu_statistics).numpy()
        print(f"crackconcrete_00{n}: max {scores.max():.2f}, flagged {(scores > LIMIT).mean():.0%}")
        assert (scores > LIMIT).mean() <= 0.05
    for kind in KINDS:
        scores = unfamiliar_score(
            features_of([not_concrete(kind, seed) for seed in range(4)]), metu_statistics
        ).numpy()
        print(f"{kind}: min {scores.min():.2f}")
        assert (scores > LIMIT).all(), kind


def test_other_surfaces_score_as_more_unfamiliar_than_concrete(
    features_of, metu_features, sample_root
):
    """Unseen METU images score about 1 (the median's unit), brickwork higher."""
    brickwork = sample_root.parent / "brickwork-sample"
    stats = fit_statistics(metu_features[::2])
    familiar = unfamiliar_score(metu_features[1::2], stats).numpy()
    bricks = unfamiliar_score(features_of(spread(brickwork, 40)), stats).numpy()
    print(f"median score: concrete {np.median(familiar):.2f}, brickwork {np.median(bricks):.2f}")
    assert 0.6 < np.median(familiar) < 1.25
    assert np.median(bricks) > 1.5 * np.median(familiar)
    assert (familiar > LIMIT).mean() <= 0.05


def test_old_statistics_are_scored_in_the_same_units():
    """Statistics stored before the median reference (a 99th-percentile "reference", no
    "quantile") are rescaled by the ratio measured on the sources they were trained on."""
    features = torch.randn(400, 8)
    stats = fit_statistics(features)
    old = {k: v for k, v in stats.items() if k != "quantile"}
    old["reference"] = stats["reference"] * OLD_REFERENCE_PER_MEDIAN
    probe = torch.randn(20, 8) * 2
    assert torch.allclose(unfamiliar_score(probe, old), unfamiliar_score(probe, stats))
    assert float(stats["quantile"]) == 0.5


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


def test_a_frozen_head_is_described_below_the_backbone_top_stages(synthetic_cfg, tmp_path):
    """A backbone frozen throughout is described as the recipe's is, by the pooled output
    below its top 3 stages (its last pooled features score sky like concrete), and scans
    score that on the way to P(crack)."""
    from crack_lightning.inference.classifiers import load_classifier
    from crack_lightning.training.run import train

    cfg = synthetic_cfg(
        "model.freeze_backbone=true",
        "callbacks.feature_stats={_target_: "
        "crack_lightning.training.feature_stats.FeatureStatistics, max_images: 32}",
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    stats = ckpt["feature_stats"]
    stages = build(cfg.model).net.backbone.features
    assert int(stats["stage"]) == len(stages) - 3 and float(stats["quantile"]) == 0.5
    width = stages[: len(stages) - 3](torch.zeros(1, 3, 64, 64)).shape[1]
    assert stats["mean"].shape == (width,)
    classifier = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    probs, scores = classifier.predict_unfamiliar(images)
    assert np.allclose(probs, classifier.predict(images), atol=1e-4)
    assert scores.shape == (3,) and np.isfinite(scores).all() and (scores > 0).all()
