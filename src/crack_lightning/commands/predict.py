"""`crack-predict` / `python predict.py`: classify files, evaluate on labelled folders, or
scan whole photos (settings: conf/predict.yaml)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from omegaconf import DictConfig

from crack_lightning.cli import hydra_app, prepare_process, user_errors
from crack_lightning.data.decode import collect_inputs, label_from_path, load_rgb
from crack_lightning.errors import PredictionError
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import ScanSettings
from crack_lightning.inference.sharded import (
    classify_in_shares,
    require_one_process,
    started_processes,
)
from crack_lightning.io import check_writable, write_csv, write_text
from crack_lightning.settings import (
    CLASS_NAMES,
    NONE_IS_OFF,
    OPEN_UNIT,
    Rule,
    at_least,
    settings_of,
)
from crack_lightning.training.distributed import launch_argv

log = logging.getLogger(__name__)


@dataclass
class PredictSettings:
    """predict.py's settings (conf/predict.yaml; its scan.* are ScanSettings)."""

    settings_error = PredictionError
    ckpt_path: str
    inputs: Any  # a file, folder or glob pattern, or a list of them
    mode: Literal["predict", "eval", "scan"]
    output: Annotated[
        str,
        Rule("a .csv or .json file", lambda v: v.rsplit(".", 1)[-1].lower() in ("csv", "json")),
    ]
    report_dir: str
    threshold: Annotated[float | None, OPEN_UNIT]  # null: the checkpoint's stored threshold
    batch_size: Annotated[int, at_least(1)]
    num_workers: Annotated[int, at_least(0)]
    device: str
    html_report: bool
    worst_per_source: Annotated[int, NONE_IS_OFF]
    suspects_shown: Annotated[int, NONE_IS_OFF]
    visualize: bool
    max_visualize: int
    progress: bool


def write_predictions(path: Path, rows: list[dict]) -> None:
    """CSV or JSON (by extension, checked at start-up) with path, label, prob_crack[,
    true_label]; an existing file is replaced, and the log says so."""
    if path.exists():
        log.warning("Replacing %s (it held earlier predictions).", path)
    if path.suffix.lower() == ".json":
        write_text(path, json.dumps(rows, indent=1) + "\n")
        return
    write_csv(path, list(rows[0]), rows)


def save_prediction_grid(rows: list[dict], path: Path, size: int, limit: int) -> None:
    """The Keras projects' figure: inputs with predicted label and P(crack), green/red
    titles when the true label (from the folder name) is known."""
    from crack_lightning.evaluation.plots import image_grid_figure, save  # visualize only

    wrong = [r for r in rows if r.get("true_label") and r["true_label"] != r["label"]]
    rest = [r for r in rows if r not in wrong]
    spread = np.linspace(0, len(rest) - 1, min(len(rest), max(0, limit - len(wrong)))).round()
    shown = (wrong + [rest[int(i)] for i in spread])[:limit]  # mistakes first, then an even spread
    images = [np.asarray(load_rgb(row["path"]).resize((size, size))) for row in shown]
    titles, correct = [], []
    for row in shown:
        title = f"{row['label']} {float(row['prob_crack']):.2f}"
        truth = row.get("true_label")
        if truth:
            title += f"\n(true {truth})"
        titles.append(title)
        correct.append(truth == row["label"] if truth else None)
    save(image_grid_figure(images, titles, correct), path)


def print_skipped(skipped: Sequence[tuple[object, str]]) -> None:
    if skipped:
        print(f"Skipped {len(skipped)} input(s):", file=sys.stderr)
        for item, reason in skipped:
            print(f"  {item}: {reason}", file=sys.stderr)


def classify(cfg: PredictSettings, classifier, files: list[Path]) -> dict:
    """predict and eval modes; returns a summary."""
    shared = classify_in_shares(classifier, files, cfg.batch_size, cfg.num_workers, cfg.progress)
    if shared is None:  # a process of a sharded run (torchrun) other than rank 0: it writes
        return {}
    probs, skipped_files = shared
    print_skipped(skipped_files)
    ok = ~np.isnan(probs)
    good = [f for f, keep in zip(files, ok, strict=True) if keep]
    if not good:
        raise PredictionError("No input could be classified (see the skipped files above).")
    probs = probs[ok]
    labels = [label_from_path(f) for f in good]
    known = [lab is not None for lab in labels]
    rows = []
    for file, prob, label in zip(good, probs, labels, strict=True):
        row = {
            "path": str(file),
            "label": CLASS_NAMES[int(prob >= cfg.threshold)],
            "prob_crack": round(float(prob), 6),
        }
        if any(known):
            row["true_label"] = CLASS_NAMES[label] if label is not None else ""
        rows.append(row)
    output = Path(cfg.output)
    write_predictions(output, rows)
    summary = {
        "classified": len(rows),
        "skipped": len(skipped_files),
        "positive": int((probs >= cfg.threshold).sum()),
        "output": str(output),
    }
    report_dir = Path(cfg.report_dir)
    if cfg.visualize:
        grid = report_dir / "predictions.png"
        report_dir.mkdir(parents=True, exist_ok=True)
        save_prediction_grid(rows, grid, classifier.image_size, cfg.max_visualize)
        summary["grid"] = str(grid)
    if cfg.mode == "eval":
        from crack_lightning.evaluation.folders import (
            evaluate_inputs,
            input_members,
            markdown_table,
        )
        from crack_lightning.evaluation.metrics import (
            binary_metrics,
            format_report,
            write_evaluation,
        )
        from crack_lightning.evaluation.report import EvalRun, write_review

        if not all(known):
            missing = next(f for f, k in zip(good, known, strict=True) if not k)
            raise PredictionError(
                f"mode=eval needs every image inside a Positive/ or Negative/ folder; {missing} "
                f"is in neither. Use mode=predict for unlabelled images."
            )
        true = np.array(labels)
        metrics = binary_metrics(true, probs, cfg.threshold)
        written = write_evaluation(metrics, true, probs, report_dir)
        print(format_report(metrics))
        summary["report"] = [str(p) for p in written]
        inputs = [cfg.inputs] if isinstance(cfg.inputs, str) else list(cfg.inputs)
        groups = input_members(inputs, good)  # the sources: each input folder
        if len(inputs) > 1:  # cross-dataset: each input on its own, and a table
            table = evaluate_inputs(groups, true, probs, cfg.threshold, report_dir)
            print(markdown_table(table))
            summary["per_input"] = table
        scored = EvalRun(good, true, probs, cfg.threshold, groups, str(cfg.ckpt_path))
        reviewed, suspects = write_review(
            report_dir, scored, cfg.html_report, cfg.worst_per_source, cfg.suspects_shown
        )
        print(f"{suspects} suspect label(s); review: {', '.join(map(str, reviewed))}")
        summary["report"] += [str(p) for p in reviewed]
        summary["suspect_labels"] = suspects
    return summary


