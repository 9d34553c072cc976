"""`python benchmarks/bench.py sample=DIR [images=3000 sizes=[160,224] epochs=10]`.

Measures, in one process, on a data set made by repeating the images of `sample`, one
row (or a few) per function in ROWS:
- the frozen backbone's forward pass alone (images/s), the ceiling for all below;
- the feature cache fill (images/s, one view of every image into a fresh cache, timed
  here around FeatureCache.fill) and its ratio to the bare forward pass;
- training throughput (images/s, warm-up excluded) of the Lightning pipeline and of a
  minimal hand-written PyTorch loop doing the same work, and their ratio;
- validation and prediction throughput: PyTorch, ONNX Runtime, and its int8 model;
- wall time of a run of `epochs` epochs uncached, and cached (cold and warm cache), next
  to the time of one backbone pass over the data; peak RSS and page faults per second.
With `full_scale=DIR`, the design card's command (`python train.py model=mobilenetv2
trainer.max_epochs=10`) on that folder: its wall time beside its own cache fill rate, the
bare forward pass and prediction over the same images. Prints a table, the headline
figures and one JSON line; with `reference=FILE`, ratios to another pipeline's figures
too. Settings: conf/bench.yaml. Measured figures live in docs/speed.md. The harness lives
outside the package: crack_lightning knows nothing of it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import lightning as L
import torch
import yaml
from omegaconf import DictConfig

from crack_lightning.cli import compose_command, run_tool
from crack_lightning.data.feature_cache import FeatureCache, cached_features
from crack_lightning.data.sources import scan_samples
from crack_lightning.errors import ConfigError
from crack_lightning.inference.classifiers import LoadedModel, classify_files, load_classifier
from crack_lightning.inference.export import CalibrationSettings, export_int8, export_model
from crack_lightning.models.training_module import build_optimizer
from crack_lightning.settings import CLASS_NAMES, Rule, at_least, settings_of
from crack_lightning.training.run import build, train

WARMUP_BATCHES = 5


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def repeat_sample(sample: Path, count: int, dest: Path) -> Path:
    """count images, half per class, as links to the real sample's files."""
    samples = scan_samples(sample)
    for label, name in enumerate(CLASS_NAMES):
        files = [path for path, lab in samples if lab == label]
        (dest / name).mkdir(parents=True)
        for i in range(count // 2):
            source = Path(files[i % len(files)])
            (dest / name / f"{i:05d}_{source.name}").symlink_to(source)
    return dest


class Stopwatch(L.Callback):
    """Images/s and page faults/s over training batches after the warm-up."""

    def __init__(self) -> None:
        self.images = 0
        self.start = self.end = 0.0
        self.faults = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP_BATCHES:
            self.start, self.faults = time.perf_counter(), minor_faults()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= WARMUP_BATCHES:
            self.images += len(batch[1])
            self.end = time.perf_counter()

    def rate(self) -> float:
        return self.images / (self.end - self.start)


def lightning_throughput(cfg: DictConfig) -> tuple[float, float]:
    """One epoch of the training pipeline as train.py builds it; no validation."""
    datamodule, model = build(cfg.data), build(cfg.model)
    datamodule.setup("fit")
    watch = Stopwatch()
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        callbacks=[watch],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    seconds = watch.end - watch.start
    return watch.rate(), (minor_faults() - watch.faults) / seconds


def loop_throughput(cfg: DictConfig) -> float:
    """The same work by hand: same loader, augmentation and network, the model's
    optimizer (model.optimizer) on the head, cross-entropy."""
    datamodule, model = build(cfg.data), build(cfg.model)
    datamodule.setup("fit")
    net = model.net.train()
    optimizer = build_optimizer(
        model.hparams.optimizer, [p for p in net.parameters() if p.requires_grad]
    )
    images_seen, start = 0, 0.0
    for step, (images, labels) in enumerate(datamodule.train_dataloader()):
        if step == WARMUP_BATCHES:
            start = time.perf_counter()
        images, _ = datamodule.augment(images, None)
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= WARMUP_BATCHES:
            images_seen += len(labels)
    return images_seen / (time.perf_counter() - start)


def forward_throughput(cfg: DictConfig, batches: int = 8) -> float:
    """The frozen backbone alone on random images: the ceiling every pipeline below is
    bound by, and a gauge of how fast the machine runs right now (shared CPUs vary)."""
    net = build(cfg.model).net.eval()
    size, batch = cfg.data.image_size, cfg.data.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        net.features(images)  # warm-up: folds BatchNorm, plans the convolutions
        net.features(images)
        seconds = timed(lambda: [net.features(images) for _ in range(batches)])
    return batches * batch / seconds


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@dataclass
class FillTimes:
    """The image views the cache fills inside computed, and the seconds they took."""

    views: int = 0
    seconds: float = 0.0

    def rate(self) -> float:
        return self.views / self.seconds if self.seconds else float("nan")


@contextmanager
def fill_times() -> Iterator[FillTimes]:
    """Time every FeatureCache.fill inside (a run of train.py fills its own cache): its
    seconds, and the views it marked done, read from the cache before and after."""
    times, fill = FillTimes(), FeatureCache.fill

    def timed_fill(cache: FeatureCache, *args, **kwargs) -> None:
        before, start = int(cache.done.sum()), time.perf_counter()
        try:
            fill(cache, *args, **kwargs)
        finally:
            times.seconds += time.perf_counter() - start
            times.views += int(cache.done.sum()) - before

    FeatureCache.fill = timed_fill
    try:
        yield times
    finally:
        FeatureCache.fill = fill


def validation_throughput(cfg: DictConfig) -> float:
    datamodule, model = build(cfg.data), build(cfg.model)
    datamodule.setup("fit")
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=cfg.trainer.accelerator,
        devices=1,
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)  # warm-up
    seconds = timed(lambda: trainer.validate(model, datamodule=datamodule, verbose=False))
    return len(datamodule.split["val"]) / seconds


