"""The benchmark runs end to end and reports every figure it promises (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_python

FIGURES = {
    "backbone_forward",
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
        "-m",
        "crack_lightning.commands.bench",
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
    assert all(figures[name] > 0 for name in FIGURES)
    assert "lightning_vs_loop" in result.stdout  # the table