def scan(cfg: PredictSettings, classifier, files: list[Path], window: ScanSettings) -> dict:
    """scan mode: per photo a figure (PNG) and a CSV of patches, and with a crack-map model
    the map (PHOTO_cracks.png) and its cracks (PHOTO_cracks.csv); for all the photos the
    site report (site_summary.csv, site_report.html); returns a summary."""
    from crack_lightning.evaluation.crack_maps import describe_cracks, measure_cracks
    from crack_lightning.evaluation.site_report import ScanContext, site_photo, write_site_report
    from crack_lightning.inference.scan import scan_figure, scan_files, write_scan_csv

    report_dir = Path(cfg.report_dir)
    skipped: list[tuple[Path, str]] = []
    photos, site = [], []
    for result in scan_files(
        classifier,
        files,
        window,
        cfg.batch_size,
        cfg.threshold,
        report_dir,
        skipped,
        cfg.num_workers,
    ):
        figure = scan_figure(report_dir, result.name)
        table = figure.with_suffix(".csv")
        write_scan_csv(result, table)
        share = result.cracked_area_share()
        entry = {
            "path": str(result.path),
            "figure": str(figure),
            "patches": len(result.probs),
            "cracked_patches": int(result.cracked.sum()),
            "cracked_area_share": share,
        }
        said = f"{int(result.cracked.sum())}/{len(result.probs)} patches cracked"
        measures = measure_cracks(result, report_dir, window.mm_per_px)  # {}: no map
        entry |= measures
        said += ", " + (describe_cracks(measures) if measures else f"{share:.1%} of the area")
        print(f"{result.path}: {said} -> {figure}, {table}")
        photos.append(entry)
        site.append(site_photo(result, entry))
    print_skipped(skipped)
    if not photos:
        raise PredictionError("No photo could be scanned (see the skipped files above).")
    context = ScanContext(
        cfg.ckpt_path, cfg.threshold, window.patch_size, window.stride, window.mm_per_px
    )
    report = write_site_report(report_dir, site, skipped, context)
    print(f"Site report (photos ranked): {', '.join(map(str, report))}")
    return {"photos": photos, "skipped": len(skipped), "site_report": [str(p) for p in report]}


def predict() -> Any:
    """The console script: conf/predict.yaml as a Hydra application."""
    prepare_process()
    if started_processes() > 1:  # torchrun: one run directory, one writer (rank 0)
        with user_errors():
            sys.argv = launch_argv(sys.argv, command="predict")
    return hydra_app("predict", run)()


# predict.yaml's sections checked on their own (scan.*) or not settings of the command
SECTIONS = ("paths", "scan", "task_name")


def run(cfg: DictConfig) -> dict:
    """The Hydra task: settings checked, then one mode."""
    settings = settings_of(cfg, PredictSettings, "", others=SECTIONS)
    return predict_with(settings, settings_of(cfg.scan, ScanSettings, "scan"))


def predict_with(cfg: PredictSettings, window: ScanSettings) -> dict:
    """One mode, with checked settings."""
    if cfg.mode == "scan":
        require_one_process(cfg.mode)
    if cfg.mode != "scan":
        check_writable(Path(cfg.output), "output")
    if cfg.mode != "predict" or cfg.visualize:
        check_writable(Path(cfg.report_dir), "report_dir", folder=True)
    classifier = load_classifier(cfg.ckpt_path, cfg.device)
    window = window.for_model(classifier.window)
    cfg.threshold = decision_threshold(cfg.threshold, classifier.threshold)
    inputs = [cfg.inputs] if isinstance(cfg.inputs, str) else list(cfg.inputs)
    files, problems = collect_inputs(inputs)
    print_skipped(problems)
    if not files:
        raise PredictionError(f"inputs={inputs} name no image files.")
    if cfg.mode == "scan":
        print(f"Scanning with {window.describe()} (scan.patch_size / scan.stride).")
        return scan(cfg, classifier, files, window)
    summary = classify(cfg, classifier, files)
    if not summary:  # rank 0 of a sharded run reports
        return summary
    print(
        f"Classified {summary['classified']} image(s): {summary['positive']} Positive (crack), "
        f"{summary['classified'] - summary['positive']} Negative; skipped {summary['skipped']}. "
        f"Predictions: {summary['output']}"
    )
    return summary
