"""The inspector's page keeps each photo apart and its memory bounded: photos sharing a
file name keep their own rows, files and mark crops (named by content, across sessions
too); a tab's session keeps at most session_photos photos and is freed when the tab
closes or the session expires. A photo that cannot be scanned (a decompression bomb, not
an image, smaller than one patch) is skipped with the reason on every photo path (the
page, predict mode=scan and mode=predict, crack-scan-eval), and the good photos beside it
are scanned. A model whose P(crack) is a patch's brightness keeps these fast."""

from __future__ import annotations

import gc
import json
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from crack_lightning.data.decode import oriented_size
from crack_lightning.errors import UnreadableImage
from crack_lightning.inference.inspection import Inspection, Inspector, photo_name
from crack_lightning.inference.page import Session
from crack_lightning.inference.scan import ScanSettings, scan_figure

from .conftest import compose_config
from .test_scan_eval import TILE, brightness_model, run_scan_eval

TTL_S = 5
WINDOW = ScanSettings(patch_size=TILE, stride=TILE, unfamiliar_limit=None)


def random_photo(path: Path, seed: int, size: int = 2 * TILE) -> Path:
    """A photo of random pixels (each seed its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (400 Mpx for 20000, above Pillow's own
    limit): a decompression bomb in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def inspector(labels: Path, max_pixels: int = 10**6) -> Inspector:
    return Inspector(brightness_model(), WINDOW, 8, max_pixels, labels)


def crop_of(photo: Path, x: int, y: int) -> np.ndarray:
    with Image.open(photo) as image:
        return np.asarray(image.convert("RGB").crop((x, y, x + TILE, y + TILE)))


# --- names that cannot collide ----------------------------------------------------------


def test_photos_sharing_a_file_name_keep_their_own_rows_files_and_crops(tmp_path):
    a = random_photo(tmp_path / "a" / "IMG_0001.png", 1)
    b = random_photo(tmp_path / "b" / "IMG_0001.png", 2)
    labels = tmp_path / "labels"
    page = inspector(labels)
    session = Session(tmp_path / "session", limit=20)
    for photo in (a, b):  # two drops of one session
        scanned, refused = page.scan([photo], 0.5, session.out)
        assert refused == []
        session.keep(scanned)
    assert len(session.inspections) == 2
    first, second = session.inspections.values()
    assert first.result.path == a and second.result.path == b
    assert first.name != second.name and {first.name, second.name} == {
        photo_name(a),
        photo_name(b),
    }
    # each photo's overlay and CSV are its own
    for item in (first, second):
        assert scan_figure(session.out, item.name).is_file()
        assert scan_figure(session.out, item.name).with_suffix(".csv").is_file()
    a_crop = page.mark(first, 0, "Positive")
    b_crop = page.mark(second, 0, "Positive")
    assert a_crop != b_crop
    assert np.array_equal(np.asarray(Image.open(a_crop)), crop_of(a, 0, 0))
    assert np.array_equal(np.asarray(Image.open(b_crop)), crop_of(b, 0, 0))
    # b's patch moved to not crack: a's crop stays
    page.mark(second, 0, "Negative")
    assert a_crop.is_file() and not b_crop.exists()
    assert np.array_equal(np.asarray(Image.open(a_crop)), crop_of(a, 0, 0))
    # another session (a new page, the same labels folder): b's marks never reach a's crop,
    # while the same photo, wherever it lies, keeps its name
    again = Session(tmp_path / "again", limit=20)
    again.keep(inspector(labels).scan([b], 0.5, again.out)[0])
    inspector(labels).mark(again.inspections[photo_name(b)], 0, "Positive")
    assert np.array_equal(np.asarray(Image.open(a_crop)), crop_of(a, 0, 0))
    copy = tmp_path / "c" / "renamed_elsewhere"
    copy.parent.mkdir()
    copy.with_suffix(".png").write_bytes(a.read_bytes())
    assert photo_name(copy.with_suffix(".png")).split("_")[-1] == photo_name(a).split("_")[-1]


# --- a bounded session, freed at its end ---------------------------------------------------


def test_a_session_keeps_at_most_its_limit_of_photos_and_lets_the_oldest_go(tmp_path):
    photos = [random_photo(tmp_path / f"p{i}.png", i) for i in range(3)]
    session = Session(tmp_path / "session", limit=2)
    page = inspector(tmp_path / "labels")
    scanned, _ = page.scan(photos, 0.5, session.out)
    assert session.keep(scanned) == [photo_name(photos[0])]
    assert list(session.inspections) == [photo_name(p) for p in photos[1:]]
    assert not scan_figure(session.out, photo_name(photos[0])).exists()
    assert scan_figure(session.out, photo_name(photos[2])).is_file()
    session.close()
    assert session.inspections == {} and not session.out.exists()


def live_inspections() -> int:
    gc.collect()
    return sum(isinstance(item, Inspection) for item in gc.get_objects())


@pytest.fixture
def served(tmp_path, monkeypatch):
    """crack-app served in this process with the brightness model; sessions expire after
    TTL_S seconds without use."""
    pytest.importorskip("gradio")
    from crack_lightning.commands import app

    from .test_app import forget_gradio_settings, free_port

    forget_gradio_settings(monkeypatch)
    monkeypatch.setattr(app, "load_classifier", lambda path, device: brightness_model())
    cfg = compose_config(
        "app",
        [
            "ckpt_path=unused.ckpt",
            f"labels_dir={tmp_path / 'labels'}",
            f"files_dir={tmp_path / 'files'}",
            f"scan.patch_size={TILE}",
            f"scan.stride={TILE}",
            f"session_minutes={TTL_S / 60}",
            "device=cpu",
            f"port={free_port()}",
        ],
    )
    page, _ = app.start(cfg)
    try:
        yield page, tmp_path / "files" / "downloads"
    finally:
        page.close()


def test_a_session_is_freed_when_its_tab_closes_and_when_it_expires(served, tmp_path):
    from gradio_client import Client, handle_file

    page, downloads_root = served
    before = live_inspections()
    good = random_photo(tmp_path / "good.png", 1)
    bomb = bomb_png(tmp_path / "bomb.png")
    clients = [Client(page.local_url, verbose=False) for _ in range(2)]
    for client in clients:
        status = client.predict(
            [handle_file(str(bomb)), handle_file(str(good))], 0.5, api_name="/scan"
        )[-1]
        assert status.startswith("Scanned 1 photo(s).")
        assert "skipped **bomb.png**: too large to decode safely" in status
    assert live_inspections() == before + 2
    assert len(list(downloads_root.iterdir())) == 2
    # the first tab closes: Gradio calls the page's unload with its session
    (unload,) = [fn for fn in page.fns.values() if any(t[1] == "unload" for t in fn.targets)]
    unload.fn(SimpleNamespace(session_hash=clients[0].session_hash))
    assert live_inspections() == before + 1
    assert len(list(downloads_root.iterdir())) == 1
    # the second is left open, unused: it expires (session_minutes) and is freed
    deadline = time.monotonic() + 3 * TTL_S
    while live_inspections() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_inspections() == before
    assert list(downloads_root.iterdir()) == []


# --- a photo that cannot be scanned is skipped, on every path -----------------------------


def test_a_decompression_bomb_is_unreadable_from_its_header(tmp_path):
    with pytest.raises(UnreadableImage, match="too large to decode safely"):
        oriented_size(bomb_png(tmp_path / "bomb.png"))


def test_the_page_skips_a_bomb_and_scans_the_good_photo_beside_it(tmp_path):
    good = random_photo(tmp_path / "good.png", 1)
    tiny = random_photo(tmp_path / "tiny.png", 2, size=TILE // 2)
    bomb = bomb_png(tmp_path / "bomb.png")
    scanned, refused = inspector(tmp_path / "labels").scan(
        [bomb, good, tiny], 0.5, tmp_path / "out"
    )
    assert [item.result.path for item in scanned] == [good]
    reasons = dict(refused)
    assert reasons["bomb.png"].startswith("too large to decode safely")
    assert reasons["tiny.png"].startswith(f"32x32, smaller than scan.patch_size={TILE}")


def predict_run(monkeypatch, tmp_path: Path, mode: str, inputs: list[Path]) -> dict:
    from crack_lightning.commands import predict

    monkeypatch.setattr(predict, "load_classifier", lambda path, device: brightness_model())
    cfg = compose_config(
        "predict",
        [
            "ckpt_path=unused.ckpt",
            f"inputs=[{','.join(map(str, inputs))}]",
            f"mode={mode}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"output={tmp_path / 'out' / 'predictions.csv'}",
            f"report_dir={tmp_path / 'out' / 'report'}",
            "num_workers=0",
            "progress=false",
            "device=cpu",
            f"scan.patch_size={TILE}",
            f"scan.stride={TILE}",
        ],
    )
    return predict.run(cfg)


@pytest.mark.parametrize("mode", ["scan", "predict"])
def test_predict_skips_a_bomb_lists_it_at_the_end_and_goes_on(monkeypatch, tmp_path, capsys, mode):
    bomb = bomb_png(tmp_path / "a_bomb.png")
    good = random_photo(tmp_path / "b_good.png", 1)
    summary = predict_run(monkeypatch, tmp_path, mode, [bomb, good])
    assert summary["skipped"] == 1
    if mode == "scan":
        assert [photo["path"] for photo in summary["photos"]] == [str(good)]
    else:
        assert summary["classified"] == 1
    err = capsys.readouterr().err
    assert f"Skipped 1 input(s):\n  {bomb}: too large to decode safely" in err


def test_scan_eval_skips_a_bomb_and_scores_the_good_photo(monkeypatch, tmp_path, capsys):
    from .test_scan_eval import photo

    good = photo(tmp_path / "photos", "wall", [0.9, 0.8, 0.3, 0.1], [True, False, True, False])
    bomb = bomb_png(tmp_path / "photos" / "bomb.png")
    Image.new("L", (2 * TILE, 2 * TILE)).save(tmp_path / "photos" / "bomb_mask.png")
    out = tmp_path / "out"
    assert run_scan_eval(monkeypatch, f"photos=[{good},{bomb}]", f"out={out}") == 0
    report = json.loads((out / "scan_eval.json").read_text())
    assert list(report) == ["wall.png"] and report["wall.png"]["f1"] == pytest.approx(0.5)
    err = capsys.readouterr().err
    assert f"Skipped {bomb}: too large to decode safely" in err
