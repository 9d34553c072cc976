"""predict.py mode=scan's site report: photos ranked by the stated triage score, EXIF date
and position, an offline page, the skipped photos with their reasons."""

from __future__ import annotations

import base64
import csv
import html
import re
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin

from crack_lightning.commands.predict import run
from crack_lightning.evaluation.site_report import (
    MAP_SCORE,
    WINDOW_SCORE,
    Exif,
    ScanContext,
    SitePhoto,
    read_exif,
    write_site_report,
)
from crack_lightning.inference.crack_maps import MapNetwork


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def inlined(page: str) -> list[tuple[str, Image.Image]]:
    """Every <img> of the page as (mime type, image); each must be a data: URI."""
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    images = []
    for source in sources:
        found = re.fullmatch(r"data:(image/\w+);base64,([A-Za-z0-9+/=]+)", source)
        assert found, f"an image that is not inlined: {source[:60]}"
        images.append((found[1], Image.open(BytesIO(base64.b64decode(found[2])))))
    return images


def assert_offline(page: str) -> None:
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    assert "src=" not in re.sub(r'<img [^>]*src="data:[^"]*"', "", page)


def site_exif(taken: str | None, original: str | None, lat, lat_ref, lon, lon_ref) -> Image.Exif:
    """EXIF as a camera writes it: DateTime in IFD0, DateTimeOriginal in the Exif IFD,
    the position as degrees, minutes, seconds with N/S and E/W in the GPS IFD."""
    exif = Image.Exif()
    if taken is not None:
        exif[0x0132] = taken
    if original is not None:
        exif.get_ifd(0x8769)[0x9003] = original
    if lat is not None:
        gps = exif.get_ifd(0x8825)
        gps[1], gps[2], gps[3], gps[4] = lat_ref, lat, lon_ref, lon
    return exif


def mosaic(tiles: list[Path]) -> Image.Image:
    """The 227 px sample crops side by side: one scan window each at scan.patch_size=227."""
    photo = Image.new("RGB", (227 * len(tiles), 227))
    for number, tile in enumerate(tiles):
        photo.paste(Image.open(tile).convert("RGB").resize((227, 227)), (227 * number, 0))
    return photo


# --- a folder scan with the trained classifier ---------------------------------------------


@pytest.fixture
def site(tmp_path: Path, sample_root: Path) -> Path:
    """A site folder: photos with 0, 1 and 2 cracked windows of 3, one with EXIF date and
    GPS, one in a sub-folder, one too small for the window and one that is no image."""
    positives = sorted((sample_root / "Positive").iterdir())
    negatives = sorted((sample_root / "Negative").iterdir())
    root = tmp_path / "site"
    (root / "pier").mkdir(parents=True)
    mosaic(negatives[:3]).save(root / "sound.png")
    exif = site_exif(
        "2023:01:02 03:04:05",
        "2024:05:03 14:22:10",
        (52.0, 31.0, 12.0),
        "N",
        (13.0, 24.0, 36.0),
        "W",
    )
    mosaic([negatives[3], positives[0], negatives[4]]).save(root / "one.jpg", exif=exif)
    mosaic([positives[1], negatives[5], positives[2]]).save(root / "pier" / "two.png")
    Image.open(positives[3]).resize((100, 100)).save(root / "tiny.png")
    (root / "notes.jpg").write_bytes(b"not a photo at all")
    return root


