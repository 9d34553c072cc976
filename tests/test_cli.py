"""One command style: console scripts point at real commands, each takes key=value
settings from its conf/ file, lists them with --help and reports our errors in one line."""

from __future__ import annotations

import ast
import importlib
import logging
import re

import pytest
import tomllib
from omegaconf import OmegaConf

from crack_lightning.cli import compose_command, conf_dir, project_root, run_tool
from crack_lightning.errors import DataError

from .conftest import ROOT, load_bench, run_python

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BENCH = "benchmarks/bench.py"  # a tool outside the package, without a console script
TOOLS = {  # console script -> its settings file in conf/
    "crack-data": "data_tool",
    "crack-export": "export",
    "crack-summarize": "summarize",
    BENCH: "bench",
    "crack-scan-eval": "scan_eval",
    "crack-app": "app",
}


def entry_point(name: str):
    if name == BENCH:
        return load_bench().main
    module, function = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def test_every_console_script_points_at_a_callable():
    assert set(SCRIPTS) == {"crack-train", "crack-predict", *TOOLS} - {BENCH}
    assert all(callable(entry_point(name)) for name in SCRIPTS)
    assert project_root() == ROOT and conf_dir() == ROOT / "conf"


@pytest.mark.parametrize(("script", "config"), sorted(TOOLS.items()))
def test_tools_help_lists_their_settings(script, config, capsys):
    """The tool's file, and the file of every group it takes (crack-app: scan.*)."""
    assert entry_point(script)(["--help"]) == 0
    out = capsys.readouterr().out
    assert (conf_dir() / f"{config}.yaml").read_text() in out
    groups = [
        (group, option)
        for entry in OmegaConf.load(conf_dir() / f"{config}.yaml").get("defaults") or []
        if not isinstance(entry, str)
        for group, option in entry.items()
    ]
    for group, option in groups:
        assert f"\n{group}.* (key=value as {group}.KEY=..." in out
        assert (conf_dir() / group / f"{option}.yaml").read_text() in out
    if script == "crack-app":
        assert ("scan", "default") in groups


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


def test_train_py_help_lists_settings_without_importing_torch():
    """--help answers in about a second: torch (and Lightning behind it) load for training only."""
    result = run_python("-X", "importtime", str(ROOT / "train.py"), "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model/scheduler: cosine, plateau, step" in result.stdout
    assert "_target_: torch.optim.Adam" in result.stdout
    assert "max_epochs: 10" in result.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "hydra" in imported  # the import log was read
    assert "torch" not in imported


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("images=abc", "images=abc must be an integer."),
        ("sizes=[32,abc]", "sizes=[32, 'abc'] must be a list, each item an integer."),
        ("images=10", "images=10 gives too few training batches"),
    ],
)
def test_bench_settings_are_checked_before_it_runs(setting, message, capsys):
    assert entry_point(BENCH)(["sample=/nowhere", setting]) == 2
    assert f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("mode=classify", "mode=classify must be one of predict, eval, scan."),
        ("threshold=1.5", "threshold=1.5 must be strictly between 0 and 1."),
        ("batch_size=abc", "batch_size=abc must be an integer."),
        ("output=p.txt", "output=p.txt must be a .csv or .json file."),
    ],
)
def test_predict_settings_are_checked_before_the_checkpoint_is_read(setting, message):
    from crack_lightning.commands.predict import run
    from crack_lightning.errors import PredictionError

    cfg = compose_command("predict", ["ckpt_path=/nowhere.ckpt", "inputs=[/nowhere]", setting])
    with pytest.raises(PredictionError, match=re.escape(message)):
        run(cfg)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("scan.unfamiliar_limit=-1", "scan.unfamiliar_limit=-1.0 must be a number > 0 or null."),
        ("scan.patch_size=0", "scan.patch_size=0 must be pixels >= 1."),
        (
            "scan.patch_size=100000",
            "scan.patch_size=100000 must be pixels <= 8192 (a window over a whole 50 Mpx photo).",
        ),
        ("scan.stride=0", "scan.stride=0 must be pixels >= 1."),
        ("scan.stride=abc", "scan.stride=abc must be an integer or null."),
    ],
)
def test_scan_settings_are_named_before_the_checkpoint_is_read(setting, message):
    from crack_lightning.commands.predict import run
    from crack_lightning.errors import PredictionError

    overrides = ["ckpt_path=/nowhere.ckpt", "inputs=[/nowhere]", "mode=scan", setting]
    with pytest.raises(PredictionError, match=re.escape(message)):
        run(compose_command("predict", overrides))


def test_scan_eval_names_its_settings_in_one_line(capsys):
    args = ["ckpt_path=/nowhere.ckpt", "photos=[/nowhere.png]"]
    assert entry_point("crack-scan-eval")([*args, "scan.unfamiliar_limit=-1"]) == 2
    assert "error: scan.unfamiliar_limit=-1.0 must be" in capsys.readouterr().err
    assert entry_point("crack-scan-eval")([*args, "min_share=0"]) == 2
    assert "error: min_share=0.0 must be in (0, 1]." in capsys.readouterr().err


