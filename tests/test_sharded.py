"""Work shared out among 2 real processes (gloo on CPU): the feature-cache fill under DDP,
and predict.py under torchrun. Each gives what one process gives, and each process
computes only its share (counted)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crack_lightning.commands.predict import run as predict
from crack_lightning.data.feature_cache import cached_features
from crack_lightning.data.sources import scan_samples
from crack_lightning.data.synthetic import generate_dataset
from crack_lightning.data.workers import share
from crack_lightning.errors import ConfigError, RunDirError
from crack_lightning.inference.classifiers import LoadedModel
from crack_lightning.inference.export import export_model
from crack_lightning.training.distributed import launch_argv
from crack_lightning.training.run import build

from .conftest import QUIET, SMALL, compose_config, run_python, run_train_py
from .test_ddp import TWO_CPU_PROCESSES

VIEWS, SIZE, BATCH = 2, 32, 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountedEncoder:
    """net.features, counting the image views it encodes."""

    def __init__(self, encode) -> None:
        self.encode, self.images = encode, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self.encode(images)


def fill(net, files, train, evaluation, cache_dir: Path) -> tuple[object, int]:
    """cached_features on `net`, and how many image views this process encoded."""
    counter = CountedEncoder(net.features)
    net.features = counter
    try:
        cache = cached_features(
            net,
            files,
            train,
            evaluation,
            VIEWS,
            SIZE,
            cache_dir,
            BATCH,
            0,
            torch.device("cpu"),
            "stop",
        )
    finally:
        del net.features
    return cache, counter.images


def fill_in_process(rank: int, port: int, net, files, train, evaluation, cache_dir, out) -> None:
    """First a fill that stops on a damaged image in rank 0's share (both processes must
    stop, neither wait for the other), then the real one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    damaged = [*files[:3], str(out / "damaged.jpg")]
    try:
        try:
            fill(net, damaged, [], range(len(damaged)), out / "stopped")
            stopped = ""
        except Exception as err:
            stopped = f"{type(err).__name__}: {err}"
        cache, encoded = fill(net, files, train, evaluation, cache_dir)
    finally:
        dist.destroy_process_group()
    torch.save({"features": cache.features, "done": cache.done}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"encoded": encoded, "stopped": stopped}))


def test_two_processes_fill_the_cache_each_its_share(tmp_path, backbone_weights):
    root = generate_dataset(tmp_path / "data", images_per_class=9, image_size=SIZE, seed=0)
    files = [path for path, _ in scan_samples(root)]
    train, evaluation = list(range(0, 12)), list(range(12, 18))
    total = VIEWS * len(train) + len(evaluation)  # every view of train, the plain one of the rest
    cfg = compose_config("train", ["model=mobilenetv2", f"model.weights_path={backbone_weights}"])
    net = build(cfg.model).net.eval()

    # one process, the reference
    single, encoded = fill(net, files, train, evaluation, tmp_path / "single")
    assert encoded == total and bool(single.done[:, train].all())

    # a cache half filled already (the first 6 training images), then 2 processes
    shared = tmp_path / "shared"
    _, before = fill(net, files, train[:6], [], shared)
    assert before == VIEWS * 6
    out = tmp_path / "out"
    out.mkdir()
    (out / "damaged.jpg").write_bytes(b"not a JPEG")
    mp.spawn(
        fill_in_process,
        args=(free_port(), net, files, train, evaluation, shared, out),
        nprocs=2,
        join=True,
    )
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert (
        reports[0]["stopped"].startswith("DamagedImage") and "damaged.jpg" in reports[0]["stopped"]
    )
    assert reports[1]["stopped"].startswith("DataError: Another process stopped")
    counts = [report["encoded"] for report in reports]
    # only what was missing, each view once, split in two nearly equal shares
    assert sum(counts) == total - before
    assert min(counts) > 0 and abs(counts[0] - counts[1]) <= VIEWS * BATCH
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    [saved] = shared.glob("features_*.pt")
    stored = torch.load(saved, weights_only=True)
    assert not list(shared.glob("*.rank*"))  # the journals went once the cache was whole
    for cache in (*ranks, stored):
        # both processes hold (and the file holds) the same complete cache; as one process
        # computed it up to float order: its batches held other images side by side
        assert torch.equal(cache["done"], single.done)
        assert torch.equal(cache["features"], ranks[0]["features"])
        assert torch.allclose(cache["features"].float(), single.features.float(), atol=2e-3)
    assert not torch.equal(ranks[0]["features"][1, 0], ranks[0]["features"][0, 0])  # 2 views


def test_one_process_takes_over_the_journals_of_a_killed_sharded_fill(tmp_path, backbone_weights):
    """What a killed 2-process fill saved in its journals is not computed again, whatever
    the number of processes next time; the journals go into the cache file."""
    root = generate_dataset(tmp_path / "data", images_per_class=4, image_size=SIZE, seed=0)
    files = [path for path, _ in scan_samples(root)]
    cfg = compose_config("train", ["model=mobilenetv2", f"model.weights_path={backbone_weights}"])
    net = build(cfg.model).net.eval()
    cache_dir = tmp_path / "cache"
    cache, _ = fill(net, files, [0, 1, 2], [], cache_dir)  # rank 1's journal, as it was left
    cache.path.rename(f"{cache.path}.rank1")
    again, encoded = fill(net, files, range(8), [], cache_dir)
    assert encoded == VIEWS * (8 - 3)
    assert bool(again.done.all()) and not list(cache_dir.glob("*.rank*"))
    assert torch.equal(torch.load(cache.path, weights_only=True)["done"], again.done)


