"""From marks to a better model on the inspector's page: "Adapt from marks" refuses in one
line (too few marks, a model that is no training checkpoint, an adaptation running),
runs `train.py experiment=adapt` in the background with its progress on the page, then
names the new checkpoint and loads it; a window folder of marks and masked photos adapts
from both. Through gradio_client, on a page like tests/test_app.py's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from crack_lightning.inference import adaptation
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import Inspector
from crack_lightning.inference.page import adapt_refusal
from crack_lightning.inference.scan import ScanSettings

from .conftest import QUIET, compose_config
from .test_adapt import CROP, crops, manifest, masked_photos
from .test_app import App, forget_gradio_settings, free_port, page_model  # noqa: F401

WINDOW = CROP  # the page's window: its marks' folder, the masked photos' tiles
WAIT_S = 120  # the real adaptation: about 15 s on 2 cores
# train.py stood in for by a script: a progress line, then it waits for the file
# $FAKE_GO: "fail" ends it with an error line, anything else with init_from copied as
# the run's best checkpoint
FAKE_TRAIN = """
import os, shutil, sys, time
from pathlib import Path
settings = dict(word.split("=", 1) for word in sys.argv[1:] if "=" in word)
out = Path(settings["paths.output_dir"])
print("[2026-01-01 10:00:00,000][crack_lightning.training.callbacks][INFO] - "
      "epoch 0: batch 1/2, 1 s, about 1 s left in the epoch", flush=True)
go = Path(os.environ["FAKE_GO"])
while not go.exists():
    time.sleep(0.05)
if go.read_text() == "fail":
    print("\\nerror: data.sources.site: too few", file=sys.stderr, flush=True)
    sys.exit(2)
(out / "checkpoints").mkdir()
shutil.copy(settings["init_from"], out / "checkpoints" / "best.ckpt")
"""


# --- the page's button ------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapt_app(page_model, backbone_weights, tmp_path_factory) -> Iterator[App]:  # noqa: F811
    """crack-app whose adaptations are small: one epoch, no worker processes."""
    from crack_lightning.commands.app import start

    folder = tmp_path_factory.mktemp("adapt_app")
    small = [f"model.weights_path={backbone_weights}", "trainer.max_epochs=1", *QUIET]
    cfg = compose_config(
        "app",
        [
            f"ckpt_path={page_model}",
            f"labels_dir={folder / 'labels'}",
            f"files_dir={folder / 'files'}",
            f"paths.data_dir={folder / 'data'}",
            f"scan.patch_size={WINDOW}",
            "device=cpu",
            f"port={free_port()}",
            "adapt_settings=[{}]".format(",".join(f"'{setting}'" for setting in small)),
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        forget_gradio_settings(patch)
        page, _ = start(cfg)
        try:
            yield App(page.local_url, folder / "labels", folder / "files", lambda: 0)
        finally:
            page.close()


def client_of(app: App, folder: Path):
    from gradio_client import Client

    return Client(app.url, verbose=False, download_files=str(folder))


def wait_until(client, done: Callable[[str], bool], limit_s: float = WAIT_S) -> list[str]:
    """Poll the adaptation's line (as the page's timer does) until `done`; every line."""
    lines, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        lines.append(client.predict(api_name="/adapt_progress")[0])
        if done(lines[-1]):
            return lines
        time.sleep(0.3)
    raise AssertionError(f"the adaptation's line never got there: {lines[-3:]}")


def the_run(app: App, before: set[Path]) -> Path:
    (run,) = set((app.labels / "adapted").iterdir()) - before
    return run


def test_the_button_refuses_too_few_marks_in_one_line(adapt_app, tmp_path):
    client = client_of(adapt_app, tmp_path / "client")
    crops(adapt_app.labels / "window_60", 2, 5)
    line, *_ = client.predict(60, 30, api_name="/adapt")
    # experiment=adapt's fractions 0.2 and 0.1 need 6 of each class
    assert line == (
        f"Not started: {adapt_app.labels / 'window_60'} holds 2 Negative, 5 Positive; "
        "adapting needs at least 6 of each: 4 more Negative, 1 more Positive."
    )
    assert not (adapt_app.labels / "adapted").exists()  # nothing started


def test_adapting_refuses_a_model_that_is_no_training_checkpoint(tmp_path, page_model):  # noqa: F811
    """An exported model (here named so) holds no training state to start from."""
    model = load_classifier(page_model, "cpu")
    exported = replace(model, source=str(tmp_path / "m.onnx"))
    labels = tmp_path / "labels"
    inspector = Inspector(exported, ScanSettings(WINDOW, WINDOW, None), 8, 10**6, labels)
    crops(inspector.marks_folder(WINDOW), 6, 6)
    inspector.marks_needed = 6
    adapter = adaptation.Adapter(labels, tmp_path / "data")
    assert adapt_refusal(inspector, adapter, WINDOW) == (
        "Not started: adapting starts from a training checkpoint (.ckpt), and the page's "
        "model is m.onnx: load the checkpoint it was exported from as Another model first."
    )
    inspector.use(model)
    assert adapt_refusal(inspector, adapter, WINDOW) is None


def test_the_button_shows_progress_then_the_checkpoint_and_loads_it(
    adapt_app,
    page_model,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """train.py stood in for: the page's lines while it runs, fails, and succeeds."""
    monkeypatch.setattr(adaptation, "TRAIN", ("-c", FAKE_TRAIN))
    go = tmp_path / "go"
    monkeypatch.setenv("FAKE_GO", str(go))
    client = client_of(adapt_app, tmp_path / "client")
    crops(adapt_app.labels / "window_80", 6, 6)
    go.write_text("fail")
    runs = set((adapt_app.labels / "adapted").glob("*"))
    line, *_ = client.predict(80, 40, api_name="/adapt")
    assert line.startswith("Adapting (")
    failed = the_run(adapt_app, runs)
    lines = wait_until(client, lambda line: not line.startswith("Adapting ("))
    assert lines[-1] == (
        f"Adapting failed (exit 2): error: data.sources.site: too few (log {failed / 'adapt.log'})"
    )

    go.unlink()
    runs.add(failed)
    client.predict(80, 40, api_name="/adapt")
    run = the_run(adapt_app, runs)
    lines = wait_until(client, lambda line: "epoch 0" in line)
    assert lines[-1].startswith("Adapting (") and lines[-1].endswith(
        f"; log {run / 'adapt.log'}): epoch 0: batch 1/2, 1 s, about 1 s left in the epoch"
    )
    line, *_ = client.predict(80, 40, api_name="/adapt")
    assert line == f"Not started: an adaptation is running already ({run})."
    go.write_text("go")
    lines = wait_until(client, lambda line: not line.startswith("Adapting ("))
    best = run / "checkpoints" / "best.ckpt"
    assert lines[-1] == (
        f"Adapted: the new model is {best}. Load the adapted model makes it the page's model."
    )
    try:
        _, model_info, _, _, status = client.predict(api_name="/load_adapted")
        assert f"`best.ckpt` of `{run.name}`" in model_info
        assert status == "The next photos dropped are scanned with best.ckpt."
    finally:
        client.predict(handle_file_of(page_model), api_name="/model")


