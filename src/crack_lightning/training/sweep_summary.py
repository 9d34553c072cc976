"""Sweep summary: each job's overrides and best validation metrics, best job first.

A sweep (`python train.py -m model=mobilenetv2,resnet18 model.lr=1e-3,3e-4`) ends by
writing `sweep_summary.csv` and `sweep_summary.md` into its directory and printing the
Markdown table (SweepSummary, a Hydra callback set in conf/train.yaml). For a sweep still
running, or one from elsewhere:

    crack-summarize sweep_dir=SWEEP_DIR [metric=val/loss direction=minimize]

(commands/summarize.py). Jobs are ranked by `optimized_metric` in its
`optimized_direction` (from the jobs' config); jobs without metrics.json (failed or
interrupted) are listed last.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from crack_lightning.errors import CrackLightningError, RunDirError
from crack_lightning.evaluation.metrics import figure
from crack_lightning.io import write_csv, write_text
from crack_lightning.training.distributed import process_rank
from crack_lightning.training.run import METRICS_NAME

log = logging.getLogger(__name__)

CSV_NAME = "sweep_summary.csv"
MARKDOWN_NAME = "sweep_summary.md"
DIRECTIONS = ("maximize", "minimize")


@dataclass
class Job:
    """One job of a sweep, as its directory records it."""

    name: str
    run_dir: Path
    overrides: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "no metrics.json (failed or unfinished)"

    def value(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _job_order(path: Path) -> tuple[int, str]:
    number = path.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else sys.maxsize, path.name)


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job directory (`<job>/.hydra/overrides.yaml`) directly under sweep_dir."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RunDirError(
            f"Sweep directory {sweep_dir} does not exist. Pass the directory a sweep wrote, "
            f"e.g. logs/train/multiruns/<date_time>."
        )
    jobs = []
    for run_dir in sorted(
        (p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")), key=_job_order
    ):
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        metrics_file = run_dir / METRICS_NAME
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        jobs.append(Job(run_dir.name, run_dir, [str(o) for o in overrides], metrics))
    if not jobs:
        raise RunDirError(
            f"{sweep_dir} holds no job directories (<job>/.hydra/overrides.yaml). Pass a "
            f"sweep's directory, e.g. logs/train/multiruns/<date_time>, not a run's."
        )
    return jobs


def sweep_objective(jobs: Sequence[Job]) -> tuple[str, str]:
    """optimized_metric and optimized_direction from the first job's composed config."""
    for job in jobs:
        config_file = job.run_dir / ".hydra" / "config.yaml"
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
            if config.get("optimized_metric"):
                return config["optimized_metric"], config.get("optimized_direction", "maximize")
    raise RunDirError(
        "The jobs' .hydra/config.yaml name no optimized_metric; pass metric= and direction=."
    )


