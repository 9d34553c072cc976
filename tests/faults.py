"""Fault injection: SIGKILL train.py at random moments, resume, check nothing was lost.

    python -m tests.faults runs=6 kills=2 epochs=4 seed=0      (or: make faults ARGS="runs=6")

Each run trains a small model on tiny synthetic images for `epochs` epochs in its own
run directory, every other run with the feature cache on (so cache fills are killed
too). The run is killed `kills` times, each after a random delay, and continued each
time with `ckpt_path=last` (or started again with `overwrite=true` when no epoch had
finished). Then the last session must finish: exit 0, last.ckpt and best.ckpt load
(tensors only) and last.ckpt holds the final epoch, metrics.json exists, no temp file or
run lock is left over.
Prints kills survived / tried, and how long an uninterrupted final session took.
Slow (minutes), so not part of the test suite.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    runs: int = 6  # independent runs, each killed `kills` times
    kills: int = 2
    epochs: int = 4
    seed: int = 0
    # a kill lands uniformly in [min_delay_s, T] after a session starts, T being how long
    # the rest of the run takes uninterrupted (from a measured reference run); so kills
    # hit start-up, cache fills, epochs and checkpoint saves alike, however busy the machine
    min_delay_s: float = 3.0
    workdir: str = str(ROOT / "logs" / "faults")
    # $TMPDIR of the killed runs: a tmpfs where there is one, as on many clusters, so a
    # save that went through $TMPDIR would be a cross-filesystem copy a kill can cut short
    tmpdir: str = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()

    @classmethod
    def from_args(cls, args: list[str]) -> Settings:
        settings = cls()
        types = {f.name: type(getattr(settings, f.name)) for f in fields(cls)}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or key not in types:
                raise SystemExit(f"error: expected key=value with key in {sorted(types)}: {arg}")
            setattr(settings, key, types[key](value))
        return settings


def command(settings: Settings, data: Path, run_dir: Path, cache: bool) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"data.root={data}",
        f"paths.output_dir={run_dir}",
        f"data.cache_features={str(cache).lower()}",
        f"data.cache_dir={run_dir.parent / (run_dir.name + '_features')}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        "model=mobilenetv3_small",
        "model.pretrained=false",
        "callbacks=no_early_stopping",
        "callbacks.progress_bar.refresh_rate=0",
        "logger=tensorboard",
        f"trainer.max_epochs={settings.epochs}",
    ]


def phase(run_dir: Path, cache: bool) -> str:
    """What a kill most likely interrupted, judged from what is on disk afterwards."""
    import torch

    features = run_dir.parent / (run_dir.name + "_features")
    if cache and not any(features.glob("features_*.pt")):
        return "start-up or cache fill"
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return "start-up or epoch 0"
    epoch = torch.load(last, weights_only=True)["epoch"]
    return f"start-up or epoch {epoch + 1}; last.ckpt holds epoch {epoch}"


def problems(run_dir: Path, epochs: int) -> list[str]:
    """What is wrong with a finished run directory (empty list: nothing)."""
    import torch

    found = []
    for name in ("last.ckpt", "best.ckpt"):
        try:
            state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        except Exception as err:  # any failure to load is what we look for
            found.append(f"{name} does not load: {type(err).__name__}: {err}"[:300])
            continue
        if name == "last.ckpt" and state["epoch"] != epochs - 1:
            found.append(f"last.ckpt holds epoch {state['epoch']}, not {epochs - 1}")
    if not (run_dir / "metrics.json").is_file():
        found.append("no metrics.json")
    leftovers = [p.name for p in run_dir.rglob("*.partial")] + [
        p.name for p in run_dir.glob("run.lock")
    ]
    if leftovers:
        found.append(f"left over: {leftovers}")
    return found


def epochs_done(run_dir: Path) -> int:
    """Completed epochs according to last.ckpt (0 when there is none)."""
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)["epoch"] + 1 if last.exists() else 0


def reference_seconds(settings: Settings, data: Path) -> float:
    """How long one uninterrupted run takes here (with the feature cache: every other run
    has it, and its fill is most of its time)."""
    run_dir = Path(settings.workdir) / "reference"
    start = time.monotonic()
    result = subprocess.run(
        command(settings, data, run_dir, cache=True),
        cwd=ROOT,
        env={**os.environ, "TMPDIR": settings.tmpdir},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or problems(run_dir, settings.epochs):
        raise SystemExit(f"the uninterrupted reference run failed:\n{result.stderr[-2000:]}")
    return time.monotonic() - start


def one_run(
    settings: Settings, data: Path, index: int, rng: random.Random, pace: dict[str, float]
) -> tuple[int, bool]:
    """Kill, resume, finish, verify one run; (kills sent, whether it survived them).

    pace["full_s"], how long a whole run takes uninterrupted, is lowered whenever a
    session finishes faster than it predicts (the machine got less busy)."""
    run_dir = Path(settings.workdir) / f"run{index}"
    cache = index % 2 == 1
    base = command(settings, data, run_dir, cache)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TMPDIR": settings.tmpdir}
    kills, attempt = 0, 0
    while True:
        resume = (run_dir / "checkpoints" / "last.ckpt").exists()
        # no epoch finished: the killed session's split manifest is replaced, as told
        restart = ["overwrite=true"] if attempt else []
        argv = base + (["ckpt_path=last"] if resume else restart)
        log = (Path(settings.workdir) / f"run{index}_{attempt}.log").open("w")
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        attempt += 1
        left = (settings.epochs - epochs_done(run_dir) + 1) / (settings.epochs + 1)
        if kills < settings.kills:
            expected = max(settings.min_delay_s, pace["full_s"] * left)
            delay = rng.uniform(settings.min_delay_s, expected)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                log.close()
                kills += 1
                print(
                    f"  run {index}: SIGKILL after {delay:4.1f} s "
                    f"({'resumed' if resume else 'fresh'} session, {phase(run_dir, cache)})",
                    flush=True,
                )
                continue
        else:
            process.wait()
            print(f"  run {index}: final session took {time.monotonic() - started:.0f} s")
        log.close()
        pace["full_s"] = min(pace["full_s"], (time.monotonic() - started) / left)
        if process.returncode != 0:
            print(f"  run {index}: session exited {process.returncode}, see {log.name}")
            return kills, False
        if kills >= settings.kills:
            break
        # it finished before the kill: start a new run directory so kills keep landing
        print(f"  run {index}: finished within {delay:.1f} s; kill skipped")
        break
    found = problems(run_dir, settings.epochs)
    print(f"  run {index} ({'cache' if cache else 'images'}): " + ("; ".join(found) or "OK"))
    return kills, not found


def main(args: list[str]) -> int:
    settings = Settings.from_args(args)
    sys.path.insert(0, str(ROOT / "src"))
    from crack_lightning.data.synthetic import generate_dataset

    workdir = Path(settings.workdir)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    data = generate_dataset(workdir / "data", images_per_class=80, image_size=64, seed=0)
    rng = random.Random(settings.seed)
    tried = survived = failed_runs = 0
    start = time.monotonic()
    pace = {"full_s": reference_seconds(settings, data)}
    print(f"uninterrupted reference run: {pace['full_s']:.0f} s", flush=True)
    for index in range(settings.runs):
        kills, ok = one_run(settings, data, index, rng, pace)
        tried += kills
        survived += kills if ok else 0
        failed_runs += not ok
    print(
        f"kills survived / tried: {survived} / {tried}; runs reaching epoch "
        f"{settings.epochs - 1} with loadable checkpoints: {settings.runs - failed_runs} / "
        f"{settings.runs} ({time.monotonic() - start:.0f} s)"
    )
    return 1 if failed_runs else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
