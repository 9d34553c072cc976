"""The inspector's page (crack-app) used as a user would: a real headless Chromium drops a
photo, reads the overlay, verdict and patch table, moves the threshold (no new model call)
and marks patches, whose crops must land in the labels folder; gradio_client calls the same
page's API and must get the model's own scan figures, with a checkpoint and with its ONNX
export; bad input is a message, never a dead page."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crack_lightning.data.sources import scan_samples
from crack_lightning.data.synthetic import concrete_texture, draw_crack
from crack_lightning.inference import classifiers
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import (
    Inspection,
    Inspector,
    patch_at,
    patch_rows,
    photo_name,
    rethreshold,
    verdict,
)
from crack_lightning.inference.page import marks_line
from crack_lightning.inference.scan import ScanResult, ScanSettings, scan_photo

from .conftest import QUIET, compose_config, in_ci

if importlib.util.find_spec("gradio") is None:  # make setup installs the `app` extra
    if in_ci():
        pytest.fail("the inspector's page needs the `app` extra (Gradio)", pytrace=False)
    pytest.skip("the inspector's page needs the `app` extra (Gradio)", allow_module_level=True)

PATCH = 100  # the test photo is 3 x 3 patches of 100 px
CRACKED_TILES = (1, 4, 5)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WAIT_S = 30


@pytest.fixture(scope="module")
def page_model(tmp_path_factory, synthetic_root, backbone_weights) -> Path:
    """Real ImageNet features and a head trained 3 epochs on the tiny synthetic set: a few
    seconds, and it tells the synthetic cracks apart (P(crack) ~0.7-0.8 against < 0.45)."""
    from crack_lightning.training.run import train

    run_dir = tmp_path_factory.mktemp("page_model") / "run"
    overrides = [
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={run_dir.parent / 'cache'}",
        f"data.root={synthetic_root}",
        f"model.weights_path={backbone_weights}",
        "data.image_size=64",
        "trainer.max_epochs=3",
        "logger=none",
    ]
    train(compose_config("train", [*overrides, *QUIET]))
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def wall(tmp_path_factory) -> Path:
    """A 300 x 300 synthetic wall: nine 100 px tiles, three of them cracked."""
    rng = np.random.default_rng(1)
    photo = Image.new("RGB", (3 * PATCH, 3 * PATCH))
    for tile in range(9):
        image = Image.fromarray(concrete_texture(rng, PATCH))
        if tile in CRACKED_TILES:
            image = draw_crack(image, rng)
        photo.paste(image, ((tile % 3) * PATCH, (tile // 3) * PATCH))
    path = tmp_path_factory.mktemp("photos") / "wall.png"
    photo.save(path)
    return path


@dataclass
class App:
    url: str
    labels: Path
    files: Path
    model_calls: Callable[[], int]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def forget_gradio_settings(patch: pytest.MonkeyPatch) -> None:
    """The page sets Gradio's environment variables; they are restored after the test."""
    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):
        patch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def app(page_model, tmp_path_factory) -> Iterator[App]:
    """crack-app served in this process on a free 127.0.0.1 port; every batch the model
    classifies is counted."""
    from crack_lightning.commands.app import start

    folder = tmp_path_factory.mktemp("app")
    calls = []
    original = classifiers.LoadedModel.unfamiliar_scorer

    def counted(self):
        score = original(self)

        def run(images):
            calls.append(len(images))
            return score(images)

        return run

    cfg = compose_config(
        "app",
        [
            f"ckpt_path={page_model}",
            f"labels_dir={folder / 'labels'}",
            f"files_dir={folder / 'files'}",
            f"scan.patch_size={PATCH}",
            "max_pixels=100000",  # the 300 x 300 wall passes, a 400 x 400 photo does not
            "device=cpu",
            f"port={free_port()}",
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        forget_gradio_settings(patch)
        patch.setattr(classifiers.LoadedModel, "unfamiliar_scorer", counted)
        page, _ = start(cfg)
        try:
            yield App(page.local_url, folder / "labels", folder / "files", lambda: len(calls))
        finally:
            page.close()


def model_scan(model_file: Path, wall: Path, threshold: float = 0.5) -> ScanResult:
    """The scan the page must show: inference/scan.py run directly."""
    model = load_classifier(model_file, "cpu")
    with Image.open(wall) as photo:
        return scan_photo(model, photo.convert("RGB"), wall, PATCH, PATCH, 32, threshold)


# --- the page in a real browser ---------------------------------------------------------


def chromium():
    """Headless Chromium through selenium; skipped with the reason where none is found,
    except under CI=true, where a missing browser fails (make browser-tools installs it)."""
    binary = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        binary = None
    if binary is None or driver is None:
        reason = (
            "no Chromium and chromedriver (and selenium) found: `make browser-tools` installs "
            "Debian's chromium and chromium-driver"
        )
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1400,1900",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_for(condition: Callable[[], object], what: str) -> object:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the element is being re-rendered
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page never showed {what} within {WAIT_S} s")


def table_rows(browser, elem_id: str) -> list[list[str]]:
    """The text of a Dataframe's body cells, row by row."""
    return browser.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} [role=row]`)]"
        ".map(row => [...row.querySelectorAll('[role=gridcell]')]"
        ".map(cell => cell.textContent.trim())).filter(row => row.length)",
        elem_id,
    )


def test_the_page_in_a_browser_scans_rethresholds_and_saves_marks(app, wall, page_model):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    expected = model_scan(page_model, wall)
    cracked = set(np.flatnonzero(expected.cracked).tolist())
    assert cracked == set(CRACKED_TILES), expected.probs  # the model sees the drawn cracks
    browser = chromium()
    try:
        browser.get(app.url)
        upload = wait_for(
            lambda: browser.find_element(By.CSS_SELECTOR, "#photos input[type=file]"),
            "the photo drop",
        )
        calls = app.model_calls()
        upload.send_keys(str(wall))
        wait_for(lambda: len(table_rows(browser, "patches")) == 9, "the patch table")
        verdict_text = wait_for(lambda: browser.find_element(By.ID, "verdict").text, "a verdict")
        assert (
            f"{photo_name(wall)}: Crack: 3 of 9 patches cracked ({3 / 9:.1%} of the photo)"
            in verdict_text
        )
        rows = table_rows(browser, "patches")
        assert [row[6] for row in rows] == expected.labels()
        assert [float(row[4]) for row in rows] == pytest.approx(expected.probs, abs=1e-4)
        image = wait_for(
            lambda: browser.find_element(By.CSS_SELECTOR, "#overlay img"), "the overlay"
        )
        natural = browser.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
        )
        assert natural == [3 * PATCH, 3 * PATCH]
        assert app.model_calls() == calls + 1  # one batch of 9 patches
        scanned_calls = app.model_calls()

        # the threshold slider's number box, as a user types into it and leaves it
        above = round(float(expected.probs.max()) + 0.01, 3)
        box = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(above), Keys.TAB)
        wait_for(
            lambda: "No crack: 0 of 9" in browser.find_element(By.ID, "verdict").text,
            "the verdict at the new threshold",
        )
        wait_for(
            lambda: {row[6] for row in table_rows(browser, "patches")} == {"Negative"},
            "the table at the new threshold",
        )
        assert app.model_calls() == scanned_calls  # the kept P(crack), not the model

        # click the middle of patch 1 (x 100-200, y 0-100): marked crack (the default)
        def click(x: int, y: int) -> None:
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
            size = browser.execute_script(
                "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]",
                image,
            )
            # the figure fits its box, centred, never enlarged (as Gradio maps a click)
            scale = min(size[0] / natural[0], size[1] / natural[1], 1)
            ActionChains(browser).move_to_element_with_offset(
                image, round((x - natural[0] / 2) * scale), round((y - natural[1] / 2) * scale)
            ).click().perform()

        click(150, 50)
        name = photo_name(wall)  # its file stem and content digest
        crop = app.labels / "window_100" / "Positive" / f"{name}_x0100_y0000_s100.png"
        wait_for(crop.exists, f"the crop {crop}")
        with Image.open(wall) as photo, Image.open(crop) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(photo.crop((100, 0, 200, 100))))
        wait_for(lambda: table_rows(browser, "patches")[1][7] == "Positive", "the mark")

        # patch 8 (bottom right) as not crack, then patch 1 changed to not crack
        browser.find_element(By.CSS_SELECTOR, "#mark-as input[value='not crack']").click()
        click(250, 250)
        wait_for(
            (app.labels / "window_100" / "Negative" / f"{name}_x0200_y0200_s100.png").exists,
            "crop 8",
        )
        # what a folder source (data.sources.NAME.root=labels_dir) will train on
        assert scan_samples(app.labels / "window_100") == [
            (str(app.labels / "window_100" / "Negative" / f"{name}_x0200_y0200_s100.png"), 0),
            (str(crop), 1),
        ]
        click(150, 50)
        wait_for(
            (app.labels / "window_100" / "Negative" / f"{name}_x0100_y0000_s100.png").exists,
            "crop 1",
        )
        assert not crop.exists()
        assert app.model_calls() == scanned_calls
        if screenshot := os.environ.get("CRACK_APP_SCREENSHOT"):
            browser.find_element(By.CSS_SELECTOR, "#mark-as input[value='crack']").click()
            click(150, 50)  # patches 1 and 4 (cracked) marked crack, for the picture
            click(150, 150)
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys("0.5", Keys.TAB)
            wait_for(lambda: "Crack: 3 of 9" in browser.find_element(By.ID, "verdict").text, "")
            time.sleep(1)  # the overlay image loads
            browser.save_screenshot(screenshot)
    finally:
        browser.quit()


# --- the same page through its API ------------------------------------------------------


def read_table(value: dict) -> list[list]:
    """A Dataframe output as gradio_client returns it (an update or a value)."""
    value = value.get("value", value)
    return value["data"]


def test_gradio_client_gets_the_models_own_scan_with_a_checkpoint_and_onnx(
    app, wall, page_model, tmp_path
):
    from gradio_client import Client, handle_file

    from crack_lightning.inference.export import export_model

    client = Client(app.url, verbose=False, download_files=str(tmp_path / "client"))
    expected = model_scan(page_model, wall)
    outputs = client.predict([handle_file(str(wall))], 0.5, api_name="/scan")
    _, _, verdict_text, patches, summary, files, status = outputs
    name = photo_name(wall)
    assert verdict_text == f"### {name}: {verdict(expected)}"
    rows = read_table(patches)
    assert [row[6] for row in rows] == expected.labels()
    assert [row[4] for row in rows] == pytest.approx(expected.probs, abs=1e-4)
    assert [(row[1], row[2]) for row in rows] == [tuple(b) for b in expected.boxes.tolist()]
    assert read_table(summary) == [[name, "Crack", 9, 3, 0, f"{3 / 9:.1%}", "best.ckpt"]]
    table = next(Path(f) for f in files if f.endswith(f"{name}_scan.csv"))
    with table.open() as handle:
        written = list(csv.DictReader(handle))
    assert [float(r["prob_crack"]) for r in written] == pytest.approx(expected.probs, abs=1e-6)
    assert status == "Scanned 1 photo(s)."

    # the exported ONNX model, dropped on the page and asked to rescan the photo, gives
    # its own (same) figures
    onnx_file = export_model(load_classifier(page_model, "cpu"), "onnx", tmp_path / "m.onnx")
    _, model_info, *_ = client.predict(handle_file(str(onnx_file)), api_name="/model")
    assert "m.onnx" in model_info
    outputs = client.predict(0.5, api_name="/rescan")
    expected_onnx = model_scan(onnx_file, wall)
    assert [row[4] for row in read_table(outputs[2])] == pytest.approx(
        expected_onnx.probs, abs=1e-4
    )
    assert [row[6] for row in read_table(outputs[2])] == expected_onnx.labels()
    assert read_table(outputs[3])[0][-1] == "m.onnx"
    # and back to the checkpoint
    _, model_info, *_ = client.predict(handle_file(str(page_model)), api_name="/model")
    assert "best.ckpt" in model_info


def test_bad_input_is_a_message_and_the_page_goes_on(app, wall, page_model, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app.url, verbose=False, download_files=str(tmp_path / "client"))
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a photo")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (400, 400)).save(huge)  # 160 000 pixels > max_pixels=100000
    outputs = client.predict(
        [handle_file(str(p)) for p in (not_image, huge)], 0.5, api_name="/scan"
    )
    status = outputs[-1]
    assert status.startswith("No photo could be scanned.")
    assert "skipped **notes.jpg**: cannot be opened as an image" in status
    assert "skipped **huge.png**: 400x400 pixels" in status and "max_pixels=100000" in status
    # a file that is not a model: the page keeps its model and still scans
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"not a checkpoint")
    _, model_info, *_ = client.predict(handle_file(str(fake)), api_name="/model")
    assert "best.ckpt`" in model_info and "model.ckpt" not in model_info
    outputs = client.predict([handle_file(str(wall))], 0.5, api_name="/scan")
    assert outputs[-1] == "Scanned 1 photo(s)."


def test_a_bad_checkpoint_at_start_is_one_error_line(tmp_path, capsys, monkeypatch):
    from crack_lightning.commands.app import main

    forget_gradio_settings(monkeypatch)
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"not a checkpoint")
    folders = [f"labels_dir={tmp_path / 'labels'}", f"files_dir={tmp_path / 'files'}"]
    assert main([f"ckpt_path={fake}", *folders]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error:") and str(fake) in err and "Traceback" not in err
    assert main(["ckpt_path=x.ckpt", "max_pixels=0"]) == 2
    assert "error: max_pixels=0 must be an integer >= 1." in capsys.readouterr().err


def test_without_the_app_extra_crack_app_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from crack_lightning.commands.app import main

    forget_gradio_settings(monkeypatch)
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    folders = [f"labels_dir={tmp_path / 'labels'}", f"files_dir={tmp_path / 'files'}"]
    assert main(["ckpt_path=/nowhere.ckpt", *folders]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: crack-app needs the `app` extra (Gradio): pip install -e '.[app]' "
        "(or pip install gradio gradio_client)."
    )


# --- what the page does, without a page -------------------------------------------------


def inspection(width: int = 300, stride: int = 50) -> Inspection:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, width, 3), np.uint8))
    boxes = np.array([(x, y) for y in range(0, 101, stride) for x in range(0, width - 99, stride)])
    probs = np.linspace(0.1, 0.9, len(boxes))
    return Inspection(
        "wall", photo, ScanResult(Path("wall.png"), width, 200, 100, boxes, probs, 0.5)
    )


