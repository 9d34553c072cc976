"""`crack-app`: the inspector's page in the browser (settings: conf/app.yaml; the page
itself: inference/page.py, what it does: inference/inspection.py; docs/app.md).

crack-app ckpt_path=RUN/checkpoints/best.ckpt [labels_dir=DIR] [port=7860]
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig

from crack_lightning.cli import STOPPED, run_tool
from crack_lightning.errors import PredictionError
from crack_lightning.inference.adaptation import Adapter
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import Inspector
from crack_lightning.inference.scan import ScanSettings
from crack_lightning.io import check_writable
from crack_lightning.settings import OPEN_UNIT, Rule, above, at_least, settings_of

INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C before the page was served, as a shell reports it


@dataclass(frozen=True)
class AppSettings:
    """conf/app.yaml: crack-app, the inspector's page (its scan.* are ScanSettings)."""

    settings_error = PredictionError
    ckpt_path: str
    labels_dir: str
    files_dir: str | None  # null: a new folder in the system's temp dir
    threshold: Annotated[float | None, OPEN_UNIT]  # null: the model's stored threshold
    max_pixels: Annotated[int, at_least(1)]
    session_photos: Annotated[int, at_least(1)]
    session_minutes: Annotated[float, above(0)]
    batch_size: Annotated[int, at_least(1)]
    device: str
    host: str
    port: Annotated[int | None, Rule("in [1, 65535] or null", lambda v: 1 <= v <= 65535)]
    open_browser: bool
    adapt_settings: list[str]  # train.py settings the page's adaptation adds


def adapt_minimum(settings: Sequence[str]) -> int:
    """The fewest marks of each class experiment=adapt splits (its fractions), composed
    with adapt_settings: a setting train.py does not take is named now, not when the
    page's adaptation starts."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from crack_lightning.cli import compose_command
    from crack_lightning.data.splits import min_class_images

    try:
        data = compose_command("train", ["experiment=adapt", *settings]).data
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0].rstrip(".")
        raise PredictionError(
            f"adapt_settings={list(settings)} are not train.py settings ({first})."
        ) from None
    return min_class_images(float(data.val_fraction), float(data.test_fraction))


def start(cfg: DictConfig) -> tuple[Any, Path | None]:
    """Check the settings, the folders and the model, then serve the page in the
    background; returns the served page and the temp folder made for its files (None
    where files_dir was chosen)."""
    settings = settings_of(cfg, AppSettings, "", others=("paths", "scan", "task_name"))
    window = settings_of(cfg.scan, ScanSettings, "scan")
    from crack_lightning.inference import page

    labels_dir = Path(settings.labels_dir)
    check_writable(labels_dir, "labels_dir", folder=True)
    if settings.files_dir is None:
        files_dir = temporary = Path(tempfile.mkdtemp(prefix="crack-app-"))
    else:
        files_dir, temporary = Path(settings.files_dir), None
        check_writable(files_dir, "files_dir", folder=True)
    try:
        page.use_files_dir(files_dir)
        page.gradio()  # the install line, before the model is read
        needed = adapt_minimum(settings.adapt_settings)
        classifier = load_classifier(settings.ckpt_path, settings.device)
        inspector = Inspector(
            classifier, window, settings.batch_size, settings.max_pixels, labels_dir
        )
        inspector.marks_needed = needed
        built = page.build_page(
            inspector,
            settings.threshold,
            files_dir,
            Adapter(labels_dir, Path(cfg.paths.data_dir), settings.adapt_settings),
            settings.device,
            settings.session_photos,
            settings.session_minutes,
        )
        address = page.serve(built, settings.host, settings.port, settings.open_browser)
    except BaseException:
        remove(temporary)
        raise
    print(f"The inspector's page: {address} (Ctrl-C stops it). Marks go to {labels_dir}.")
    return built, temporary


def remove(temporary: Path | None) -> None:
    """The temp folder of the page's files, once the page is stopped."""
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)


def serve_until_stopped(cfg: DictConfig) -> int | None:
    """The page, served until Ctrl-C (exit 0 once served, 130 before) or SIGTERM (exit
    143), then closed and its temp folder removed."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(STOPPED))
    try:
        try:
            served, temporary = start(cfg)
        except KeyboardInterrupt:
            return INTERRUPTED
        try:
            served.block_thread()  # returns on Ctrl-C
        finally:
            served.close()
            remove(temporary)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: settings from conf/app.yaml."""
    return run_tool("app", serve_until_stopped, argv)


if __name__ == "__main__":
    raise SystemExit(main())