def test_a_folder_scan_ranks_its_photos_by_the_stated_score(predict_cfg, site, tmp_path):
    out = tmp_path / "report"
    summary = run(predict_cfg(f"inputs=[{site}]", "mode=scan", f"report_dir={out}"))
    assert summary["site_report"] == [str(out / "site_summary.csv"), str(out / "site_report.html")]
    rows = read_csv(out / "site_summary.csv")
    scanned, skipped = rows[:3], rows[3:]
    assert [r["file"] for r in scanned] == ["two.png", "one.jpg", "sound.png"]
    assert [r["rank"] for r in scanned] == ["1", "2", "3"]
    assert scanned[0]["folder"] == str(site / "pier")
    assert all(r["score_rule"] == WINDOW_SCORE for r in rows)

    # each score is the sum of P(crack) over the photo's cracked windows, from its own
    # scan table; the CSV lists them highest first
    for row in scanned:
        table = read_csv(out / row["figure"].replace("_scan.png", "_scan.csv"))
        probs = np.array([float(t["prob_crack"]) for t in table])
        cracked = np.array([t["label"] == "Positive" for t in table])
        assert float(row["score"]) == pytest.approx(probs[cracked].sum(), abs=1e-4)
        assert float(row["max_prob_crack"]) == pytest.approx(probs.max(), abs=1e-4)
        assert (row["cracked_windows"], row["windows"]) == (str(cracked.sum()), "3")
        assert row["verdict"] == ("Crack" if cracked.any() else "No crack")
        assert row["unfamiliar_share"] == "0.0000"  # no feature statistics in this checkpoint
        assert row["cracks"] == row["crack_length_px"] == ""  # a classifier measures none
    keys = [(float(r["score"]), float(r["max_prob_crack"])) for r in scanned]
    assert keys == sorted(keys, reverse=True) and keys[0][0] > keys[1][0] > 0
    assert [r["cracked_windows"] for r in scanned] == ["2", "1", "0"]
    assert scanned[2]["score"] == "0.0000" and scanned[2]["verdict"] == "No crack"

    # EXIF: DateTimeOriginal before DateTime, west negative; a PNG without EXIF is blank
    one = scanned[1]
    assert one["taken"] == "2024-05-03 14:22:10"
    assert (one["latitude"], one["longitude"]) == ("52.520000", "-13.410000")
    assert scanned[0]["taken"] == scanned[0]["latitude"] == scanned[0]["longitude"] == ""

    # the skipped photos last, unranked, with the reason
    assert {r["file"]: r["rank"] for r in skipped} == {"tiny.png": "", "notes.jpg": ""}
    reasons = {r["file"]: r["verdict"] for r in skipped}
    assert reasons["tiny.png"].startswith("skipped: 100x100, smaller than scan.patch_size=227")
    assert reasons["notes.jpg"].startswith("skipped: cannot be opened as an image")

    page = (out / "site_report.html").read_text()
    assert_offline(page)
    images = inlined(page)
    assert [mime for mime, _ in images] == ["image/jpeg"] * 3  # one overlay per photo
    assert [image.size for _, image in images] == [(320, 107)] * 3  # 681 x 227 at 320 px
    assert page.index("two.png") < page.index("one.jpg") < page.index("sound.png")
    assert f"<b>Ranked by</b> {html.escape(WINDOW_SCORE)}" in page
    assert "<td>pixels only</td>" in page  # no scan.mm_per_px
    assert "best.ckpt (run run)" in page  # the checkpoint's file and its run folder
    assert "P(crack) \u2265 0.5" in page and "227 px, stride 227 px" in page
    assert "3 scanned, 2 skipped" in page
    assert "2024-05-03 14:22:10" in page and "52.520000, -13.410000" in page
    skipped_part = page[page.index("Skipped (2)") :]
    assert "tiny.png" in skipped_part and "smaller than scan.patch_size=227" in skipped_part
    assert "notes.jpg</b>: cannot be opened as an image" in skipped_part


# --- EXIF as cameras and editors leave it ----------------------------------------------------


def test_exif_date_falls_back_to_datetime_and_south_is_negative(tmp_path):
    exif = site_exif("2023:01:02 03:04:05", None, (33.0, 52.0, 4.8), "S", (151.0, 12.0, 36.0), "E")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    found = read_exif(tmp_path / "a.jpg")
    assert found.taken == "2023-01-02 03:04:05"
    assert found.latitude == pytest.approx(-(33 + 52 / 60 + 4.8 / 3600))
    assert found.longitude == pytest.approx(151 + 12 / 60 + 36 / 3600)


