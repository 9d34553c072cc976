"""The inspector's page keeps its footing: the heading always names the photo whose
overlay and table are shown, even when a threshold change finishes after another photo
was picked; each row names the model that scored it, and a new model scans a photo again
only on request, its overlay then beside the earlier model's; the heat map's opacity
changes without a scan; the page writes the site report of its photos. Through
gradio_client, on the page of tests/test_app.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_lightning.inference import page as page_module
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import SIDE_GAP, photo_name

from .test_app import PATCH, app, model_scan, page_model, read_table, wall  # noqa: F401

SLOW_S = 1.5  # a threshold change that takes this long: the photo is switched meanwhile


@pytest.fixture(scope="module")
def other_wall(wall) -> Path:  # noqa: F811
    """The wall turned upside down: another photo, with its own patch table."""
    path = wall.parent / "other_wall.png"
    with Image.open(wall) as photo:
        photo.rotate(180).save(path)
    return path


def client_of(app, folder: Path):  # noqa: F811 (the fixture's name)
    from gradio_client import Client

    return Client(app.url, verbose=False, download_files=str(folder))


def test_a_late_threshold_change_shows_the_photo_picked_meanwhile(
    app,  # noqa: F811
    wall,  # noqa: F811
    other_wall,
    tmp_path,
    monkeypatch,
):
    from gradio_client import handle_file

    client = client_of(app, tmp_path / "client")
    first, second = photo_name(wall), photo_name(other_wall)
    client.predict([handle_file(str(wall)), handle_file(str(other_wall))], 0.5, api_name="/scan")
    _, heading, table = client.predict(second, api_name="/show")
    rows_of_second = read_table(table)
    _, heading, table = client.predict(first, api_name="/show")
    assert heading.startswith(f"### {first}: ")
    original = page_module.rethreshold

    def slow(*args, **kwargs):
        time.sleep(SLOW_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(page_module, "rethreshold", slow)
    job = client.submit(0.9, first, api_name="/threshold")  # typed with the first shown
    time.sleep(SLOW_S / 3)
    shown = client.predict(second, api_name="/show")  # then the other photo picked
    late = job.result()
    for _, heading, table in (shown, late[:3]):
        assert heading.startswith(f"### {second}: ")
        rows = read_table(table)
        assert [row[:5] for row in rows] == [row[:5] for row in rows_of_second]
    # the late change's heading and table are at its threshold, for the photo shown
    assert "at threshold 0.900" in late[1]
    assert {row[6] for row in read_table(late[2])} == {"Negative"}
    assert np.all([row[4] < 0.9 for row in read_table(late[2])])


def test_a_new_model_rescans_only_on_request_and_shows_both_overlays(
    app,  # noqa: F811
    wall,  # noqa: F811
    page_model,  # noqa: F811
    tmp_path,
):
    from gradio_client import handle_file

    from crack_lightning.inference.export import export_model

    client = client_of(app, tmp_path / "client")
    name = photo_name(wall)
    outputs = client.predict([handle_file(str(wall))], 0.5, api_name="/scan")
    assert read_table(outputs[4])[0][-1] == "best.ckpt"
    onnx_file = export_model(load_classifier(page_model, "cpu"), "onnx", tmp_path / "m.onnx")
    calls = app.model_calls()
    try:
        *_, status = client.predict(handle_file(str(onnx_file)), api_name="/model")
        assert "The 1 photo(s) on the page keep their figures" in status
        # the same photo dropped again (the drop box re-sends its list): not scanned again
        outputs = client.predict([handle_file(str(wall))], 0.5, api_name="/scan")
        assert app.model_calls() == calls
        assert read_table(outputs[4])[0][-1] == "best.ckpt"
        _, heading, _ = client.predict(name, api_name="/show")
        assert heading.endswith("(scanned with best.ckpt)")
        picture, heading, table, summary, _, status = client.predict(0.5, api_name="/rescan")
        assert app.model_calls() == calls + 1 and status == f"Scanned {name} again with m.onnx."
        assert [row[-1] for row in read_table(summary)] == ["m.onnx"]
        expected = model_scan(onnx_file, wall)
        assert [row[4] for row in read_table(table)] == pytest.approx(expected.probs, abs=1e-4)
        assert "(scanned with" not in heading.splitlines()[0]
        assert "Left: scanned with best.ckpt: Crack: 3 of 9" in heading
        assert "Right: scanned with m.onnx." in heading
        # side by side: the checkpoint's overlay, a gap, the ONNX model's
        with Image.open(picture) as both:
            assert both.size == (2 * 3 * PATCH + SIDE_GAP, 3 * PATCH)
            pixels = np.asarray(both.convert("RGB")).astype(int)
        left, right = pixels[:, : 3 * PATCH], pixels[:, 3 * PATCH + SIDE_GAP :]
        assert np.abs(left - right).max() <= 2  # two exports of one model: one figure
    finally:
        client.predict(handle_file(str(page_model)), api_name="/model")


def test_the_heat_maps_opacity_redraws_the_figure_without_a_scan(
    app,  # noqa: F811
    wall,  # noqa: F811
    tmp_path,
):
    from gradio_client import handle_file

    client = client_of(app, tmp_path / "client")
    client.predict([handle_file(str(wall))], 0.5, api_name="/scan")
    calls = app.model_calls()
    with Image.open(wall) as photo:
        original = np.asarray(photo.convert("RGB")).astype(int)

    def figure_at(opacity: float) -> np.ndarray:
        picture, heading, _ = client.predict(opacity, api_name="/opacity")
        assert heading.startswith(f"### {photo_name(wall)}: Crack: 3 of 9")
        with Image.open(picture) as image:
            return np.asarray(image.convert("RGB")).astype(int)

    plain, full = figure_at(0.0), figure_at(1.0)
    assert app.model_calls() == calls
    # at 0 the photo as it is, but for the yellow outline of the cracked patches
    assert (plain == original).all(axis=2).mean() > 0.8
    # at 1 the centre of the cracked middle patch is redder than at 0
    middle = (slice(PATCH + 30, 2 * PATCH - 30),) * 2
    assert (full[middle][..., 0] - plain[middle][..., 0]).mean() > 20
    assert (full[middle][..., 1] < plain[middle][..., 1]).mean() > 0.9


def test_the_page_writes_the_site_report_of_its_photos(
    app,  # noqa: F811
    wall,  # noqa: F811
    other_wall,
    tmp_path,
):
    import csv

    from gradio_client import handle_file

    client = client_of(app, tmp_path / "client")
    outputs = client.predict(
        [handle_file(str(wall)), handle_file(str(other_wall))], 0.5, api_name="/scan"
    )
    pages = {row[0]: row for row in read_table(outputs[4])}
    files, status = client.predict(0.5, api_name="/site_report")
    assert status.startswith("Site report of 2 photo(s), ranked: site_summary.csv")
    summary = next(Path(f) for f in files if f.endswith("site_summary.csv"))
    assert any(f.endswith("site_report.html") for f in files)
    assert any(f.endswith(f"{photo_name(wall)}_scan.png") for f in files)
    with summary.open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == ["other_wall.png", "wall.png"]
    assert [float(row["score"]) for row in rows] == sorted(
        (float(row["score"]) for row in rows), reverse=True
    )
    for row in rows:
        name = photo_name(wall if row["file"] == "wall.png" else other_wall)
        assert row["verdict"] == pages[name][1]
        assert int(row["cracked_windows"]) == pages[name][3]
