"""Download (resume, verification), RAR and ZIP unpacking, idempotence: all offline.

A local HTTP server on 127.0.0.1 stands in for Mendeley: it serves a small archive of
the data set's layout, and can drop the first connection mid-file, ignore Range,
corrupt the bytes or answer 404.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from crack_lightning.commands.data import main as cli
from crack_lightning.data import fetch as fetch_module
from crack_lightning.data.fetch import (
    MARKER_NAME,
    Source,
    count_images,
    ensure_source,
    extract_images,
    fetch,
    root_spec,
    unpack_rar,
)
from crack_lightning.errors import DataError
from crack_lightning.training.run import build, train
from tests.conftest import SMALL
from tests.rar4 import write_rar4

FIXTURES = Path(__file__).parent / "fixtures" / "rar"
PER_CLASS = 3
SUBDIRS = {  # what rar3-subdirs.rar and rar5-subdirs.rar hold
    "sub/dir1/file1.txt": b"file1\n",
    "sub/dir2/file2.txt": b"file2\n",
    "sub/with space/long fn.txt": b"long fn\n",
    "sub/üȵĩöḋè/file.txt": b"file\n",
}
STEST = "".join(f"{i:03d}\n" for i in range(512)).encode()  # seektest.rar, rar3-solid.rar


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 90, 200 - seed)).save(buffer, "JPEG")
    return buffer.getvalue()


def layout(per_class: int = PER_CLASS, top: str = "Concrete Crack Images for Classification/"):
    """The data set's layout: {archive name: bytes}, every image distinct."""
    files = {}
    for c, name in enumerate(("Negative", "Positive")):
        for i in range(per_class):
            files[f"{top}{name}/{i + 1:05d}.jpg"] = jpeg(10 * c + i)
    return files


def make_zip(path: Path | io.BytesIO, files: dict[str, bytes]) -> Path | io.BytesIO:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- a local server -----------------------------------------------------------------------


