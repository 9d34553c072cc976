"""Archive rules: unpacking never leaves a link in the root nor writes through
one, stops at a stated size bound and cleans up, and checks a local archive's size and
sha256 as it checks a download's. Every archive kind (ZIP, RAR through unar and bsdtar)
and both kinds of source (METU's data.root and a data.sources entry, one ensure_source)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from crack_lightning.commands.data import main as cli
from crack_lightning.data import fetch as fetch_module
from crack_lightning.data.datamodule import ensure_sources
from crack_lightning.data.fetch import (
    MARKER_NAME,
    ensure_source,
    extract_images,
    root_spec,
)
from crack_lightning.data.sources import SourceSpec
from crack_lightning.errors import DataError
from crack_lightning.training.check import check_train_settings
from crack_lightning.training.run import build
from tests.rar4 import write_rar4
from tests.test_download import jpeg, layout, make_zip

from .conftest import compose_config

TOOLS = ("unar", "bsdtar")
SDNET = {  # a source archive in SDNET2018's layout, its class folders at the top
    "D/CD/7001-1.jpg": jpeg(1),
    "D/CD/7001-2.jpg": jpeg(2),
    "D/UD/7002-1.jpg": jpeg(3),
}
MIB = 1 << 20


def source_spec(root: Path, **download) -> SourceSpec:
    """data.sources.decks as the shipped sdnet2018 config composes it, download set."""
    cfg = compose_config(
        "train",
        ["+data/sources@data.sources.decks=sdnet2018", f"data.sources.decks.root={root}"]
        + [f"data.sources.decks.download.{k}={v}" for k, v in download.items()],
    )
    return SourceSpec.from_config("decks", cfg.data.sources.decks)


def links_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_symlink()] if folder.exists() else []


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the data that no archive may touch: a file and two images."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.json").write_text('{"mine": true}')
    for i in range(2):
        (folder / f"o{i}.jpg").write_bytes(jpeg(20 + i))
    return folder


def untouched(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["o0.jpg", "o1.jpg", "precious.json"] and (
        (folder / "precious.json").read_text() == '{"mine": true}'
    )


# --- 1. no link in the root, nothing written through one ---------------------------------


@pytest.mark.parametrize("tool", TOOLS)
def test_a_source_rar_with_a_marker_link_overwrites_nothing_outside(
    tool, outside, tmp_path, monkeypatch
):
    """A RAR given as download.archive holds `.download.json` as a link
    to a file outside; the marker is written in the root, the file outside is intact, and
    no link is left in the root."""
    monkeypatch.setattr(fetch_module, "RAR_TOOLS", (tool,))
    archive = write_rar4(
        tmp_path / "SDNET2018.rar",
        SDNET,
        links={MARKER_NAME: str(outside / "precious.json"), "D/CD/x.jpg": str(outside / "o0.jpg")},
    )
    root = tmp_path / "data" / "sdnet2018"
    ensure_source(source_spec(root, enabled=True, archive=archive), progress=False)
    assert untouched(outside)
    assert links_under(root) == []
    assert json.loads((root / MARKER_NAME).read_text())["source"] == str(archive)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == sorted(SDNET)


@pytest.mark.parametrize("tool", TOOLS)
def test_a_class_folder_linking_outside_is_not_read_as_the_archive_s(
    tool, outside, tmp_path, monkeypatch
):
    """A class folder that is a link out of the archive is dropped with the other links:
    the source's archive then lacks that folder (said so), and nothing lands in the root."""
    monkeypatch.setattr(fetch_module, "RAR_TOOLS", (tool,))
    archive = write_rar4(
        tmp_path / "SDNET2018.rar", {"D/UD/7002-1.jpg": jpeg(3)}, links={"D/CD": str(outside)}
    )
    root = tmp_path / "data" / "sdnet2018"
    with pytest.raises(DataError, match=r"SDNET2018.rar holds no folders matching"):
        ensure_source(source_spec(root, enabled=True, archive=archive), progress=False)
    assert not root.exists() and untouched(outside)
    assert not (tmp_path / "data" / ".sdnet2018.unpacking").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_a_metu_class_folder_linking_outside_is_refused(tool, outside, tmp_path):
    files = {k: v for k, v in layout(2).items() if "/Negative/" not in k}
    link = {"Concrete Crack Images for Classification/Negative": str(outside)}
    archive = write_rar4(tmp_path / "crack.rar", files, links=link)
    root = tmp_path / "concrete_crack"
    with pytest.raises(DataError, match=r"exactly one Negative/ and one Positive/"):
        extract_images(archive, root_spec(root), progress=False, rar_tool=tool)
    assert not root.exists() and untouched(outside)


