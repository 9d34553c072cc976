"""The benchmark (benchmarks/bench.py) runs end to end and reports every figure it promises,
each consistent with the counts and times it was computed from (no speed asserted)."""

from __future__ import annotations

import json

import pytest

from crack_lightning.cli import compose_command

from .conftest import load_bench, run_python

bench = load_bench()

FIGURES = {
    "backbone_forward",
    "fill",
    "fill_views",
    "fill_s",
    "fill_vs_forward",
    "train_lightning",
    "train_loop",
    "lightning_vs_loop",
    "page_faults_per_s",
    "validate",
    "predict_torch",
    "predict_onnx",
    "predict_onnx_int8",
    "one_backbone_pass_s",
    "uncached_s",
    "cached_1view_cold_s",
    "cached_1view_warm_s",
    "cached_8view_cold_s",
    "cached_8view_warm_s",
}


@pytest.mark.slow
def test_bench_prints_a_table_and_a_json_line_with_every_figure(sample_root, backbone_weights):
    result = run_python(
        "benchmarks/bench.py",
        "images=160",
        "batch_size=8",
        "sizes=[32]",
        "epochs=1",
        "workers=0",
        f"sample={sample_root}",
        f"weights={backbone_weights}",
        "reference=benchmarks/keras_2core.yaml",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    [figures] = report["results"]
    assert report["images"] == 160 and report["allocator_tuned"] is True
    assert set(figures) >= FIGURES
    assert figures["fill_views"] == 160  # one view of every image of the data set
    assert figures["fill"] == pytest.approx(160 / figures["fill_s"])
    assert figures["fill_vs_forward"] == pytest.approx(
        figures["fill"] / figures["backbone_forward"]
    )
    assert figures["lightning_vs_loop"] == pytest.approx(
        figures["train_lightning"] / figures["train_loop"]
    )
    assert figures["one_backbone_pass_s"] == pytest.approx(160 / figures["predict_torch"])
    assert figures["cached_1view_cold_vs_one_pass"] == pytest.approx(
        figures["cached_1view_cold_s"] / figures["one_backbone_pass_s"]
    )
    assert "lightning_vs_loop" in result.stdout  # the table


def test_the_fill_row_beside_the_bare_forward_pass(sample_root, tmp_path):
    """The fill's images/s and its ratio to the bare forward pass (a few tiny images)."""
    cfg = compose_command("bench", [f"sample={sample_root}", "batch_size=8", "workers=0"])
    settings = bench.bench_settings(cfg)
    data = bench.repeat_sample(sample_root, 24, tmp_path / "data")
    result = bench.row_backbone_forward(bench.Bench(settings, data, 32, tmp_path))
    result |= bench.row_fill(bench.Bench(settings, data, 32, tmp_path))
    result |= bench.ratios(result)
    assert result["fill_views"] == 24  # every image given, once
    assert result["fill"] == pytest.approx(24 / result["fill_s"])
    assert result["fill_vs_forward"] == pytest.approx(result["fill"] / result["backbone_forward"])
    assert list((tmp_path / "fill_32").glob("features_*.pt"))  # a real fill, into its own cache


def test_one_run_prints_the_fill_forward_predict_and_the_design_cards_command(
    sample_root, synthetic_root, backbone_weights, capsys
):
    """sizes=[] full_scale=DIR: the design card's command on DIR (1 epoch here) with its
    own fill rate, the bare forward pass and prediction over the same images, printed as
    the headline and in the JSON line."""
    code = bench.main(
        [
            f"sample={sample_root}",
            "sizes=[]",
            f"full_scale={synthetic_root}",
            f"weights={backbone_weights}",
            "epochs=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    [line] = report["headline"]
    assert line["on"] == f"{synthetic_root} (48 images, 224 px)"
    row = report["default_command"]
    assert row["fill_views"] == 48  # the command's cold cache: every image once (one view)
    assert line["fill"] == pytest.approx(48 / row["fill_s"])
    assert row["fill_s"] < line["default_command_s"]  # the fill is part of the command's run
    assert row["one_backbone_pass_s"] == pytest.approx(48 / line["predict"])
    assert line["fill_vs_forward"] == pytest.approx(line["fill"] / line["backbone_forward"])
    assert 0.75 <= line["default_command_val_acc"] <= 1  # the command really trained
    assert report["default_command"]["fill"] == line["fill"]
    assert f"{synthetic_root} (48 images, 224 px): fill " in out  # the headline printed