class Server:
    """Serves one payload; records each request's Range header."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.ranges = True  # honour Range requests
        self.drop_first_after: int | None = None  # bytes sent before dropping request 1
        self.status = 200
        self.requests: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                header = self.headers.get("Range")
                server.requests.append(header)
                if server.status != 200:
                    self.send_error(server.status)
                    return
                start = int(header[6:].split("-")[0]) if header and server.ranges else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    total = len(server.payload)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_first_after is not None and len(server.requests) == 1:
                    body = body[: server.drop_first_after]  # then the connection closes
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file_downloaded"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def source(self, per_class: int = PER_CLASS, sha256: bool = True) -> Source:
        digest = hashlib.sha256(self.payload).hexdigest() if sha256 else None
        return Source(self.url, len(self.payload), digest, per_class, suffix=".zip")


@pytest.fixture
def serve(monkeypatch) -> Iterator:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    servers: list[Server] = []

    def _serve(payload: bytes) -> Server:
        servers.append(Server(payload))
        return servers[-1]

    yield _serve
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def archive_bytes() -> bytes:
    buffer = io.BytesIO()
    make_zip(buffer, layout())
    return buffer.getvalue()


def download(root: Path, source: Source, **kwargs) -> Path:
    return ensure_source(root_spec(root), source=source, progress=False, retry_wait=0, **kwargs)


# --- download -----------------------------------------------------------------------------


def test_download_verifies_unpacks_counts_and_cleans_up(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    root = tmp_path / "data" / "concrete_crack"
    download(root, server.source())
    assert server.requests == [None]  # one plain request, no Range
    assert tree(root / "Positive") == {
        f"{i:05d}.jpg": data for i, data in ((i, jpeg(10 + i - 1)) for i in range(1, PER_CLASS + 1))
    }
    assert sorted(p.name for p in (root / "Negative").iterdir()) == [
        "00001.jpg",
        "00002.jpg",
        "00003.jpg",
    ]
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker == {
        "source": server.url,
        "sha256": hashlib.sha256(archive_bytes).hexdigest(),
        "Negative": 3,
        "Positive": 3,
    }
    # the archive, its partial file and the scratch folder are gone
    assert sorted(p.name for p in root.parent.iterdir()) == ["concrete_crack"]


def test_second_call_does_nothing(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    root = tmp_path / "concrete_crack"
    download(root, server.source())
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    download(root, server.source())
    assert server.requests == [None]  # no second request
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_dropped_connection_resumes_with_range(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    server.drop_first_after = 1000
    dest = tmp_path / "archive.zip"
    digest = fetch(server.url, dest, len(archive_bytes), retries=2, retry_wait=0, progress=False)
    assert server.requests == [None, "bytes=1000-"]
    assert dest.read_bytes() == archive_bytes
    assert digest == hashlib.sha256(archive_bytes).hexdigest()
    assert not (tmp_path / "archive.zip.part").exists()


def test_interrupted_download_resumes_on_the_next_call(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    server.drop_first_after = 1000
    root = tmp_path / "concrete_crack"
    with pytest.raises(DataError, match=r"Run the same command again to resume") as info:
        download(root, server.source(), retries=0)
    assert "1,000 bytes are kept in" in str(info.value)
    assert (tmp_path / "concrete_crack.zip.part").stat().st_size == 1000
    download(root, server.source())
    assert server.requests == [None, "bytes=1000-"]
    assert len(list((root / "Negative").iterdir())) == PER_CLASS


def test_server_that_ignores_range_gives_a_whole_file(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    server.drop_first_after = 1000
    server.ranges = False  # answers 200 with the whole file to a Range request
    dest = tmp_path / "archive.zip"
    fetch(server.url, dest, len(archive_bytes), retries=1, retry_wait=0, progress=False)
    assert server.requests == [None, "bytes=1000-"]
    assert dest.read_bytes() == archive_bytes  # not 1000 bytes + the whole file


def test_corrupted_download_is_rejected_and_deleted(serve, archive_bytes, tmp_path):
    corrupted = bytearray(archive_bytes)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server = serve(bytes(corrupted))
    source = Source(
        server.url, len(archive_bytes), hashlib.sha256(archive_bytes).hexdigest(), PER_CLASS
    )
    root = tmp_path / "concrete_crack"
    with pytest.raises(DataError, match=r"has sha256 [0-9a-f]{64}, expected .*It was deleted"):
        download(root, source)
    assert list(tmp_path.iterdir()) == []  # no archive, no partial file, no root


def test_corrupted_download_without_a_known_checksum_fails_at_unpacking(
    serve, archive_bytes, tmp_path
):
    # the real archive has no published sha256: a damaged member is caught by its CRC
    corrupted = bytearray(archive_bytes)
    corrupted[archive_bytes.index(jpeg(0)) + 200] ^= 0xFF
    server = serve(bytes(corrupted))
    root = tmp_path / "concrete_crack"
    with pytest.raises(DataError, match=r"not a readable ZIP \(Bad CRC-32.*delete it"):
        download(root, server.source(sha256=False))
    assert not root.exists()


def test_wrong_size_on_the_server_is_refused(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes + b"extra")
    source = Source(server.url, len(archive_bytes), None, PER_CLASS)
    with pytest.raises(DataError, match=r"serves [\d,]+ bytes, the data set's archive has"):
        download(tmp_path / "concrete_crack", source)


def test_http_error_and_unreachable_server_are_clear(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    server.status = 404
    with pytest.raises(DataError, match=r"HTTP 404 .*pass archive=PATH"):
        download(tmp_path / "a", server.source())
    assert server.requests == [None]  # a 404 is not retried
    closed = Source("http://127.0.0.1:9/file", 10, None, PER_CLASS)  # discard port: refused
    with pytest.raises(DataError, match=r"failed 2 times \(cannot connect"):
        download(tmp_path / "b", closed, retries=1)


def test_a_host_that_does_not_resolve_fails_at_once_without_retrying(tmp_path):
    # .invalid never resolves (RFC 2606); a retry_wait this long would stall the test
    offline = Source("http://archive.invalid/concrete.rar", 10, None, PER_CLASS)
    with pytest.raises(DataError, match=r"does not resolve .*looks offline.*pass archive=PATH"):
        ensure_source(
            root_spec(tmp_path / "c"), source=offline, progress=False, retries=3, retry_wait=600
        )


def test_archive_with_too_few_images_is_refused(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    with pytest.raises(DataError, match=r"held \{'Negative': 3, 'Positive': 3\} images, not 4"):
        download(tmp_path / "concrete_crack", server.source(per_class=4))


def test_non_empty_incomplete_root_is_not_touched(serve, archive_bytes, tmp_path):
    server = serve(archive_bytes)
    root = tmp_path / "concrete_crack"
    (root / "Positive").mkdir(parents=True)
    (root / "Positive" / "mine.jpg").write_bytes(jpeg(99))
    with pytest.raises(DataError, match=r"is not empty but does not hold 3 images per class"):
        download(root, server.source())
    assert server.requests == []


# --- local archives (offline users) --------------------------------------------------------


def test_local_zip_is_unpacked_without_network_and_kept(tmp_path):
    archive = make_zip(tmp_path / "copy.zip", layout(top=""))
    offline = Source("http://127.0.0.1:9/never", None, None, PER_CLASS)
    root = download(tmp_path / "concrete_crack", offline, archive=archive)
    assert tree(root / "Negative") == {
        k.split("/")[-1]: v for k, v in layout(top="").items() if k.startswith("Negative")
    }
    assert archive.exists()


def test_local_rar_with_the_data_set_layout_unpacks_with_each_tool(tmp_path):
    files = layout()
    archive = write_rar4(tmp_path / "crack.rar", files)
    for tool in ("unar", "bsdtar"):
        root = tmp_path / tool
        assert extract_images(archive, root_spec(root), progress=False, rar_tool=tool) == {
            "Negative": PER_CLASS,
            "Positive": PER_CLASS,
        }
        assert tree(root) == {k.split("/", 1)[1]: v for k, v in files.items()}


def test_cli_download_from_a_local_rar_checks_the_count_and_is_idempotent(
    tmp_path, capsys, monkeypatch
):
    archive = write_rar4(tmp_path / "crack.rar", layout(per_class=2))
    root = tmp_path / "concrete_crack"
    # the real data set has 20,000 images per class: this small archive is refused
    assert cli(["download", f"root={root}", f"archive={archive}"]) == 2
    assert "held {'Negative': 2, 'Positive': 2} images, not 20,000" in capsys.readouterr().err
    shutil.rmtree(root)
    monkeypatch.setattr(fetch_module, "METU", Source("unused", None, None, 2))
    assert cli(["download", f"root={root}", f"archive={archive}"]) == 0
    assert len(list((root / "Positive").iterdir())) == 2
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert cli(["action=download", f"root={root}", f"archive={archive}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert cli(["download", f"root={root}", "colour=red"]) == 2
    assert "Unknown setting 'colour'; this command takes action=, root=" in capsys.readouterr().err


def test_not_an_archive_is_named(tmp_path):
    text = tmp_path / "notes.rar"
    text.write_text("not really a rar")
    with pytest.raises(DataError, match=r"archive=.*notes.rar is neither a RAR nor a ZIP"):
        download(tmp_path / "root", Source("unused", None, None, 1), archive=text)
    with pytest.raises(DataError, match=r"archive=.*missing.zip does not exist"):
        download(
            tmp_path / "root", Source("unused", None, None, 1), archive=tmp_path / "missing.zip"
        )


# --- RAR files written by rar itself ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tool"),
    [
        ("rar3-subdirs.rar", "unar"),
        ("rar3-subdirs.rar", "bsdtar"),
        ("rar5-subdirs.rar", "bsdtar"),
        ("rar3-solid.rar", "unar"),
        ("seektest.rar", "bsdtar"),
    ],
)
def test_real_rar_files_unpack(name, tool, tmp_path):
    assert unpack_rar(FIXTURES / name, tmp_path / "out", tool, progress=False) == tool
    expected = SUBDIRS if "subdirs" in name else {"stest1.txt": STEST, "stest2.txt": STEST}
    assert tree(tmp_path / "out") == expected


def test_each_tool_hands_on_what_it_cannot_read(tmp_path):
    # unar 1.10 cannot parse this RAR 5 file, bsdtar 3.6 cannot read solid RAR 4
    assert unpack_rar(FIXTURES / "rar5-subdirs.rar", tmp_path / "a", progress=False) == "bsdtar"
    assert tree(tmp_path / "a") == SUBDIRS
    assert unpack_rar(FIXTURES / "rar3-solid.rar", tmp_path / "b", progress=False) == "unar"
    with pytest.raises(DataError, match=r"No RAR tool could read .*solid archive support"):
        unpack_rar(FIXTURES / "rar3-solid.rar", tmp_path / "c", "bsdtar", progress=False)


def test_damaged_rar_is_rejected_by_its_checksum(tmp_path):
    damaged = bytearray((FIXTURES / "seektest.rar").read_bytes())
    damaged[1500] ^= 0xFF
    (tmp_path / "damaged.rar").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged or incomplete \(unar .*Wrong checksum"):
        unpack_rar(tmp_path / "damaged.rar", tmp_path / "out", progress=False)


def test_rar_without_class_folders_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"exactly one Negative/ and one Positive/ folder"):
        extract_images(FIXTURES / "rar3-subdirs.rar", root_spec(tmp_path / "root"), progress=False)
    assert not (tmp_path / ".root.unpacking").exists()


def test_missing_rar_tools_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module.shutil, "which", lambda name: None)
    with pytest.raises(
        DataError, match=r"needs the `unar` or `bsdtar` program.*apt-get install unar"
    ):
        unpack_rar(FIXTURES / "seektest.rar", tmp_path / "out", progress=False)


# --- through the data module (train.py data.download=true / data.archive=PATH) ----------------


def test_data_download_true_fetches_before_training(serve, archive_bytes, make_cfg, monkeypatch):
    server = serve(archive_bytes)
    monkeypatch.setattr(fetch_module, "METU", server.source())
    root = Path(make_cfg().paths.output_dir).parent / "concrete_crack"
    dm = build(make_cfg(f"data.root={root}", "data.download=true").data)
    dm.prepare_data()
    dm.prepare_data()  # Lightning calls it again in fit: nothing more happens
    dm.setup("fit")
    assert server.requests == [None]
    assert Counter(label for _, label in dm.samples) == {0: PER_CLASS, 1: PER_CLASS}


def test_data_archive_unpacks_a_local_file_without_download(make_cfg, monkeypatch, tmp_path):
    archive = write_rar4(tmp_path / "crack.rar", layout())
    monkeypatch.setattr(fetch_module, "METU", Source("http://127.0.0.1:9/x", 1, None, 3))
    dm = build(make_cfg(f"data.root={tmp_path / 'root'}", f"data.archive={archive}").data)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.samples) == 2 * PER_CLASS
    dm = build(make_cfg(f"data.root={tmp_path / 'other'}", "data.download=false").data)
    dm.prepare_data()  # neither: nothing fetched
    assert not (tmp_path / "other").exists()


# --- the first run: data.download=auto (the default) fetches into a missing or empty root ----


def file_source(folder: Path, per_class: int) -> Source:
    """METU's archive as a file:// URL (standing in for Mendeley), with its size and sha256."""
    folder.mkdir()
    archive = make_zip(folder / "file_downloaded", layout(per_class))
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return Source(archive.as_uri(), len(data), digest, per_class, suffix=".zip")