def predict_throughput(classifier, files: list[Path], workers: int) -> float:
    classify_files(classifier, files[:128], 64, workers, progress=False)  # warm-up
    return len(files) / timed(
        lambda: classify_files(classifier, files, 64, workers, progress=False)
    )


def timed_run(cfg: DictConfig) -> float:
    return timed(lambda: train(cfg))


def calibration(data: Path) -> CalibrationSettings:
    """conf/export.yaml's int8 calibration settings, on 64 of the benchmark's images."""
    cfg = compose_command("export", ["ckpt_path=unused", f"calibration.inputs=[{data}]"])
    settings = settings_of(cfg.calibration, CalibrationSettings, "calibration")
    return replace(settings, images=min(64, settings.images))


@dataclass(frozen=True)
class BenchSettings:
    """conf/bench.yaml (a wrong type is named before anything runs)."""

    settings_error = ConfigError
    sample: str
    weights: str | None
    images: int
    sizes: Annotated[
        list[int], Rule("a list of image sizes >= 16", lambda s: min(s, default=16) >= 16)
    ]
    batch_size: Annotated[int, at_least(1)]
    workers: Annotated[int, at_least(0)]
    epochs: Annotated[int, at_least(0)]
    reference: str | None
    full_scale: str | None


def bench_settings(cfg: DictConfig) -> BenchSettings:
    """conf/bench.yaml's settings, checked."""
    return settings_of(cfg, BenchSettings, "", others=("paths", "data", "task_name"))


@dataclass
class Bench:
    """What every row needs: the settings, the data set, one image size, a work folder."""

    settings: BenchSettings
    data: Path
    size: int
    work: Path

    @property
    def files(self) -> list[Path]:
        return sorted(self.data.rglob("*.jpg"))

    def config(self, *extra: str) -> DictConfig:
        """conf/train.yaml for this size, fast and quiet, plus `extra` overrides."""
        s = self.settings
        weights = [f"model.weights_path={s.weights}"] if s.weights else ["model.pretrained=false"]
        return compose_command(
            "train",
            [
                f"data.root={self.data}",
                f"data.image_size={self.size}",
                f"data.num_workers={s.workers}",
                f"data.batch_size={s.batch_size}",
                "data.check=false",
                "logger=none",
                "callbacks=no_early_stopping",
                "callbacks.progress_bar.refresh_rate=0",
                f"trainer.max_epochs={max(1, s.epochs)}",
                f"paths.cache_dir={self.work / 'cache'}",
                f"paths.output_dir={self.work / 'run'}",
                "overwrite=true",  # every timed run replaces the one before
                *weights,
                *extra,
            ],
        )


def row_backbone_forward(bench: Bench) -> dict:
    return {"backbone_forward": forward_throughput(bench.config())}


