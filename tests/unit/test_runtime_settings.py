"""The runtime's settings: read from KUBETUNE_* variables, bad values named, faults behind one variable."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from kubetune.runtime.io.settings import Faults, RuntimeSettings, SettingsError
from kubetune.runtime.recipe import finetune


def test_locations_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings = RuntimeSettings.from_environment()
    assert (settings.pvc_root, settings.cache_dir) == (tmp_path / "pvc", tmp_path / "cache")
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", "")  # empty: the default, under XDG_CACHE_HOME
    assert RuntimeSettings.from_environment().cache_dir == tmp_path / "xdg" / "kubetune"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", Faults()),
        ("train_step=6", Faults(train_step=6)),
        (" train_step = 6 , serve_input=__fail__ ", Faults(train_step=6, serve_input="__fail__")),
    ],
)
def test_faults_are_name_value_pairs(monkeypatch: pytest.MonkeyPatch, raw: str, expected: Faults) -> None:
    monkeypatch.setenv("KUBETUNE_FAULTS", raw)
    assert RuntimeSettings.from_environment().faults == expected


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("KUBETUNE_FAULTS", "at_step=6", "KUBETUNE_FAULTS at_step='6': Extra inputs are not permitted"),
        ("KUBETUNE_FAULTS", "train_step=six", "KUBETUNE_FAULTS train_step='six': Input should be a valid integer"),
        ("KUBETUNE_FAULTS", "train_step=0", "KUBETUNE_FAULTS train_step='0': Input should be greater than or equal"),
        ("KUBETUNE_FAULTS", "train_step", "KUBETUNE_FAULTS='train_step': Value error, 'train_step' is not name=value"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, message: str) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(SettingsError) as raised:
        RuntimeSettings.from_environment()
    assert str(raised.value).startswith(message)


def test_reusing_downloads_is_no_setting_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_REUSE_DOWNLOADS", "true")
    settings = RuntimeSettings.from_environment()
    assert not settings.reuse_downloads
    workers = settings.reusing_downloads()
    # Ray hands the settings to its workers pickled.
    assert pickle.loads(pickle.dumps(workers)).reuse_downloads and not settings.reuse_downloads


def test_the_entry_point_reads_the_run_config_the_environment_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBETUNE_RUN_CONFIG", raising=False)
    assert finetune.main([]) == finetune.EXIT_INVALID
    assert "give --config or set KUBETUNE_RUN_CONFIG" in capsys.readouterr().err
    config = tmp_path / "run.json"
    config.write_text("{not json", encoding="utf-8")
    monkeypatch.setenv("KUBETUNE_RUN_CONFIG", str(config))
    assert finetune.main([]) == finetune.EXIT_INVALID
    assert f"{config}: not valid JSON" in capsys.readouterr().err.replace("\n", "")
    monkeypatch.setenv("KUBETUNE_FAULTS", "nonsense")
    assert finetune.main([]) == finetune.EXIT_INVALID
    assert "invalid setting: KUBETUNE_FAULTS='nonsense'" in capsys.readouterr().err