def test_first_training_run_downloads_the_data_set_by_itself(make_cfg, monkeypatch, tmp_path):
    """`make train` on a fresh machine: no data, no download setting; the archive is fetched,
    verified, unpacked and deleted, the run trains on its images, and the next run finds
    them there and fetches nothing."""
    source = file_source(tmp_path / "mendeley", per_class=6)
    monkeypatch.setattr(fetch_module, "METU", source)
    root = tmp_path / "data" / "concrete_crack"
    metrics = train(make_cfg(f"data.root={root}", *SMALL))
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker == {"source": source.url, "sha256": source.sha256, "Negative": 6, "Positive": 6}
    assert tree(root / "Positive") == {
        k.split("/")[-1]: v for k, v in layout(6).items() if "/Positive/" in k
    }
    assert sorted(p.name for p in root.parent.iterdir()) == ["concrete_crack"]  # archive gone
    run = Path(make_cfg().paths.output_dir)
    rows = (run / "split_manifest.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[1] for row in rows) == sorted(
        k.split("/", 1)[1] for k in layout(6)
    )  # every downloaded image, and only those, split for training
    assert 0 <= metrics["val/acc"] <= 1
    (tmp_path / "mendeley" / "file_downloaded").unlink()  # a second fetch would fail
    build(make_cfg(f"data.root={root}").data).prepare_data()
    assert json.loads((root / MARKER_NAME).read_text()) == marker