def row_fill(bench: Bench) -> dict:
    """The feature cache fill alone: one view of every image into a fresh cache, decoding
    included, as train.py's cold cache fills it (same batch size and workers)."""
    cfg = bench.config()
    files = [str(path) for path in bench.files]
    with fill_times() as fills:
        cached_features(
            build(cfg.model).net,
            files,
            [],
            range(len(files)),
            1,
            bench.size,
            bench.work / f"fill_{bench.size}",
            cfg.data.batch_size,
            cfg.data.num_workers,
            torch.device("cpu"),
            cfg.data.on_bad_image,
        )
    return {"fill": fills.rate(), "fill_views": fills.views, "fill_s": fills.seconds}


def row_train(bench: Bench) -> dict:
    rate, faults = lightning_throughput(bench.config())
    loop = loop_throughput(bench.config())
    return {
        "train_lightning": rate,
        "page_faults_per_s": faults,
        "train_loop": loop,
        "lightning_vs_loop": rate / loop,
    }


def row_validate(bench: Bench) -> dict:
    return {"validate": validation_throughput(bench.config())}


def row_predict(bench: Bench) -> dict:
    """PyTorch, ONNX Runtime and int8 ONNX prediction over the whole data set."""
    model = LoadedModel.from_module(build(bench.config().model), "cpu")
    files, workers = bench.files, bench.settings.workers
    size, work = bench.size, bench.work
    torch_rate = predict_throughput(model, files, workers)
    onnx_path = export_model(model, "onnx", work / f"model_{size}.onnx")
    int8_path = export_int8(model, work / f"model_{size}.int8.onnx", calibration(bench.data), False)
    return {
        "predict_torch": torch_rate,
        "predict_onnx": predict_throughput(load_classifier(onnx_path), files, workers),
        "predict_onnx_int8": predict_throughput(load_classifier(int8_path), files, workers),
        "one_backbone_pass_s": len(files) / torch_rate,
    }


def row_epochs(bench: Bench) -> dict:
    """Wall time of whole runs, uncached and on cached features (cold, then warm)."""
    epochs = bench.settings.epochs
    if not epochs:
        return {}
    result: dict = {"epochs": epochs, "uncached_s": timed_run(bench.config())}
    for views, aug in ((1, "none"), (8, "flip_rotate")):
        shutil.rmtree(bench.work / "cache", ignore_errors=True)
        cached = bench.config(
            "data.cache_features=true", f"data/augmentation={aug}", f"data.cache_views={views}"
        )
        result[f"cached_{views}view_cold_s"] = timed_run(cached)
        result[f"cached_{views}view_warm_s"] = timed_run(cached)
    return result


# the table's rows, in order: add a function here to add a row
ROWS: list[Callable[[Bench], dict]] = [
    row_backbone_forward,
    row_fill,
    row_train,
    row_validate,
    row_predict,
    row_epochs,
]
# rows compared with the reference pipeline's figure of the same kind
REFERENCE_KINDS = {
    "train_lightning": "train",
    "predict_torch": "predict",
    "predict_onnx": "predict",
    "predict_onnx_int8": "predict",
}


def reference_ratios(result: dict, size: int, reference: dict | None) -> dict:
    """`<row>_vs_<name>`: our figure over the reference pipeline's, where it has one."""
    if not reference:
        return {}
    name = reference.get("name", "reference")
    ratios = {}
    for row, kind in REFERENCE_KINDS.items():
        theirs = (reference.get(kind) or {}).get(size)
        if theirs and row in result:
            ratios[f"{row}_vs_{name}"] = result[row] / theirs
    return ratios


def ratios(result: dict) -> dict:
    """Figures that compare rows: the fill against the bare forward pass (1.0: the fill
    runs at the bound), a cold cached run against one pass of the backbone."""
    figures = {}
    if "fill" in result and "backbone_forward" in result:
        figures["fill_vs_forward"] = result["fill"] / result["backbone_forward"]
    if "cached_1view_cold_s" in result and "one_backbone_pass_s" in result:
        figures["cached_1view_cold_vs_one_pass"] = (
            result["cached_1view_cold_s"] / result["one_backbone_pass_s"]
        )
    return figures


def bench_size(bench: Bench, reference: dict | None) -> dict:
    result: dict = {"image_size": bench.size}
    for row in ROWS:
        result |= row(bench)
    return result | ratios(result) | reference_ratios(result, bench.size, reference)