def test_a_click_picks_the_nearest_covering_patch_on_a_shrunk_overlay(tmp_path):
    item = inspection()
    # overlapping windows (stride 50): (130, 30) lies in those at x 50 and 100 (centres
    # 100 and 150), y 0
    index = patch_at(item, 130, 30)
    assert tuple(item.result.boxes[index]) == (100, 0)
    # a photo wider than the overlay's 2048 px: clicks are scaled back to the photo
    wide = inspection(width=4096, stride=100)
    assert wide.figure_scale == 0.5
    assert tuple(wide.result.boxes[patch_at(wide, 1025, 10)]) == (2000, 0)
    assert patch_at(wide, 10, 99) is not None and patch_at(wide, 10, 150) is None


def test_a_mark_moves_between_the_class_folders_and_can_be_cleared(tmp_path):
    item = inspection()
    model = classifiers.LoadedModel("m", None, 64, None, None)
    window = ScanSettings(patch_size=100, stride=50, unfamiliar_limit=None)
    inspector = Inspector(model, window, 8, 10**6, tmp_path / "labels")
    crop = inspector.mark(item, 3, "Positive")
    assert crop == tmp_path / "labels" / "window_100" / "Positive" / "wall_x0150_y0000_s100.png"
    inspector.marks_needed = 6
    assert inspector.mark_counts(100) == {"Negative": 0, "Positive": 1}
    assert "adapting needs at least 6 of each: 6 more Negative, 5 more Positive" in marks_line(
        inspector, 100
    )
    assert Image.open(crop).size == (100, 100)
    assert patch_rows(item)[3][7] == "Positive"
    moved = inspector.mark(item, 3, "Negative")
    assert moved.exists() and not crop.exists()
    assert inspector.mark_counts(100) == {"Negative": 1, "Positive": 0}
    assert inspector.mark_counts(128) == {"Negative": 0, "Positive": 0}  # another window
    assert inspector.mark(item, 3, None) is None
    assert not moved.exists() and patch_rows(item)[3][7] == ""
    # a new threshold changes labels and the verdict, from the kept probabilities
    item.result.threshold = 0.95
    assert verdict(item.result).startswith("No crack: 0 of")