def test_first_run_offline_stops_at_once_saying_how_to_pass_a_copy(make_cfg, monkeypatch, tmp_path):
    # .invalid never resolves (RFC 2606): what Mendeley's address does offline
    monkeypatch.setattr(fetch_module, "METU", Source("http://x.invalid/f", 10, None, PER_CLASS))
    root = tmp_path / "concrete_crack"
    started = time.monotonic()
    with pytest.raises(DataError, match=r"does not resolve .*looks offline.*data.archive=PATH"):
        train(make_cfg(f"data.root={root}", *SMALL))
    assert time.monotonic() - started < 60  # no retries
    assert not list(tmp_path.glob("*concrete_crack*"))  # no root, archive or .part left


def test_auto_uses_a_root_with_images_as_it_is(make_cfg, monkeypatch, tmp_path):
    """A folder of one's own images (not METU's 20,000 per class) is trained on, never
    replaced or refused; data.download=true would refuse it."""
    monkeypatch.setattr(fetch_module, "METU", Source("http://127.0.0.1:9/x", 10, None, 20_000))
    root = tmp_path / "mine"
    make_zip(tmp_path / "mine.zip", layout(2, top=""))
    extract_images(tmp_path / "mine.zip", root_spec(root), progress=False)
    (tmp_path / "mine.zip").unlink()
    dm = build(make_cfg(f"data.root={root}").data)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.samples) == 4 and not (root / MARKER_NAME).exists()
    with pytest.raises(DataError, match=r"is not empty but does not hold 20,000"):
        build(make_cfg(f"data.root={root}", "data.download=true").data).prepare_data()


