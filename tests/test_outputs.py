"""Where results go: photos that share a file name keep their own scan results, an
existing predictions file is replaced with a log line, and an output that cannot be
written (under a regular file, in /proc, a full disk) is one `error:` line naming it."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crack_lightning.cli import USER_ERROR, user_errors
from crack_lightning.commands.export import main as export_main
from crack_lightning.commands.hydra_callbacks import OutputFolders
from crack_lightning.commands.predict import run as predict
from crack_lightning.commands.scan_eval import main as scan_eval_main
from crack_lightning.inference.scan import output_names
from crack_lightning.io import check_writable
from crack_lightning.training.run import train

from .conftest import CONF_DIR, QUIET, SMALL, compose_config, run_python, run_train_py

PATCH = ["scan.patch_size=64", "scan.stride=64"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root) -> Path:
    """A small model trained one epoch on the synthetic images."""
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    train(
        compose_config(
            "train",
            [f"data.root={synthetic_root}", f"paths.output_dir={run_dir}", *SMALL, *QUIET],
        )
    )
    return run_dir / "checkpoints" / "best.ckpt"


def predict_cfg(checkpoint: Path, tmp_path: Path, *overrides: str):
    return compose_config(
        "predict",
        [
            f"ckpt_path={checkpoint}",
            f"paths.output_dir={tmp_path / 'out'}",
            "num_workers=0",
            "progress=false",
            "device=cpu",
            *PATCH,
            *overrides,
        ],
    )


def photo(path: Path, seed: int, size: int = 128) -> Path:
    """A random photo (each seed its own pixels) with a crack mask beside it."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size // 2] = 255
    Image.fromarray(mask).save(path.with_name(f"{path.stem}_mask.png"))
    return path


def user_error(capsys, call) -> str:
    """The one `error:` line a command prints for `call`, which must exit 2."""
    with pytest.raises(SystemExit) as stop, user_errors():
        call()
    assert stop.value.code == USER_ERROR
    return error_line(capsys)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


# --- photos that share a name ------------------------------------------------------------


def test_output_names_are_the_stems_made_unique_by_folder_then_extension():
    assert output_names([Path("/p/a/wall.png"), Path("/p/b/wall.png"), Path("/p/c.png")]) == [
        "a_wall",
        "b_wall",
        "c",
    ]
    assert output_names([Path("/x/a/wall.png"), Path("/y/a/wall.png")]) == [
        "x_a_wall",
        "y_a_wall",
    ]
    assert output_names([Path("/a/wall.png"), Path("/a/wall.jpg")]) == ["wall_png", "wall_jpg"]
    assert output_names([Path("/a/Wall.png"), Path("/b/wall.png")]) == ["a_Wall", "b_wall"]


def test_scan_keeps_the_results_of_photos_that_share_a_name(checkpoint, tmp_path):
    first = photo(tmp_path / "a" / "wall.png", 1)  # 2 x 2 patches
    second = photo(tmp_path / "b" / "wall.png", 2, size=192)  # 3 x 3
    report = tmp_path / "scan"
    cfg = predict_cfg(
        checkpoint, tmp_path, f"inputs=[{first},{second}]", "mode=scan", f"report_dir={report}"
    )
    summary = predict(cfg)
    assert [p["path"] for p in summary["photos"]] == [str(first), str(second)]
    for name, size, patches in (("a_wall", 128, 4), ("b_wall", 192, 9)):
        assert Image.open(report / f"{name}_scan.png").size == (size, size)
        rows = (report / f"{name}_scan.csv").read_text().splitlines()
        assert rows[0].startswith("x,y,width,height,prob_crack") and len(rows) == 1 + patches
    assert not (report / "wall_scan.png").exists()