def default_command_row(
    data: Path, weights: Path | None, work: Path, epochs: int, keras: dict | None
) -> dict:
    """Time to accuracy of the default command, `python train.py model=mobilenetv2
    trainer.max_epochs=10`, on a real data set (e.g. ../shared/data/metu-8k), cold cache,
    next to one backbone pass over the same images (decoding included) and, when the
    Keras pipeline's images/s are given ({"train": ..., "predict": ...} at 224 px), the
    10 epochs those rates imply. Targets: <= 1.5x one pass, >= 5x Keras."""
    weights_override = [f"model.weights_path={weights}"] if weights else ["model.pretrained=false"]
    overrides = [
        "model=mobilenetv2",
        f"trainer.max_epochs={epochs}",
        f"data.root={data}",
        f"paths.output_dir={work / 'default_command'}",
        f"paths.cache_dir={work / 'default_command_cache'}",
        "callbacks.progress_bar.refresh_rate=0",
        *weights_override,
    ]
    cfg = compose_command("train", overrides)
    files = [Path(path) for path, _ in scan_samples(data)]
    classifier = LoadedModel.from_module(
        build(cfg.model), "cuda" if torch.cuda.is_available() else "cpu"
    )
    predict_rate = predict_throughput(classifier, files, cfg.data.num_workers)
    one_pass_s = len(files) / predict_rate
    forward = forward_throughput(cfg)
    start = time.perf_counter()
    with fill_times() as fills:  # the command's own cold cache fill
        metrics = train(cfg)
    seconds = time.perf_counter() - start
    row = {
        "images": len(files),
        "image_size": cfg.data.image_size,
        "epochs": epochs,
        "default_command_s": seconds,
        "default_command_val_acc": metrics["val/acc"],
        "fill": fills.rate(),
        "fill_views": fills.views,
        "fill_s": fills.seconds,
        "backbone_forward": forward,
        "fill_vs_forward": fills.rate() / forward,
        "predict": predict_rate,
        "one_backbone_pass_s": one_pass_s,
        "default_command_vs_one_pass": seconds / one_pass_s,
    }
    if keras:
        val = len(files) * cfg.data.val_fraction
        train_images = len(files) - val
        keras_s = epochs * (train_images / keras["train"] + val / keras["predict"])
        row["keras_estimated_s"] = keras_s
        row["speedup_vs_keras"] = keras_s / seconds
    return row


def device_throughput(
    cfg: DictConfig, device: torch.device, batch_sizes: list[int], batches: int = 5
) -> dict:
    """Images/s of the model alone on `device` (no decoding) at each batch size: frozen-
    backbone training steps on images (uncached), on cached features (the head alone),
    and prediction; under autocast bf16 on GPUs that support it."""
    net = build(cfg.model).net.to(device)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    size, dim = cfg.data.image_size, net.head[-1].in_features
    figures: dict = {}
    for batch in batch_sizes:
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        features = torch.randn(batch, dim, device=device)
        labels = torch.randint(0, 2, (batch,), device=device)
        for name, inputs, module, learn in (
            ("train_uncached", images, net, True),
            ("train_cached", features, net.head, True),
            ("predict", images, net, False),
        ):
            args = (module, inputs, labels, optimizer if learn else None, bf16)
            _model_step(*args)  # warm-up
            _synchronize(device)
            seconds = timed(
                lambda args=args: (
                    [_model_step(*args) for _ in range(batches)] + [_synchronize(device)]
                )
            )
            figures[f"{name}_bs{batch}"] = batch * batches / seconds
    return figures