def test_auto_finishes_a_download_left_unfinished_and_refuses_a_half_placed_root(
    serve, archive_bytes, make_cfg, monkeypatch, tmp_path
):
    """An interrupted first run resumes its .part file on the next; a root half filled
    when unpacking stopped is refused with the fix, not trained on as it is."""
    server = serve(archive_bytes)
    monkeypatch.setattr(fetch_module, "METU", server.source())
    root = tmp_path / "concrete_crack"
    part = tmp_path / "concrete_crack.zip.part"
    part.write_bytes(archive_bytes[:100])
    root.mkdir()
    build(make_cfg(f"data.root={root}").data).prepare_data()
    assert server.requests == ["bytes=100-"]
    assert count_images(root) == {"Negative": PER_CLASS, "Positive": PER_CLASS}
    shutil.rmtree(root)
    (tmp_path / "concrete_crack.zip").write_bytes(archive_bytes)  # kept: unpacking stopped
    (root / "Negative").mkdir(parents=True)
    (root / "Negative" / "00001.jpg").write_bytes(jpeg(0))
    with pytest.raises(DataError, match=r"data.root=.* is not empty .*Move or delete it"):
        build(make_cfg(f"data.root={root}").data).prepare_data()


def test_a_wrong_download_setting_is_named_before_anything_is_fetched(make_cfg, tmp_path):
    with pytest.raises(DataError, match=r"data.download=maybe must be auto .*, true or false"):
        train(make_cfg(f"data.root={tmp_path / 'none'}", "data.download=maybe", *SMALL))
    assert not (tmp_path / "none").exists()