def test_shares_are_whole_batches_dealt_in_turn():
    shares = [share(11, 3, rank, 2) for rank in (0, 1)]
    assert shares == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert share(2, 4, 1, 2) == []  # fewer items than one batch each


SHARE_LINE = re.compile(r"process (\d) of 2 computes (\d+) of the (\d+) image views missing")


def test_a_ddp_run_through_train_py_fills_the_cache_in_two_shares(synthetic_root, tmp_path):
    """Lightning starts the second process before the fill (not at fit), so each fills
    half the cache; both then train on the complete one."""
    logs, cache_dir = tmp_path / "logs", tmp_path / "cache"
    result = run_train_py(
        *TWO_CPU_PROCESSES,
        f"data.root={synthetic_root}",
        f"paths.log_dir={logs}",
        f"paths.cache_dir={cache_dir}",
        "data.cache_features=true",
        "data.cache_views=2",
        *SMALL,
        *QUIET,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run_dir,) = (logs / "train" / "runs").iterdir()
    shares = {}
    for log_file in ("train.log", "train_ddp_process_1.log"):
        [(rank, computed, missing)] = SHARE_LINE.findall((run_dir / log_file).read_text())
        shares[int(rank)] = (int(computed), int(missing))
    # 48 images: 34 train x 2 views + 14 val, none cached before; 2 nearly equal shares
    assert {missing for _, missing in shares.values()} == {2 * 34 + 14}
    assert shares[0][0] + shares[1][0] == 2 * 34 + 14
    assert abs(shares[0][0] - shares[1][0]) <= 2 * 8  # one batch of 8 images, 2 views
    [saved] = (cache_dir / "features").glob("features_*.pt")
    assert int(torch.load(saved, weights_only=True)["done"].sum()) == 2 * 34 + 14
    assert not list((cache_dir / "features").glob("*.rank*"))
    assert json.loads((run_dir / "metrics.json").read_text())["val/acc"] >= 0


def test_predict_py_under_torchrun_writes_one_table_as_one_process_does(tmp_path, backbone_weights):
    """2 processes (torchrun, gloo on CPU) classify their shares; rank 0 writes the one
    CSV: byte for byte the one-process CSV (whole batches per process: the same sums),
    the damaged file skipped and named in input order."""
    root = generate_dataset(tmp_path / "data", images_per_class=11, image_size=64, seed=1)
    (root / "Negative" / "0003_damaged.jpg").write_bytes(b"not a JPEG")
    cfg = compose_config(
        "train",
        ["model=mobilenetv2", f"model.weights_path={backbone_weights}", "data.image_size=64"],
    )
    torch.manual_seed(0)
    model = export_model(
        LoadedModel.from_module(build(cfg.model)), "torchscript", tmp_path / "model.pt"
    )
    settings = [
        f"ckpt_path={model}",
        f"inputs=[{root}]",
        "batch_size=4",
        "num_workers=0",
        "progress=false",
        "device=cpu",
    ]
    result = run_python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "predict.py",
        *settings,
        f"paths.output_dir={tmp_path / 'sharded'}",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # one process, with torchrun's one thread per process: the same float sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict(compose_config("predict", [*settings, f"paths.output_dir={tmp_path / 'single'}"]))
    finally:
        torch.set_num_threads(threads)
    sharded = (tmp_path / "sharded" / "predictions.csv").read_text()
    assert sharded == (tmp_path / "single" / "predictions.csv").read_text()
    rows = sharded.splitlines()[1:]
    assert len(rows) == 22 and len({row.split(",")[2] for row in rows}) > 10  # varied P(crack)
    assert "0003_damaged.jpg" in result.stderr
    shares = [
        LINE.findall((tmp_path / "sharded" / log).read_text())
        for log in ("predict.log", "predict_rank1.log")
    ]
    assert shares == [[("0", "12")], [("1", "11")]]  # batches of 4 dealt in turn over 23 files
    assert not (tmp_path / "sharded" / ".hydra" / "predict_rank1.log").exists()


LINE = re.compile(r"Process (\d) of 2 classifies (\d+) of 23 files")


def test_under_torchrun_predict_names_a_shared_folder_and_does_not_scan(tmp_path, monkeypatch):
    rank1 = {"RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    with pytest.raises(RunDirError, match=r"torchrun started 2 processes, each running predict"):
        launch_argv(["predict.py", "inputs=[d]"], {**rank1, "WORLD_SIZE": "2"}, "predict")
    argv = launch_argv(
        ["predict.py", "paths.output_dir=o"], {**rank1, "WORLD_SIZE": "2"}, "predict"
    )
    assert argv[2:] == ["hydra.output_subdir=null", "hydra.job.name=predict_rank1"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_config(
        "predict",
        ["ckpt_path=m.ckpt", f"inputs=[{tmp_path}]", "mode=scan", f"paths.output_dir={tmp_path}"],
    )
    with pytest.raises(
        ConfigError, match="mode=scan runs in one process; start it without torchrun"
    ):
        predict(cfg)