FEATURE_STATS = (
    "callbacks.feature_stats={_target_: crack_lightning.training.feature_stats.FeatureStatistics,"
    " max_images: %s}"
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.augmentation.rotation_degrees=abc"],
            "data.augmentation.rotation_degrees=abc must be a number.",
        ),
        (
            ["data.augmentation.jpeg_quality_min=2.5"],
            "data.augmentation.jpeg_quality_min=2.5 must be an integer.",
        ),
        (
            ["data/augmentation=photometric", "data.augmentation.blur_p=1.5"],
            "data.augmentation.blur_p=1.5 must be in [0, 1].",
        ),
        (
            ["callbacks.source_metrics.threshold_tolerance=abc"],
            "callbacks.source_metrics.threshold_tolerance=abc must be a number.",
        ),
        (
            ["callbacks.source_metrics.threshold_tolerance=1"],
            "callbacks.source_metrics.threshold_tolerance=1.0 must be in [0, 1)",
        ),
        (
            ["callbacks.source_metrics.threshold_rule=best"],
            "callbacks.source_metrics.threshold_rule=best must be one of balanced_accuracy, "
            "recall or null.",
        ),
        ([FEATURE_STATS % -5], "callbacks.feature_stats.max_images=-5 must be an integer >= 1."),
        ([FEATURE_STATS % "many"], "callbacks.feature_stats.max_images=many must be an integer."),
        (
            ["callbacks/finetune=unfreeze", "callbacks.finetune.epoch=-1"],
            "callbacks.finetune.epoch=-1 must be an epoch number >= 0",
        ),
        (
            ["callbacks/finetune=unfreeze", "callbacks.finetune.blocks=some"],
            "callbacks.finetune.blocks=some must be a number of blocks >= 1 or 'all'.",
        ),
        (
            ["callbacks/finetune=unfreeze", "callbacks.finetune.lr=0"],
            "callbacks.finetune.lr=0.0 must be a learning rate > 0.",
        ),
        (
            ["callbacks/finetune=unfreeze", "callbacks.finetune.train_bn=maybe"],
            "callbacks.finetune.train_bn=maybe must be true or false.",
        ),
        (["data.augmentation=null"], "data.augmentation=null: choose a file of"),
        (
            ["callbacks.progress_bar.line_every_s=0"],
            "callbacks.progress_bar.line_every_s=0.0 must be seconds > 0.",
        ),
        (
            ["callbacks.validation_figures.threshold=2"],
            "callbacks.validation_figures.threshold=2",
        ),
    ],
)
def test_training_settings_are_named_before_anything_runs(overrides, message):
    from crack_lightning.errors import CrackLightningError
    from crack_lightning.training.check import check_train_settings

    cfg = compose_command("train", overrides)
    with pytest.raises(CrackLightningError, match=re.escape(message)):
        check_train_settings(cfg)


def test_train_py_names_a_bad_setting_in_one_line(tmp_path):
    """Not Hydra's "Error in call to target": one line naming the setting, exit 2."""
    result = run_python(
        str(ROOT / "train.py"),
        "callbacks.source_metrics.threshold_tolerance=abc",
        f"paths.output_dir={tmp_path}",
        "logger=none",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "error: callbacks.source_metrics.threshold_tolerance=abc must be a number."
    assert "Traceback" not in result.stderr and "Error in call to target" not in result.stderr


PACKAGE = ROOT / "src" / "crack_lightning"


def package_imports(path) -> set[str]:
    """The crack_lightning modules a source file imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("crack_lightning")}


def runtime_imports(path) -> set[str]:
    """package_imports without those under `if TYPE_CHECKING:` (type hints only)."""
    tree = ast.parse(path.read_text())
    hints = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("crack_lightning")}


def test_the_libraries_import_only_down():
    """data/, models/ and evaluation/ run below training/ and inference/: they never
    import them (a type hint under TYPE_CHECKING aside)."""
    for sub in ("data", "models", "evaluation"):
        for path in (PACKAGE / sub).rglob("*.py"):
            imported = runtime_imports(path)
            upward = {m for m in imported if m.split(".")[1] in ("training", "inference")}
            assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_no_import_runs_back_up_the_layers():
    """commands/ -> the wrapper (cli) and the libraries -> settings -> errors: nothing
    below the commands imports them or the wrapper."""
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        imported = package_imports(path)
        if where.startswith("commands/"):
            continue
        assert not {m for m in imported if m.startswith("crack_lightning.commands")}, where
        if where != "cli.py":
            assert "crack_lightning.cli" not in imported, where
    wrapper = package_imports(PACKAGE / "cli.py")
    assert wrapper <= {"crack_lightning.errors"}
    assert package_imports(PACKAGE / "settings.py") == {"crack_lightning.errors"}


def test_lightnings_adverts_are_not_shown(caplog):
    from crack_lightning.cli import quiet_logs

    quiet_logs()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level("INFO"):
        rank_zero.info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing x")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