@pytest.mark.parametrize("tool", TOOLS)
def test_a_file_behind_a_link_in_a_rar_lands_nowhere(tool, outside, tmp_path):
    """A link to a folder outside, then a file under that link: both tools refuse to write
    through it, and the archive is refused."""
    files = layout(1) | {"Concrete Crack Images for Classification/Positive/evil.jpg": b"x"}
    link = {"Concrete Crack Images for Classification/Positive": str(outside)}
    archive = write_rar4(tmp_path / "crack.rar", files, links=link)
    with pytest.raises(DataError):
        extract_images(archive, root_spec(tmp_path / "root"), progress=False, rar_tool=tool)
    assert untouched(outside)


def test_a_hard_link_an_unpacker_writes_is_not_moved_into_the_root(outside, tmp_path, monkeypatch):
    """RAR 5 and tools can write hard links; one to a file outside must not end up in the
    root (where it would be the outside file). Stands in for such a tool: a ZIP unpacker
    that adds a hard link beside the archive's images."""
    real_unpack = fetch_module.unpack_zip

    def unpack_with_a_hard_link(archive, dest, *args):
        real_unpack(archive, dest, *args)
        os.link(outside / "o0.jpg", dest / "Positive" / "hard.jpg")

    monkeypatch.setattr(fetch_module, "unpack_zip", unpack_with_a_hard_link)
    root = tmp_path / "root"
    counts = extract_images(make_zip(tmp_path / "a.zip", layout(2, top="")), root_spec(root), False)
    assert counts == {"Negative": 2, "Positive": 2}
    assert not (root / "Positive" / "hard.jpg").exists()
    assert (outside / "o0.jpg").stat().st_nlink == 1 and untouched(outside)


def test_a_link_in_place_of_the_scratch_folder_is_not_followed(outside, tmp_path):
    """The scratch folder beside the root is a link to a folder outside (left by someone):
    it is replaced, not unpacked into, and the folder outside keeps its files."""
    (tmp_path / ".root.unpacking").symlink_to(outside, target_is_directory=True)
    archive = make_zip(tmp_path / "a.zip", layout(2, top=""))
    assert extract_images(archive, root_spec(tmp_path / "root"), progress=False) == {
        "Negative": 2,
        "Positive": 2,
    }
    assert untouched(outside) and not (tmp_path / ".root.unpacking").exists()


def test_a_zip_link_entry_becomes_no_link(outside, tmp_path):
    """ZIP can store a Unix link (its target as the data); unpacking writes no link, so a
    ZIP 'link' named like an image is at most a small file, and nothing outside is read."""
    archive = tmp_path / "a.zip"
    make_zip(archive, layout(2, top=""))
    with zipfile.ZipFile(archive, "a") as zf:
        entry = zipfile.ZipInfo("Positive/linked.jpg")
        entry.external_attr = 0o120777 << 16
        zf.writestr(entry, str(outside / "o0.jpg"))
    root = tmp_path / "root"
    extract_images(archive, root_spec(root), progress=False)
    assert links_under(root) == [] and untouched(outside)
    assert (root / "Positive" / "linked.jpg").read_bytes() == str(outside / "o0.jpg").encode()


# --- 2. a size bound on unpacking -----------------------------------------------------------


def test_a_zip_bomb_is_refused_by_its_declared_size_and_cleaned_up(tmp_path):
    """8 MiB of zeros compress to a few KiB; a 1 MiB bound refuses the archive before
    anything is written, names the setting, and leaves no scratch folder or root."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in SDNET.items():
            zf.writestr(name, data)
        zf.writestr("D/CD/7001-3.jpg", bytes(8 * MIB))
    assert archive.stat().st_size < 64 * 1024
    root = tmp_path / "data" / "sdnet2018"
    spec = source_spec(root, enabled=True, archive=archive, unpack_limit_gib=1 / 1024)
    with pytest.raises(
        DataError, match=r"declares 8.0 MiB .*download.unpack_limit_gib=0.000976562 GiB"
    ):
        ensure_source(spec, progress=False)
    assert [p.name for p in tmp_path.rglob("*") if not p.is_dir()] == ["bomb.zip"]
    assert not root.exists() and not list(root.parent.iterdir())  # no scratch left


def test_a_source_without_its_own_bound_takes_data_s(tmp_path):
    """A source config that sets no download.unpack_limit_gib is held to
    data.unpack_limit_gib (ensure_sources passes it on), not to a bound of its own."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in SDNET.items():
            zf.writestr(name, data)
        zf.writestr("D/CD/7001-3.jpg", bytes(8 * MIB))
    root = tmp_path / "data" / "sdnet2018"
    cfg = compose_config(
        "train",
        [
            "+data/sources@data.sources.decks=sdnet2018",
            f"data.sources.decks.root={root}",
            "data.sources.decks.download.enabled=true",
            f"data.sources.decks.download.archive={archive}",
            "~data.sources.decks.download.unpack_limit_gib",
        ],
    )
    spec = SourceSpec.from_config("decks", cfg.data.sources.decks)
    assert "unpack_limit_gib" not in spec.download
    with pytest.raises(DataError, match=r"declares 8.0 MiB .*=0.000976562 GiB"):
        ensure_sources([spec], unpack_limit_gib=1 / 1024)
    assert not root.exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_a_rar_that_unpacks_beyond_the_bound_is_stopped_and_cleaned_up(
    tool, tmp_path, capsys, monkeypatch
):
    """What the RAR tool writes is measured: 3 MiB against a 2 MiB bound (data.root's
    setting, through crack-data download) is refused, and nothing stays behind."""
    monkeypatch.setattr(fetch_module, "METU", fetch_module.Source("unused", None, None, 2))
    files = layout(2) | {
        "Concrete Crack Images for Classification/Positive/big.jpg": bytes(3 * MIB)
    }
    archive = write_rar4(tmp_path / "crack.rar", files)
    root = tmp_path / "data" / "concrete_crack"
    monkeypatch.setattr(fetch_module, "RAR_TOOLS", (tool,))
    args = ["download", f"root={root}", f"archive={archive}", f"unpack_limit_gib={2 / 1024}"]
    assert cli(args) == 2
    assert "unpacks to more than" in (err := capsys.readouterr().err)
    assert "unpack_limit_gib=0.00195312 GiB allows" in err
    assert [p.name for p in tmp_path.rglob("*") if not p.is_dir()] == ["crack.rar"]
    assert not root.exists() and not list(root.parent.iterdir())  # no scratch left