def _model_step(
    module: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    bf16: bool,
) -> None:
    """A training step (with an optimizer) or a prediction (without)."""
    module.train(optimizer is not None)
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        if optimizer is None:
            with torch.inference_mode():
                module(inputs)
            return
        loss = torch.nn.functional.cross_entropy(module(inputs), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def gpu_figures(weights: Path | None, image_size: int, batch_sizes: list[int]) -> dict:
    """device_throughput on the first CUDA GPU, with the default model."""
    overrides = [f"model.weights_path={weights}"] if weights else ["model.pretrained=false"]
    cfg = compose_command("train", [*overrides, f"data.image_size={image_size}"])
    figures = device_throughput(cfg, torch.device("cuda"), batch_sizes)
    return {"device": torch.cuda.get_device_name(), "image_size": image_size, **figures}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_scale_figures(s: BenchSettings, reference: dict | None, work: Path) -> dict:
    """The default command's row (full_scale=DIR) and, on a GPU, device_throughput."""
    extra: dict = {}
    weights = Path(s.weights) if s.weights else None
    if s.full_scale:
        rates = {kind: (reference or {}).get(kind, {}).get(224) for kind in ("train", "predict")}
        keras = rates if all(rates.values()) else None
        row = default_command_row(Path(s.full_scale), weights, work, s.epochs or 10, keras)
        print(f"default command: {json.dumps(row)}", flush=True)
        extra["default_command"] = row
    if torch.cuda.is_available():
        extra["gpu"] = gpu_figures(weights, 224, [32, 64, 128, 256, 512])
        print(f"GPU: {json.dumps(extra['gpu'])}", flush=True)
    return extra


HEADLINE = ("fill", "backbone_forward", "fill_vs_forward", "predict")


def headline(results: list[dict], extra: dict, full_scale: str | None) -> list[dict]:
    """The headline figures in one run: the fill rate, the bare forward rate
    and their ratio, prediction (images/s), per image size of the repeated sample, and
    on the full_scale folder beside the design card's command's wall time."""
    lines = [
        {"on": f"sample repeated, {r['image_size']} px"}
        | {k: r.get(k) for k in HEADLINE[:3]}
        | {"predict": r.get("predict_torch")}
        for r in results
    ]
    row = extra.get("default_command")
    if row:
        lines.append(
            {"on": f"{full_scale} ({row['images']} images, {row['image_size']} px)"}
            | {k: row[k] for k in HEADLINE}
            | {k: row[k] for k in ("default_command_s", "default_command_val_acc")}
        )
    return lines


def print_headline(lines: list[dict]) -> None:
    print("\nheadline: images/s; the design card's command's wall time (s) and val accuracy")
    for line in lines:
        cells = ", ".join(
            f"{key} {value:.4f}" if key.endswith("acc") else f"{key} {value:.2f}"
            for key, value in line.items()
            if isinstance(value, float)
        )
        print(f"  {line['on']}: {cells}")


def print_table(results: list[dict]) -> None:
    keys = [k for k in results[0] if k != "image_size"]
    print(f"\n{'':34}" + "".join(f"{r['image_size']:>12} px" for r in results))
    for key in keys:
        cells = "".join(f"{r.get(key, float('nan')):>15.2f}" for r in results)
        print(f"{key:34}{cells}")


def load_reference(path: str | None) -> dict | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"reference={path} does not exist (a YAML file of figures).")
    return yaml.safe_load(file.read_text())


def check_figures_possible(s: BenchSettings) -> None:
    """Refuse settings that cannot give a figure, before the slow steps."""
    if s.images * 0.7 / s.batch_size < 2 * WARMUP_BATCHES:
        raise ConfigError(
            f"images={s.images} gives too few training batches of batch_size={s.batch_size} "
            f"to time after {WARMUP_BATCHES} warm-up batches; raise images."
        )
    if s.weights and not Path(s.weights).is_file():
        raise ConfigError(f"weights={s.weights} does not exist (or use weights=null).")


def run(cfg: DictConfig) -> None:
    """The benchmark command's body: conf/bench.yaml's settings."""
    s = bench_settings(cfg)
    check_figures_possible(s)
    reference = load_reference(s.reference)
    L.seed_everything(0)
    with tempfile.TemporaryDirectory(prefix="crack-bench-") as tmp:
        work = Path(tmp)
        data = repeat_sample(Path(s.sample), s.images, work / "data")
        results = []
        for size in s.sizes:
            results.append(bench_size(Bench(s, data, size, work), reference))
            print(f"{size} px done: {json.dumps(results[-1])}", flush=True)  # kept if stopped
        extra = full_scale_figures(s, reference, work)
    if results:
        print_table(results)
    lines = headline(results, extra, s.full_scale)
    print_headline(lines)
    tuned = os.environ.get("CRACK_LIGHTNING_MALLOC") != "default"
    print(
        f"peak RSS {peak_rss_mib():.0f} MiB; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"allocator: {'glibc tuned (mallopt)' if tuned else 'glibc default'}"
    )
    report = {
        "images": s.images,
        "batch_size": s.batch_size,
        "allocator_tuned": tuned,
        "peak_rss_mib": round(peak_rss_mib()),
        "results": results,
        "headline": lines,
        **extra,
    }
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    """The console script: settings from conf/bench.yaml."""
    return run_tool("bench", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
