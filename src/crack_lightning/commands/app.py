"""`crack-app`: the inspector's page in the browser (settings: conf/app.yaml; the page
itself: inference/page.py, what it does: inference/inspection.py; docs/app.md).

crack-app ckpt_path=RUN/checkpoints/best.ckpt [labels_dir=DIR] [port=7860]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.inspection import Inspector
from crack_lightning.io import check_writable
from crack_lightning.settings import AppSettings, ScanSettings, validate


def start(cfg: DictConfig, block: bool = True):
    """Check the settings, the folders and the model, then serve the page; returns the
    served page when `block` is False (tests), else when it is stopped."""
    settings = validate(cfg, AppSettings, "")
    window = validate(cfg.scan, ScanSettings, "scan")
    from crack_lightning.inference import page

    labels_dir = Path(settings.labels_dir)
    check_writable(labels_dir, "labels_dir", folder=True)
    if settings.files_dir is None:
        files_dir = Path(tempfile.mkdtemp(prefix="crack-app-"))
    else:
        files_dir = Path(settings.files_dir)
        check_writable(files_dir, "files_dir", folder=True)
    page.use_files_dir(files_dir)
    page.gradio()  # the install line, before the model is read
    classifier = load_classifier(cfg.ckpt_path, cfg.device)
    inspector = Inspector(classifier, window, settings.batch_size, settings.max_pixels, labels_dir)
    built = page.build_page(inspector, settings.threshold, files_dir, cfg.device)
    print(f"Marks go to {labels_dir}; the page's files to {files_dir}.")
    return page.serve(built, settings.host, settings.port, settings.open_browser, block)


def serve_until_stopped(cfg: DictConfig) -> None:
    """The page, served until Ctrl-C."""
    start(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: settings from conf/app.yaml."""
    return run_tool("app", serve_until_stopped, argv)


if __name__ == "__main__":
    raise SystemExit(main())