def test_train_s_unpack_bound_reaches_the_metu_archive(make_cfg, tmp_path):
    """train.py data.archive=PATH data.unpack_limit_gib=...: the data module unpacks
    under that bound."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in layout(2).items():
            zf.writestr(name, data)
        zf.writestr("Concrete Crack Images for Classification/Positive/big.jpg", bytes(4 * MIB))
    root = tmp_path / "root"
    overrides = [f"data.root={root}", f"data.archive={archive}", "data.unpack_limit_gib=0.002"]
    dm = build(make_cfg(*overrides).data)
    with pytest.raises(DataError, match=r"declares 4.0 MiB .*data.unpack_limit_gib=0.002 GiB"):
        dm.prepare_data()
    assert not root.exists() and not (tmp_path / ".root.unpacking").exists()


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("data.unpack_limit_gib=0", "data.unpack_limit_gib=0 must be a number of GiB"),
        ("data.unpack_limit_gib=-2", "data.unpack_limit_gib=-2 must be a number of GiB"),
        ("data.unpack_limit_gib=lots", "data.unpack_limit_gib=lots must be"),
    ],
)
def test_the_unpack_bound_is_checked_at_start_up(override, setting):
    with pytest.raises(DataError, match=setting):
        check_train_settings(compose_config("train", [override]))


def test_a_source_s_unpack_bound_is_checked(tmp_path):
    with pytest.raises(DataError, match=r"data.sources.decks.download.unpack_limit_gib=-1 must"):
        source_spec(tmp_path / "root", unpack_limit_gib=-1)


def bomb_zip(path: Path, inflated: int = 20 * MIB) -> Path:
    """A source archive in SDNET2018's layout whose D/CD/bomb.jpg is `inflated` bytes of
    zeros: deflate packs them about 1,000:1, far beyond any photo's ratio."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in SDNET.items():
            zf.writestr(name, data)
        zf.writestr("D/CD/bomb.jpg", bytes(inflated))
    return path


def test_an_entry_packed_beyond_the_ratio_bound_is_refused_before_unpacking(tmp_path):
    """20 MiB packed 1,000:1, well under the 4 GiB total bound: the entry's ratio alone
    refuses the archive, naming the entry and the setting, and nothing is written."""
    archive = bomb_zip(tmp_path / "bomb.zip")
    assert archive.stat().st_size < 64 * 1024
    root = tmp_path / "data" / "sdnet2018"
    spec = source_spec(root, enabled=True, archive=archive)
    with pytest.raises(DataError) as caught:
        ensure_source(spec, progress=False)
    message = str(caught.value)
    assert "D/CD/bomb.jpg" in message and "20.0 MiB" in message
    assert "packed 1" in message and "data.sources.decks.download.unpack_ratio_limit=100" in message
    assert [p.name for p in tmp_path.rglob("*") if not p.is_dir()] == ["bomb.zip"]
    assert not root.exists() and not list(root.parent.iterdir())  # no scratch left