@pytest.mark.parametrize(
    "taken, lat, lat_ref",
    [
        ("not a date", (52.0, 31.0), "N"),  # two parts, not three
        ("2024:13:45 25:00:00", (TiffImagePlugin.IFDRational(1, 0), 0.0, 0.0), "N"),  # 1/0
        ("", (95.0, 0.0, 0.0), "N"),  # beyond the pole
        ("2024-05-03", (52.0, 31.0, 12.0), "Q"),  # no such reference
    ],
)
def test_odd_exif_leaves_blanks_and_never_fails(tmp_path, taken, lat, lat_ref):
    exif = site_exif(taken, None, lat, lat_ref, (13.0, 24.0, 36.0), "E")
    Image.new("RGB", (8, 8)).save(tmp_path / "odd.jpg", exif=exif)
    assert read_exif(tmp_path / "odd.jpg") == Exif()


def test_no_exif_or_no_image_is_blank(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff")
    assert read_exif(tmp_path / "plain.jpg") == Exif()
    assert read_exif(tmp_path / "broken.jpg") == Exif()
    assert read_exif(tmp_path / "missing.jpg") == Exif()


# --- crack-map scans -------------------------------------------------------------------------


def map_photo(folder: Path, name: str, length: float, max_prob: float, cracks: int) -> SitePhoto:
    figure = folder / f"{name}_scan.png"
    Image.new("RGB", (640, 480), (90, 90, 90)).save(figure)
    measures = {
        "cracks": cracks,
        "crack_length_px": length,
        "max_width_px": 4.0 if cracks else 0.0,
        "crack_length_mm": length * 0.1,
        "max_width_mm": 0.4 if cracks else 0.0,
    }
    cracked = int(length > 0)
    return SitePhoto(
        folder / f"{name}.jpg", figure, 12, cracked, 0.9 * cracked, max_prob, 0.0, measures
    )


def test_a_crack_map_scan_ranks_by_crack_length_then_by_the_highest_probability(tmp_path):
    photos = [
        map_photo(tmp_path, "short", 40.0, 0.99, 1),
        map_photo(tmp_path, "none", 0.0, 0.30, 0),
        map_photo(tmp_path, "long_unsure", 350.0, 0.61, 2),
        map_photo(tmp_path, "long_sure", 350.0, 0.97, 1),
    ]
    context = ScanContext(
        str(tmp_path / "adapted" / "checkpoints" / "last.ckpt"), 0.4, 128, 64, 0.1
    )
    written = write_site_report(tmp_path, photos, [], context)
    rows = read_csv(written[0])
    assert [r["file"] for r in rows] == [
        "long_sure.jpg",
        "long_unsure.jpg",
        "short.jpg",
        "none.jpg",
    ]
    assert [r["score"] for r in rows] == ["350.0000", "350.0000", "40.0000", "0.0000"]
    assert all(r["score_rule"] == MAP_SCORE for r in rows)
    assert f"<b>Ranked by</b> {html.escape(MAP_SCORE)}" in written[1].read_text()
    assert (rows[0]["crack_length_px"], rows[0]["crack_length_mm"]) == ("350.0", "35.00")
    assert (rows[0]["max_width_px"], rows[0]["max_width_mm"]) == ("4.00", "0.400")
    assert [r["verdict"] for r in rows] == ["Crack", "Crack", "Crack", "No crack"]
    page = written[1].read_text()
    assert_offline(page)
    assert [image.size for _, image in inlined(page)] == [(320, 240)] * 4
    assert "last.ckpt (run adapted)" in page and "128 px, stride 64 px" in page
    assert "<td>0.1 mm per px</td>" in page
    assert "2, 350.0 px (35.00 mm) long, widest 4.00 px (0.400 mm)" in page


# --- the page's report of a crack-map model's photos -----------------------------------------


class BrightnessMap(MapNetwork):
    """A stand-in crack-map network: each pixel's P(crack) is its brightness / 255, so a
    white band on black is a crack of known length and width."""

    def crack_map(self, pixels: torch.Tensor) -> np.ndarray:
        return pixels.float().mean(dim=0).numpy() / 255


def banded_photo(path: Path, band: tuple[slice, slice] | None) -> Path:
    """A 160 x 120 black PNG, with a white band (rows, columns) where given."""
    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    if band is not None:
        pixels[band] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_the_pages_report_measures_a_crack_maps_cracks_as_a_folder_scan_does(tmp_path):
    from crack_lightning.commands.predict import scan
    from crack_lightning.inference.classifiers import LoadedModel
    from crack_lightning.inference.inspection import Inspector
    from crack_lightning.inference.scan import ScanSettings

    network = BrightnessMap(torch.nn.Identity(), torch.device("cpu"), 0.01)
    model = LoadedModel(str(tmp_path / "run" / "checkpoints" / "best.ckpt"), network, 40, 0.5, None)
    window = ScanSettings(patch_size=40, stride=40, unfamiliar_limit=None, mm_per_px=0.5)
    photos = [
        banded_photo(tmp_path / "site" / "blank.png", None),
        banded_photo(tmp_path / "site" / "short.png", (slice(80, 83), slice(30, 80))),
        banded_photo(tmp_path / "site" / "long.png", (slice(40, 43), slice(30, 130))),
    ]
    inspector = Inspector(model, window, 8, 10**6, tmp_path / "labels")
    session = tmp_path / "session"
    inspections, refused = inspector.scan(photos, 0.5, session)
    assert refused == []
    written = inspector.site_report(inspections, 0.5, session)
    names = [inspection.name for inspection in inspections]
    assert written == [
        session / "site_summary.csv",
        session / "site_report.html",
        *(session / f"{name}_cracks.csv" for name in names),
    ]
    rows = read_csv(written[0])
    # a band 100 (50) px long and 3 wide: its centre line 99 (49) steps of 1 px, 3 px
    # across; at 0.5 mm per px half that in mm. Ranked by length: the longest first.
    assert [r["file"] for r in rows] == ["long.png", "short.png", "blank.png"]
    assert [r["cracks"] for r in rows] == ["1", "1", "0"]
    assert [r["crack_length_px"] for r in rows] == ["99.0", "49.0", "0.0"]
    assert [r["crack_length_mm"] for r in rows] == ["49.50", "24.50", "0.00"]
    assert [r["max_width_px"] for r in rows] == ["3.00", "3.00", ""]
    assert [r["max_width_mm"] for r in rows] == ["1.500", "1.500", ""]
    assert [r["score"] for r in rows] == ["99.0000", "49.0000", "0.0000"]
    assert [r["verdict"] for r in rows] == ["Crack", "Crack", "No crack"]
    # 40 px windows cracked where the band covers at least 1% (16) of their pixels:
    # rows 40-42 reach 4 windows, rows 80-82 from column 30 to 79 reach 2
    assert [r["cracked_windows"] for r in rows] == ["4", "2", "0"]
    assert all(r["score_rule"] == MAP_SCORE for r in rows)
    page = written[1].read_text()
    assert "1, 99.0 px (49.50 mm) long, widest 3.00 px (1.500 mm)" in page
    assert "<td>none</td>" in page and "best.ckpt (run run)" in page
    with written[2 + names.index(inspections[2].name)].open() as handle:
        (crack,) = csv.DictReader(handle)
    assert (crack["length_px"], crack["max_width_px"]) == ("99.0", "3.00")

    # predict mode=scan on the same photos with the same model: the same report rows
    folder = tmp_path / "scan"
    cfg = SimpleNamespace(
        report_dir=folder, batch_size=8, threshold=0.5, num_workers=0, ckpt_path=model.source
    )
    scan(cfg, model, photos, window)
    scanned = read_csv(folder / "site_summary.csv")
    assert [{k: v for k, v in r.items() if k != "figure"} for r in scanned] == [
        {k: v for k, v in r.items() if k != "figure"} for r in rows
    ]