def rank_jobs(jobs: Sequence[Job], metric: str, direction: str) -> list[Job]:
    """Best first by metric; jobs without it keep their order at the end."""
    if direction not in DIRECTIONS:
        raise RunDirError(f"direction={direction!r} must be one of {', '.join(DIRECTIONS)}.")
    scored = [job for job in jobs if job.value(metric) is not None]
    unscored = [job for job in jobs if job.value(metric) is None]
    if jobs and not scored and any(job.metrics for job in jobs):
        known = sorted({k for job in jobs for k in job.metrics if k.startswith(("val/", "test/"))})
        raise RunDirError(f"No job has the metric {metric!r}; the jobs report {known}.")
    sign = -1.0 if direction == "maximize" else 1.0
    # sorted() is stable: equal scores keep the jobs' own order
    return sorted(scored, key=lambda job: sign * job.value(metric)) + unscored


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def varying_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys whose value is not the same in every job: what the sweep compares."""
    values: dict[str, set[str | None]] = {}
    for job in jobs:
        given = dict(_split(o) for o in job.overrides)
        for key in given.keys() | values.keys():
            values.setdefault(key, set()).add(given.get(key))
    order = [_split(o)[0] for job in jobs for o in job.overrides]
    return sorted((k for k, v in values.items() if len(v) > 1), key=order.index)


# the metrics the Markdown table shows (the CSV has all of them)
TABLE_METRICS = ("acc", "f1", "auroc", "loss")


def metric_columns(jobs: Sequence[Job], metric: str) -> list[str]:
    """The ranking metric first, then validation, then test metrics."""
    names = {k for job in jobs for k in job.metrics if k.startswith(("val/", "test/"))}
    ordered = sorted(names - {metric}, key=lambda k: (not k.startswith("val/"), k))
    return [metric, *ordered]


def summary_rows(jobs: Sequence[Job], metric: str, direction: str) -> list[dict[str, Any]]:
    """One dict per job, best first: rank, job, status, overrides, metrics, run_dir."""
    ranked = rank_jobs(jobs, metric, direction)
    swept = varying_keys(jobs)
    rows = []
    for rank, job in enumerate(ranked, start=1):
        given = dict(_split(o) for o in job.overrides)
        row: dict[str, Any] = {
            "rank": rank if job.value(metric) is not None else "",
            "job": job.name,
            "status": job.status,
            "swept": " ".join(f"{k}={given[k]}" for k in swept if k in given),
            "overrides": " ".join(job.overrides),
        }
        for name in metric_columns(jobs, metric):
            row[name] = job.metrics.get(name, "")
        row["run_dir"] = str(job.run_dir)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None or isinstance(value, float):  # null in metrics.json: undefined
        return figure(value)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], metric: str, direction: str) -> str:
    """The summary as Markdown: the swept overrides (not every override) and the metrics."""
    columns = [
        c
        for c in rows[0]
        if c in ("rank", "job", "swept", metric)
        or (c.startswith(("val/", "test/")) and c.split("/", 1)[1] in TABLE_METRICS)
        # with data.sources: every source's balanced accuracy, and their mean
        or (c.startswith(("val/", "test/")) and c.endswith("/bal_acc"))
    ]
    header = [c if c != "swept" else "overrides" for c in columns]
    lines = [
        f"Sweep summary: {len(rows)} jobs, best {metric} first ({direction})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        # the job's number: its folder name repeats the overrides
        cells = [_cell(row[c] if c != "job" else row[c].split("_", 1)[0]) for c in columns]
        if row["status"] != "ok":
            cells[columns.index("swept")] += f" ({row['status']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(
    sweep_dir: str | Path, metric: str | None = None, direction: str | None = None
) -> str:
    """Write sweep_summary.csv and sweep_summary.md into sweep_dir; return the Markdown.

    metric and direction default to the jobs' optimized_metric and optimized_direction.
    """
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if metric is None or direction is None:
        default_metric, default_direction = sweep_objective(jobs)
        if direction is None and metric not in (None, default_metric):
            raise RunDirError(
                f"metric={metric} differs from the sweep's optimized_metric "
                f"({default_metric}): also pass direction=maximize or direction=minimize."
            )
        metric = metric or default_metric
        direction = direction or default_direction
    rows = summary_rows(jobs, metric, direction)
    write_csv(sweep_dir / CSV_NAME, list(rows[0]), rows)
    table = markdown_table(rows, metric, direction)
    write_text(sweep_dir / MARKDOWN_NAME, table)
    return table


def summarize_sweep(sweep_dir: Path, metric: str | None, direction: str | None) -> None:
    """Write the summary files and print the table at the end of a sweep; a sweep with
    nothing to summarise (no job got as far as its folder) is a warning, not an error."""
    try:
        table = write_summary(sweep_dir, metric, direction)
    except CrackLightningError as err:
        log.warning("No sweep summary: %s", err)
        return
    print("\n" + table, flush=True)
    log.info("Sweep summary written to %s and %s", sweep_dir / CSV_NAME, MARKDOWN_NAME)


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep once its last job has finished (in the process
    that started the sweep, whichever launcher ran the jobs)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if process_rank() > 0:  # torchrun/srun: each process ran the sweep; one summarises
            return
        summarize_sweep(
            Path(config.hydra.sweep.dir),
            config.get("optimized_metric"),
            config.get("optimized_direction"),
        )