def test_scan_skips_a_photo_smaller_than_the_window_and_goes_on(checkpoint, tmp_path, capsys):
    """mode=scan over three photos, the second smaller than scan.patch_size: the first and
    third are scanned, and the second is listed as skipped with why."""
    first, tiny, third = (
        photo(tmp_path / "a.png", 1),
        photo(tmp_path / "tiny.png", 2, size=32),
        photo(tmp_path / "c.png", 3),
    )
    report = tmp_path / "scan"
    cfg = predict_cfg(
        checkpoint,
        tmp_path,
        f"inputs=[{first},{tiny},{third}]",
        "mode=scan",
        f"report_dir={report}",
        *PATCH,
    )
    summary = predict(cfg)
    assert [p["path"] for p in summary["photos"]] == [str(first), str(third)]
    assert summary["skipped"] == 1
    assert (report / "c_scan.csv").is_file() and not (report / "tiny_scan.csv").exists()
    err = capsys.readouterr().err
    assert f"{tiny}: 32x32, smaller than scan.patch_size=64" in err


def test_scan_eval_reports_photos_that_share_a_name_apart(checkpoint, tmp_path, capsys):
    first, second = photo(tmp_path / "a" / "wall.png", 1), photo(tmp_path / "b" / "wall.png", 2)
    out = tmp_path / "scan_eval"
    args = [f"ckpt_path={checkpoint}", f"out={out}", "device=cpu", *PATCH]
    assert scan_eval_main([*args, f"photos=[{first},{second}]"]) == 0
    assert set(json.loads((out / "scan_eval.json").read_text())) == {"a_wall.png", "b_wall.png"}
    assert (out / "a_wall_scan.png").is_file() and (out / "b_wall_scan.png").is_file()


def test_predict_says_when_it_replaces_a_predictions_file(checkpoint, tmp_path, caplog):
    image = photo(tmp_path / "in" / "img.png", 3, size=64)
    output = tmp_path / "preds.csv"
    output.write_text("earlier results\n")
    with caplog.at_level(logging.WARNING):
        predict(predict_cfg(checkpoint, tmp_path, f"inputs=[{image}]", f"output={output}"))
    assert f"Replacing {output}" in caplog.text
    assert output.read_text().startswith("path,label,prob_crack")


# --- outputs that cannot be written ---------------------------------------------------------


def test_predict_output_under_a_file_or_in_proc_is_one_error_line(checkpoint, tmp_path, capsys):
    image = photo(tmp_path / "in" / "img.png", 3, size=64)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = predict_cfg(checkpoint, tmp_path, f"inputs=[{image}]", f"output={blocker / 'p.csv'}")
    line = user_error(capsys, lambda: predict(cfg))
    assert line.startswith(f"error: cannot write output={blocker / 'p.csv'}: ")
    assert f"{blocker} is a file, not a folder" in line

    scan = predict_cfg(checkpoint, tmp_path, f"inputs=[{image}]", "mode=scan")
    scan.report_dir = str(blocker)
    assert f"report_dir={blocker} is a file" in user_error(capsys, lambda: predict(scan))

    if Path("/proc/self").is_dir():
        cfg = predict_cfg(checkpoint, tmp_path, f"inputs=[{image}]", "output=/proc/p.csv")
        line = user_error(capsys, lambda: predict(cfg))
        assert line.startswith("error: cannot write output=/proc/p.csv: /proc cannot hold")


