"""`check` on folders with planted problems, and the quick check before training."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from crack_lightning.commands.data import main as cli
from crack_lightning.data.check import check_dataset, file_problem
from crack_lightning.errors import DataError
from crack_lightning.training.run import build

from .conftest import run_python


def jpeg(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    """A small textured JPEG (noise around a colour the seed picks): flat images would be
    flagged as suspiciously uniform by the full check."""
    buffer = io.BytesIO()
    colour = (seed * 37 % 256, seed * 11 % 256, 120) if mode == "RGB" else seed * 37 % 256
    noise = Image.effect_noise((size, size), 40).convert(mode)
    Image.blend(Image.new(mode, (size, size), colour), noise, 0.3).save(buffer, "JPEG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def planted(tmp_path) -> Path:
    """4 good images per class, plus one of each problem."""
    root = tmp_path / "planted"
    for c, name in enumerate(("Negative", "Positive")):
        for i in range(4):
            write(root / name / f"{i:03d}.jpg", jpeg(10 * c + i))
    good = jpeg(99)
    write(root / "Positive" / "truncated.jpg", good[: len(good) // 2])
    write(root / "Positive" / "fake.jpg", b"This is a text file, not a JPEG.\n")
    write(root / "Positive" / "empty.png", b"")
    write(root / "Positive" / "notes.txt", b"a note that training ignores\n")
    write(root / "Negative" / "copy_of_000.jpg", (root / "Negative" / "000.jpg").read_bytes())
    write(root / "Negative" / "conflict.jpg", (root / "Positive" / "001.jpg").read_bytes())
    write(root / "Negative" / "grey.jpg", jpeg(7, size=40, mode="L"))
    return root


PLANTED_ERRORS = [
    "Positive/empty.png: empty file",
    "Positive/fake.jpg: not an image (starts with b'This is a te')",
    "Positive/truncated.jpg: truncated JPEG (no end-of-image marker)",
]


def test_full_check_reports_every_planted_problem(planted):
    report = check_dataset(planted, progress=False)
    assert report.counts == {"Negative": 7, "Positive": 7}  # by file name, as training counts
    assert sorted(report.errors) == PLANTED_ERRORS
    assert report.conflicts == [["Negative/conflict.jpg", "Positive/001.jpg"]]
    assert report.duplicates == [["Negative/000.jpg", "Negative/copy_of_000.jpg"]]
    assert report.ignored == ["Positive/notes.txt"]
    assert report.sizes == {"32x32": 10, "40x40": 1}  # the 11 readable images
    assert report.modes == {"RGB": 10, "L": 1}
    assert not report.ok
    assert len(report.problems()) == 4


def test_quick_check_finds_the_same_problems_without_decoding(planted):
    report = check_dataset(planted, full=False, progress=False)
    assert sorted(report.errors) == PLANTED_ERRORS
    assert report.conflicts == [["Negative/conflict.jpg", "Positive/001.jpg"]]
    assert report.sizes == {} and report.modes == {}


def test_only_the_full_check_decodes(tmp_path):
    # a JPEG header, garbage, and an end marker: looks whole, cannot be decoded
    root = tmp_path / "root"
    for name in ("Negative", "Positive"):
        write(root / name / "good.jpg", jpeg(1 if name == "Negative" else 2))
    garbage = jpeg(3)[:20] + bytes(range(256)) * 4 + b"\xff\xd9"
    write(root / "Positive" / "garbage.jpg", garbage)
    assert check_dataset(root, full=False, progress=False).ok
    report = check_dataset(root, progress=False)
    assert [e.split(":")[0] for e in report.errors] == ["Positive/garbage.jpg"]
    assert "cannot be decoded" in report.errors[0]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty file"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "truncated JPEG (no end-of-image marker)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "truncated PNG (no IEND chunk)"),
        (b"GIF89a", "not an image (starts with b'GIF89a')"),
        (jpeg(5), None),
        (jpeg(5) + b"\x00" * 16, None),  # padding after the end marker is fine
    ],
)
def test_file_problem_judges_bytes(data, problem):
    assert file_problem(data) == problem


def test_cli_check_prints_the_report_and_fails(planted, capsys):
    assert cli(["check", f"root={planted}"]) == 1
    out = capsys.readouterr().out
    assert "14 images (7 Negative, 7 Positive)" in out
    assert "Sizes: 32x32 x10, 40x40 x1. Modes: RGB x10, L x1." in out
    assert "Unreadable, truncated or not images (training would fail): 3" in out
    assert "  Negative/conflict.jpg = Positive/001.jpg" in out
    assert "Exact duplicates within a class" in out
    assert "Files without an image extension (training ignores them): 1" in out
    assert out.rstrip().endswith("FAILED: 4 problems would corrupt training.")


def test_python_m_crack_lightning_commands_data_runs_the_cli(planted):
    result = run_python(
        "-m", "crack_lightning.commands.data", "check", f"root={planted}", "quick=true", timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "FAILED: 4 problems would corrupt training." in result.stdout


def test_cli_check_passes_on_the_real_sample(sample_root, capsys):
    assert cli(["check", f"root={sample_root}"]) == 0
    out = capsys.readouterr().out
    assert "481 images (240 Negative, 241 Positive)" in out
    assert "Sizes: 227x227 x481. Modes: RGB x481." in out
    assert out.rstrip().endswith("OK: nothing that would corrupt training.")


def test_cli_check_errors_are_one_line(tmp_path, capsys):
    assert cli([]) == 2
    assert "Missing setting(s): action=..." in capsys.readouterr().err
    assert cli(["check", f"root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert cli(["check", f"root={tmp_path}", "quick=maybe"]) == 2
    assert "quick=maybe must be true or false" in capsys.readouterr().err
    assert cli(["check", str(tmp_path)]) == 2  # settings are key=value
    assert "is not key=value" in capsys.readouterr().err


def sdnet_with_a_damaged_crop(root: Path) -> Path:
    """SDNET2018's layout (D/CD cracked, D/UD not, W/... walls) with one truncated crop."""
    for folder, seed in (("D/CD", 0), ("D/UD", 10), ("W/CW", 20), ("W/UW", 30)):
        for i in range(3):
            write(root / folder / f"70{i}-{seed}.jpg", jpeg(seed + i))
    good = jpeg(50)
    write(root / "D" / "CD" / "709-1.jpg", good[: len(good) // 2])
    return root


def test_cli_check_finds_a_damaged_file_in_a_source_of_another_layout(tmp_path, capsys):
    root = sdnet_with_a_damaged_crop(tmp_path / "SDNET2018")
    decks = ["+data/sources@data.sources.decks=sdnet2018", f"data.sources.decks.root={root}"]
    assert cli(["check", *decks, "quick=true"]) == 1
    out = capsys.readouterr().out
    assert f"Source decks ({root}): 13 images (6 Negative, 7 Positive)." in out
    assert "  D/CD/709-1.jpg: truncated JPEG (no end-of-image marker)" in out
    assert out.rstrip().endswith("FAILED: 1 problems would corrupt training.")
    (root / "D" / "CD" / "709-1.jpg").unlink()
    assert cli(["check", *decks, "data.sources.decks.subsets=[D]"]) == 0
    assert "Source decks" in capsys.readouterr().out


def test_training_checks_a_source_of_another_layout_and_names_its_setting(make_cfg, tmp_path):
    root = sdnet_with_a_damaged_crop(tmp_path / "SDNET2018")
    cfg = make_cfg("+data/sources@data.sources.decks=sdnet2018", f"data.sources.decks.root={root}")
    with pytest.raises(DataError) as info:
        build(cfg.data).setup("fit")
    message = str(info.value)
    assert message.startswith(f"data.sources.decks.root={root} has 1 problem(s)")
    assert "D/CD/709-1.jpg: truncated JPEG" in message
    assert "data.root" not in message and "doi:" not in message


def test_training_refuses_a_broken_data_set_unless_told(make_cfg, planted):
    dm = build(make_cfg(f"data.root={planted}").data)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"data.root={planted} has 4 problem(s) that would corrupt training" in message
    assert "Positive/truncated.jpg: truncated JPEG" in message
    assert "same image in both classes: Negative/conflict.jpg = Positive/001.jpg" in message
    assert "data.check=false" in message
    dm = build(make_cfg(f"data.root={planted}", "data.check=false").data)
    dm.setup("fit")
    assert len(dm.samples) == 14


def test_training_warns_about_duplicates_but_goes_on(make_cfg, planted, caplog):
    for name in ("truncated.jpg", "fake.jpg", "empty.png"):
        (planted / "Positive" / name).unlink()
    (planted / "Negative" / "conflict.jpg").unlink()
    shutil.copy(planted / "Positive" / "000.jpg", planted / "Positive" / "again.jpg")
    dm = build(make_cfg(f"data.root={planted}").data)
    dm.setup("fit")
    assert "2 groups of identical images within a class" in caplog.text
