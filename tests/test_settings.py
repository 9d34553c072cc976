"""The one settings check: a config node against the signature of the code that takes it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from omegaconf import OmegaConf

from crack_lightning.errors import ConfigError, DataError
from crack_lightning.settings import OPEN_UNIT, Rule, at_least, check_settings, settings_of

from .conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]


class Loader:
    """A stand-in for a class a config node builds."""

    settings_error = DataError

    def __init__(
        self,
        root: str,
        batch_size: Annotated[int, at_least(1)],
        threshold: Annotated[float | None, OPEN_UNIT],
        on_bad: Literal["skip", "stop"],
        download: Literal["auto", True, False],
        sizes: list[int],
        workers: int = 2,
    ) -> None:
        self.root = root

    @staticmethod
    def check_together(settings: dict[str, Any], section: str) -> None:
        if settings["on_bad"] == "stop" and settings["download"] is True:
            raise DataError(f"{section}.on_bad=stop cannot download.")


GOOD = {
    "root": "r",
    "batch_size": 8,
    "threshold": None,
    "on_bad": "skip",
    "download": "auto",
    "sizes": [1],
}


def refusal(changes: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(DataError) as caught:
        check_settings({**GOOD, **changes}, Loader, "data", **kwargs)
    return str(caught.value)


def test_good_settings_come_back_typed():
    settings = check_settings(OmegaConf.create({**GOOD, "batch_size": "8"}), Loader, "data")
    assert settings == {**GOOD, "batch_size": 8}  # converted as OmegaConf does


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "data.batch_size=0 must be an integer >= 1."),
        ({"batch_size": "many"}, "data.batch_size=many must be an integer."),
        ({"threshold": 1.0}, "data.threshold=1.0 must be strictly between 0 and 1."),
        ({"threshold": "x"}, "data.threshold=x must be a number or null."),
        ({"on_bad": "ignore"}, "data.on_bad=ignore must be one of skip, stop."),
        ({"download": 1}, "data.download=1 must be one of auto, true, false."),
        ({"sizes": [1, "a"]}, "data.sizes=[1, 'a'] must be a list, each item an integer."),
        ({"on_bad": "stop", "download": True}, "data.on_bad=stop cannot download."),
    ],
)
def test_a_bad_value_is_named_with_what_is_allowed(changes, message):
    assert refusal(changes) == message


def test_an_unknown_key_is_named_with_the_nearest_known_one():
    message = refusal({"batch_sise": 4})
    assert message.startswith("data: ")
    assert "takes no setting 'batch_sise'" in message
    assert message.endswith("Did you mean data.batch_size?")


def test_a_missing_required_setting_is_named_but_defaults_may_be_left_out():
    without_root = {k: v for k, v in GOOD.items() if k != "root"}
    with pytest.raises(DataError, match=r"^missing setting\(s\): data.root.$"):
        check_settings(without_root, Loader, "data")
    assert "workers" not in check_settings(GOOD, Loader, "data")  # has a default


def test_others_are_left_to_their_own_checks_and_rules_cover_foreign_targets():
    assert check_settings(
        {**GOOD, "augmentation": {"x": 1}}, Loader, "data", others=("augmentation",)
    )
    message = refusal({"workers": -1}, rules={"workers": at_least(0)})
    assert message == "data.workers=-1 must be an integer >= 0."


def test_settings_of_builds_the_settings_class():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Window:
        settings_error = ConfigError
        size: Annotated[int, Rule("pixels >= 1", lambda v: v >= 1, "{:d} px".format)]

    assert settings_of({"size": "3"}, Window, "scan") == Window(3)
    with pytest.raises(ConfigError, match=r"^scan.size=0 px must be pixels >= 1.$"):
        settings_of({"size": 0}, Window, "scan")


def test_a_command_refuses_an_unknown_top_level_key():
    from crack_lightning.training.check import check_train_settings

    with pytest.raises(ConfigError, match="Unknown setting 'foo'; this command takes seed="):
        check_train_settings(compose_config("train", ["+foo=1"]))
    with pytest.raises(
        ConfigError, match="CrackClassifier takes no setting 'learning_rate'"
    ) as bad:
        check_train_settings(compose_config("train", ["+model.learning_rate=5"]))
    assert str(bad.value).endswith("Did you mean model.lr?")
    with pytest.raises(ConfigError, match=r"seed=-1 must be an integer in \[0, 4294967295\]"):
        check_train_settings(compose_config("train", ["seed=-1"]))
    with pytest.raises(DataError, match=r"^data.image_size=100000 must be an integer <= 1024 \("):
        check_train_settings(compose_config("train", ["data.image_size=100000"]))
    check_train_settings(compose_config("train", ["data.image_size=1024"]))  # the ceiling itself


def test_each_setting_is_stated_once():
    """No second schema beside the code: nothing in the package defines a dataclass field
    default of MISSING, and no module besides settings.py merges configs into schemas."""
    for path in (ROOT / "src" / "crack_lightning").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "MISSING" not in names or path.name == "settings.py", path
