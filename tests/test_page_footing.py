"""The inspector's page keeps its footing: the heading always names the photo whose
overlay and table are shown, even when a threshold change finishes after another photo
was picked. Through gradio_client, on the page of tests/test_app.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_lightning.inference import page as page_module
from crack_lightning.inference.inspection import photo_name

from .test_app import app, page_model, read_table, wall  # noqa: F401 (fixtures)

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