def test_an_image_entry_beyond_the_image_bound_is_refused(tmp_path):
    """With the ratio bound raised, the same entry is judged by its size as an image:
    20 MiB against an 8 MiB bound is refused; with both raised it is unpacked."""
    archive = bomb_zip(tmp_path / "bomb.zip")
    root = tmp_path / "data" / "sdnet2018"
    raised = {"enabled": True, "archive": archive, "unpack_ratio_limit": 2000}
    spec = source_spec(root, **raised, unpack_image_limit_mib=8)
    with pytest.raises(
        DataError, match=r"D/CD/bomb.jpg, 20.0 MiB, .*download.unpack_image_limit_mib=8 MiB"
    ):
        ensure_source(spec, progress=False)
    assert not root.exists() and not list(root.parent.iterdir())
    ensure_source(source_spec(root, **raised, unpack_image_limit_mib=32), progress=False)
    assert (root / "D" / "CD" / "bomb.jpg").stat().st_size == 20 * MIB


def test_data_s_ratio_bound_holds_for_the_metu_archive(tmp_path, monkeypatch):
    """data.root's archive (crack-data download, train.py's data.archive) is held to
    data.unpack_ratio_limit."""
    monkeypatch.setattr(fetch_module, "METU", fetch_module.Source("unused", None, None, 2))
    archive = tmp_path / "crack.zip"
    files = layout(2) | {"Concrete Crack Images for Classification/Positive/00002.jpg": b""}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data or bytes(4 * MIB))
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"packed .* data.unpack_ratio_limit=100:1"):
        ensure_source(root_spec(root), archive=archive, progress=False)
    assert not root.exists() and not (tmp_path / ".root.unpacking").exists()
    ready = ensure_source(root_spec(root), archive=archive, progress=False, unpack_ratio_limit=5000)
    assert ready == root and (root / "Positive" / "00002.jpg").stat().st_size == 4 * MIB


@pytest.mark.parametrize("tool", TOOLS)
def test_a_rar_image_beyond_the_image_bound_is_refused(tool, tmp_path, monkeypatch):
    """A RAR's entries are measured once unpacked: a 3 MiB image against a 2 MiB bound."""
    monkeypatch.setattr(fetch_module, "RAR_TOOLS", (tool,))
    files = {f"Data/{name}": data for name, data in SDNET.items()}
    archive = write_rar4(tmp_path / "decks.rar", files | {"Data/D/UD/big.jpg": bytes(3 * MIB)})
    root = tmp_path / "data" / "sdnet2018"
    spec = source_spec(root, enabled=True, archive=archive, unpack_image_limit_mib=2)
    with pytest.raises(DataError, match=r"D/UD/big.jpg, 3.0 MiB, .*unpack_image_limit_mib=2 MiB"):
        ensure_source(spec, progress=False)
    assert not root.exists() and not list(root.parent.iterdir())


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("data.unpack_ratio_limit=0.5", "data.unpack_ratio_limit=0.5 must be a number of"),
        ("data.unpack_ratio_limit=lots", "data.unpack_ratio_limit=lots must be"),
        ("data.unpack_image_limit_mib=0", "data.unpack_image_limit_mib=0 must be a number of"),
        ("data.unpack_image_limit_mib=-1", "data.unpack_image_limit_mib=-1 must be"),
    ],
)
def test_the_ratio_and_image_bounds_are_checked_at_start_up(override, setting):
    with pytest.raises(DataError, match=setting):
        check_train_settings(compose_config("train", [override]))


@pytest.mark.parametrize(
    ("key", "value"), [("unpack_ratio_limit", 0), ("unpack_image_limit_mib", -1)]
)
def test_a_source_s_ratio_and_image_bounds_are_checked(tmp_path, key, value):
    with pytest.raises(DataError, match=rf"data.sources.decks.download.{key}={value} must"):
        source_spec(tmp_path / "root", **{key: value})


# --- 3. a local archive's size and sha256 ---------------------------------------------------


def test_a_local_source_archive_with_a_wrong_sha256_is_refused(tmp_path):
    archive = make_zip(tmp_path / "SDNET2018.zip", SDNET)
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = tmp_path / "data" / "sdnet2018"
    spec = source_spec(root, enabled=True, archive=archive, sha256="0" * 64)
    expected = (
        rf"data.sources.decks.download.archive={archive} has sha256 {actual}, "
        rf"expected {'0' * 64}"
    )
    with pytest.raises(DataError, match=expected):
        ensure_source(spec, progress=False)
    spec = source_spec(root, enabled=True, archive=archive, size=5)
    with pytest.raises(DataError, match=rf"archive={archive} has [\d,]+ bytes.*has 5"):
        ensure_source(spec, progress=False)
    assert not root.exists() and archive.exists()
    spec = source_spec(root, enabled=True, archive=archive, sha256=actual)
    ensure_source(spec, progress=False)
    assert json.loads((root / MARKER_NAME).read_text())["sha256"] == actual