def test_export_output_under_a_file_or_in_proc_is_one_error_line(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    outputs = [blocker / "model.onnx"]
    if Path("/proc/self").is_dir():
        outputs.append(Path("/proc/model.onnx"))
    for output in outputs:
        for fmt in ("onnx", "torchscript"):
            code = export_main([f"ckpt_path={checkpoint}", f"format={fmt}", f"output={output}"])
            assert code == USER_ERROR
            assert error_line(capsys).startswith(f"error: cannot write output={output}: ")


def test_a_full_disk_while_saving_a_checkpoint_is_one_error_line_and_keeps_the_last(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    """torch.save reports ENOSPC as a RuntimeError raised while handling it; the epoch-0
    checkpoints stay whole, no temp file is left, and the line says how to go on."""
    saves = []
    real_save = torch.save

    def save_until_the_disk_is_full(value, handle, *args, **kwargs):
        saves.append(getattr(handle, "name", handle))
        if len(saves) <= 2:  # epoch 0: best.ckpt and last.ckpt
            return real_save(value, handle, *args, **kwargs)
        handle.write(b"part of a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    cfg = compose_config(
        "train",
        [
            f"data.root={synthetic_root}",
            f"paths.output_dir={tmp_path / 'run'}",
            *SMALL,
            *QUIET,
            "trainer.max_epochs=3",
            "callbacks.model_checkpoint.monitor=epoch",  # every epoch writes both files
        ],
    )
    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    line = user_error(capsys, lambda: train(cfg))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert line.startswith(f"error: cannot write {checkpoints}/")
    assert "No space left on device" in line
    monkeypatch.setattr(torch, "save", real_save)
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(checkpoints / name, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_dangling_link_without_the_data_check_is_named_and_left_out(
    synthetic_root, tmp_path, caplog
):
    """With data.check=false no report looks at the files first: a link to a missing file
    named like an image is never opened (the one finder reads regular files and links to
    them only), and a warning names it, whatever data.on_bad_image says."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    link = root / "Positive" / "gone.jpg"
    link.symlink_to(tmp_path / "missing.jpg")
    common = [f"data.root={root}", "data.check=false", *SMALL, *QUIET]
    for policy in ("stop", "skip"):
        caplog.clear()
        cfg = compose_config(
            "train",
            [*common, f"paths.output_dir={tmp_path / policy}", f"data.on_bad_image={policy}"],
        )
        with caplog.at_level(logging.WARNING):
            metrics = train(cfg)
        assert "val/acc" in metrics
        said = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
        assert said and f"{link} (not a regular file or a link to one)" in said[0]
        with (tmp_path / policy / "split_manifest.csv").open() as handle:
            assert "Positive/gone.jpg" not in handle.read()


# --- run and sweep folders: checked before Hydra makes them ----------------------------------


def one_error_line(result) -> str:
    """The one `error:` line of a command that must have stopped with exit 2."""
    assert result.returncode == USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def test_run_folders_under_a_file_are_one_error_line(tmp_path):
    """paths.output_dir, paths.log_dir and a sweep's folder under a regular file, for train.py
    and predict.py: named in one line before Hydra tries to make them."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    predict_args = ["ckpt_path=model.ckpt", "inputs=[photos]"]
    cases = [
        (run_train_py(f"paths.output_dir={blocker / 'run'}"), f"paths.output_dir={blocker}/run"),
        (run_train_py(f"paths.log_dir={blocker / 'logs'}"), f"paths.log_dir={blocker}/logs"),
        (
            run_train_py("-m", "model.lr=1e-3,1e-4", f"hydra.sweep.dir={blocker / 'sweep'}"),
            f"hydra.sweep.dir={blocker}/sweep",
        ),
        (
            run_python("predict.py", *predict_args, f"paths.log_dir={blocker / 'logs'}"),
            f"paths.log_dir={blocker}/logs",
        ),
        (
            run_python("predict.py", *predict_args, f"paths.output_dir={blocker / 'out'}"),
            f"paths.output_dir={blocker}/out",
        ),
    ]
    for result, where in cases:
        line = one_error_line(result)
        assert line.startswith(f"error: cannot write {where}: "), line
        assert line.endswith(f"{blocker} is a file, not a folder; choose another place."), line
    assert blocker.read_text() == ""


def hydra_config(name: str, *overrides: str):
    """conf/<name>.yaml with its hydra section, as Hydra hands it to its callbacks."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=True)


def read_only_disk(monkeypatch) -> None:
    """Every new file fails as on a read-only file system (EROFS), whoever the user is."""
    real_open = Path.open

    def refuse(self, mode="r", *args, **kwargs):
        if "x" in mode or "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)


@pytest.mark.parametrize("name", ["train", "predict"])
def test_a_run_folder_on_a_read_only_disk_is_one_error_line(name, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "logs" / "run"
    config = hydra_config(name, f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={run_dir}")
    read_only_disk(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        OutputFolders().on_run_start(config=config)
    assert stop.value.code == USER_ERROR
    line = error_line(capsys)
    assert line.startswith(f"error: cannot write paths.log_dir={tmp_path / 'logs'}: ")
    assert line.endswith("Read-only file system; choose another place.")
    assert not (tmp_path / "logs").exists()  # the check makes no folder


def test_the_output_check_makes_no_folder_hydra_will_make(tmp_path):
    run_dir = tmp_path / "logs" / "train" / "runs" / "now"
    check_writable(run_dir, "paths.output_dir", folder=True, make=False)
    assert list(tmp_path.iterdir()) == []