def test_a_new_threshold_rewrites_the_files_of_the_photos_it_relabels(tmp_path):
    item = inspection()  # P(crack) from 0.1 to 0.9, at threshold 0.5

    def labels() -> list[str]:
        with (tmp_path / "wall_scan.csv").open() as handle:
            return [row["label"] for row in csv.DictReader(handle)]

    files = rethreshold([item], 0.05, tmp_path)
    assert files == [tmp_path / "wall_scan.png", tmp_path / "wall_scan.csv"]
    assert labels() == ["Positive"] * len(item.result.probs)
    written = [path.stat().st_mtime_ns for path in files]
    rethreshold([item], 0.08, tmp_path)  # no patch changes label: nothing to rewrite
    assert [path.stat().st_mtime_ns for path in files] == written
    rethreshold([item], 0.95, tmp_path)
    assert labels() == ["Negative"] * len(item.result.probs)
    assert Image.open(files[0]).size == (300, 200)


def test_the_pages_window_control_scans_the_next_photos_with_its_window(app, wall, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app.url, verbose=False, download_files=str(tmp_path / "client"))
    outputs = client.predict([handle_file(str(wall))], 0.5, 150, 150, api_name="/scan")
    rows = read_table(outputs[3])
    assert [(row[1], row[2]) for row in rows] == [(0, 0), (150, 0), (0, 150), (150, 150)]
    fresh = Client(app.url, verbose=False, download_files=str(tmp_path / "fresh"))
    outputs = fresh.predict([handle_file(str(wall))], 0.5, api_name="/scan")
    assert len(read_table(outputs[3])) == 9  # the page's own window (scan.patch_size=100)
