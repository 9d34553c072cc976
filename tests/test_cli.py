"""One command style: console scripts point at real commands, each takes key=value
settings from its conf/ file, lists them with --help and reports our errors in one line."""

from __future__ import annotations

import importlib
import re

import pytest
import tomllib

from crack_lightning.cli import compose_command, conf_dir, project_root, run_tool
from crack_lightning.errors import DataError

from .conftest import ROOT, run_python

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
TOOLS = {  # console script -> its settings file in conf/
    "crack-data": "data_tool",
    "crack-export": "export",
    "crack-summarize": "summarize",
    "crack-bench": "bench",
    "crack-scan-eval": "scan_eval",
}


def entry_point(name: str):
    module, function = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def test_every_console_script_points_at_a_callable():
    assert set(SCRIPTS) == {"crack-train", "crack-predict", *TOOLS}
    assert all(callable(entry_point(name)) for name in SCRIPTS)
    assert project_root() == ROOT and conf_dir() == ROOT / "conf"


@pytest.mark.parametrize(("script", "config"), sorted(TOOLS.items()))
def test_tools_help_lists_their_settings(script, config, capsys):
    assert entry_point(script)(["--help"]) == 0
    out = capsys.readouterr().out
    assert (conf_dir() / f"{config}.yaml").read_text() in out


@pytest.mark.parametrize("script", sorted(TOOLS))
def test_tools_name_unknown_and_missing_settings_in_one_line(script, capsys):
    assert entry_point(script)(["colour=red"]) == 2
    err = capsys.readouterr().err
    assert "error: Unknown setting 'colour'; this command takes" in err
    assert "Traceback" not in err


def test_required_settings_are_named(capsys):
    assert entry_point("crack-summarize")([]) == 2
    assert "Missing setting(s): sweep_dir=..." in capsys.readouterr().err
    assert entry_point("crack-export")([]) == 2
    assert "Missing setting(s): ckpt_path=..." in capsys.readouterr().err


def test_our_errors_exit_2_without_a_traceback(capsys):
    def fails(cfg) -> int:
        raise DataError(f"root={cfg.root} is wrong")

    assert run_tool("data_tool", fails, ["check", "root=/nowhere"], actions=("check",)) == 2
    assert capsys.readouterr().err.strip() == "error: root=/nowhere is wrong"


def test_data_root_defaults_to_conf_data(capsys):
    """crack-data's root is train.py's data.root, not a default of its own."""
    assert entry_point("crack-data")(["check", "quick=true"]) == 2
    assert f"data.root={ROOT / 'data' / 'concrete_crack'}" in capsys.readouterr().err


def test_train_py_help_lists_settings():
    result = run_python(str(ROOT / "train.py"), "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model/scheduler: cosine, plateau, step" in result.stdout
    assert "_target_: torch.optim.Adam" in result.stdout
    assert "max_epochs: 10" in result.stdout


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("images=abc", "images=abc must be an integer."),
        ("sizes=[32,abc]", "sizes=[32, 'abc'] must be a list, each item an integer."),
        ("images=10", "images=10 gives too few training batches"),
    ],
)
def test_bench_settings_are_checked_before_it_runs(setting, message, capsys):
    assert entry_point("crack-bench")(["sample=/nowhere", setting]) == 2
    assert f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("mode=classify", "mode=classify must be one of predict, eval, scan."),
        ("threshold=1.5", "threshold=1.5 must be strictly between 0 and 1."),
        ("batch_size=abc", "batch_size=abc must be an integer."),
    ],
)
def test_predict_settings_are_checked_before_the_checkpoint_is_read(setting, message):
    from crack_lightning.errors import PredictionError
    from crack_lightning.inference.run import run

    cfg = compose_command("predict", ["ckpt_path=/nowhere.ckpt", "inputs=[/nowhere]", setting])
    with pytest.raises(PredictionError, match=re.escape(message)):
        run(cfg)