def handle_file_of(path: Path):
    from gradio_client import handle_file

    return handle_file(str(path))


def test_the_button_adapts_from_a_site_of_marks_and_masked_photos(
    adapt_app,
    page_model,  # noqa: F811
    tmp_path,
):
    """The real train.py experiment=adapt, one epoch: both kinds trained on."""
    site = adapt_app.labels / f"window_{WINDOW}"
    crops(site, 6, 6)
    masked_photos(site, 3)
    client = client_of(adapt_app, tmp_path / "client")
    runs = set((adapt_app.labels / "adapted").glob("*"))
    line, *_ = client.predict(WINDOW, WINDOW, api_name="/adapt")
    assert line.startswith("Adapting (")
    run = the_run(adapt_app, runs)
    lines = wait_until(client, lambda line: not line.startswith("Adapting ("))
    best = run / "checkpoints" / "best.ckpt"
    assert lines[-1] == (
        f"Adapted: the new model is {best}. Load the adapted model makes it the page's model."
    )
    assert best.is_file()
    # its log's lines were shown while it ran
    assert any(line.startswith("Adapting (") and not line.endswith("starting") for line in lines)
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    # the page's model: the checkpoint dropped on the page last (Gradio's copy of it)
    init_from = Path(overrides[1].removeprefix("init_from="))
    assert init_from.read_bytes() == page_model.read_bytes()
    assert overrides[:7] == [
        "experiment=adapt",
        f"init_from={init_from}",
        f"data.sources.site.root={site}",
        f"data.sources.site.tile_size={WINDOW}",
        f"data.sources.site.stride={WINDOW}",
        f"paths.output_dir={run}",
        f"paths.data_dir={adapt_app.labels.parent / 'data'}",
    ]
    rows = manifest(run)
    counts = {name: sum(r["source"] == name for r in rows) for name in ("site", "site_crops")}
    assert counts == {"site": 12, "site_crops": 12}  # 3 photos x 4 tiles; 6 + 6 crops
    _, model_info, *_ = client.predict(api_name="/load_adapted")
    try:
        assert f"`best.ckpt` of `{run.name}`" in model_info
    finally:
        client.predict(handle_file_of(page_model), api_name="/model")


def test_adapt_settings_train_py_does_not_take_are_one_error_line(tmp_path, capsys, monkeypatch):
    from crack_lightning.commands.app import main

    forget_gradio_settings(monkeypatch)
    folders = [f"labels_dir={tmp_path / 'labels'}", f"files_dir={tmp_path / 'files'}"]
    assert main(["ckpt_path=/nowhere.ckpt", *folders, "adapt_settings=['nonsense.key=1']"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: adapt_settings=['nonsense.key=1'] are not train.py settings (Could not "
        "override 'nonsense.key')."
    )


@pytest.mark.parametrize("folder", ["/data/site 1/it's [a,b]=c", "/data/window_128"])
def test_the_commands_folders_reach_train_py_as_they_are(folder):
    """A folder's name with spaces, quotes, commas or brackets is quoted for Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    command = adaptation.adapt_command(
        Path("/m/best.ckpt"), Path(folder), (128, 64), Path("/out"), Path("/d")
    )
    parsed = OverridesParser.create().parse_overrides(command[3:])
    values = {o.key_or_group: o.value() for o in parsed}
    assert values["data.sources.site.root"] == folder and values["init_from"] == "/m/best.ckpt"
    assert (
        values["data.sources.site.tile_size"] == 128 and values["paths.cache_dir"] == "/out/cache"
    )
