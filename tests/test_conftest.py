"""The test suite's own rule for real data: skip without ../shared, fail in CI."""

from pathlib import Path

import pytest

from tests.conftest import shared_path


def test_missing_shared_data_skips_outside_ci(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nothing-here is missing"):
        shared_path(tmp_path / "nothing-here")


def test_missing_shared_data_fails_under_ci(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nothing-here is missing"):
        shared_path(tmp_path / "nothing-here")


def test_present_shared_data_is_returned(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CI", "true")
    assert shared_path(tmp_path) == tmp_path
