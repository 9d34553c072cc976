"""The one finder of images (data/sources.py): only regular files are read, and links
back into the tree are walked once, on every path (training, check, predict)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from crack_lightning.data.check import check_dataset
from crack_lightning.data.decode import collect_inputs
from crack_lightning.data.sources import scan_samples

from .conftest import run_python


def write_images(folder: Path, count: int, shade: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (shade, i * 20, 40)).save(folder / f"{shade}-{i}.png")


@pytest.fixture
def root(tmp_path) -> Path:
    write_images(tmp_path / "data" / "Positive", 3, 200)
    write_images(tmp_path / "data" / "Negative", 3, 50)
    return tmp_path / "data"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_is_never_opened(root):
    """Opening a FIFO blocks until a writer comes: training, the quick check and predict
    would hang. Run them in a child process that the test kills if it hangs."""
    os.mkfifo(root / "Positive" / "pipe.jpg")
    script = textwrap.dedent(
        f"""
        import json
        from crack_lightning.data.check import check_dataset
        from crack_lightning.data.decode import collect_inputs
        from crack_lightning.data.sources import scan_samples
        root = {str(root)!r}
        samples = scan_samples(root)
        report = check_dataset(root, full=False, progress=False)
        files, problems = collect_inputs([root, root + "/Positive/pipe.jpg"])
        print(json.dumps([len(samples), report.ok, report.ignored, len(files), problems]))
        """
    )
    try:
        result = run_python("-c", script, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO named pipe.jpg hung")
    assert result.returncode == 0, result.stderr
    count, ok, ignored, files, problems = json.loads(result.stdout.strip().splitlines()[-1])
    assert (count, ok, files) == (6, True, 6)
    assert ignored == ["Positive/pipe.jpg (not a regular file or a link to one)"]
    assert "not a regular file" in problems[0][1]


def test_a_link_loop_in_a_class_folder_is_walked_once(root):
    (root / "Positive" / "again").symlink_to(root / "Positive", target_is_directory=True)
    (root / "Negative" / "up").symlink_to(root, target_is_directory=True)
    samples = scan_samples(root)
    assert len(samples) == 6
    assert all("again" not in path and "/up/" not in path for path, _ in samples)
    report = check_dataset(root, full=False, progress=False)
    assert report.counts == {"Negative": 3, "Positive": 3}
    assert report.duplicates == []
    assert any("loop" in line for line in report.ignored)
    files, _ = collect_inputs([str(root)])
    assert len(files) == 6


def test_linked_files_and_folders_are_read_once_by_their_own_path(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_images(elsewhere, 2, 90)
    (root / "Positive" / "more").symlink_to(elsewhere, target_is_directory=True)
    (root / "Positive" / "copy.png").symlink_to(root / "Positive" / "200-0.png")
    (root / "Positive" / "gone.png").symlink_to(tmp_path / "missing.png")
    paths = [path for path, label in scan_samples(root) if label == 1]
    assert len(paths) == 5  # three of its own, two through the link to a folder outside
    assert str(root / "Positive" / "200-0.png") in paths
    assert not any(p.endswith(("copy.png", "gone.png")) for p in paths)
