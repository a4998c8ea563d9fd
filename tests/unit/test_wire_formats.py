"""Version skew: what the operator and the runtime exchange is read across releases; user specs stay strict."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJob, FineTuneJobStatus
from kubetune.operator.api.manifests import parse
from kubetune.operator.settings import Settings, SettingsError
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.report import REPORT_SCHEMA_VERSION, RunReport, Unavailable
from kubetune.runtime.contract.runconfig import RUN_CONFIG_SCHEMA_VERSION, RunConfig
from pydantic import ValidationError

from ..conftest import mutated


def test_a_report_from_a_newer_runtime_is_read_for_what_this_operator_knows() -> None:
    text = json.dumps(
        {
            "schemaVersion": 7,
            "stage": "train",
            "step": 3,
            "tokensPerSecond": 1234.5,
            "variants": {"int4": {"uri": "s3://b/int4", "bitsPerWeight": 4, "metrics": {"accuracy": 0.8}}},
        }
    )
    report = RunReport.model_validate_json(text)
    assert (report.schema_version, report.step, report.variants and report.variants["int4"].uri) == (
        7, 3, "s3://b/int4",
    )  # fmt: skip


def test_a_report_from_an_older_runtime_has_the_first_schema_version() -> None:
    report = RunReport.model_validate_json('{"stage": "load"}')
    assert report.schema_version == 1
    assert RunReport(stage="done").to_wire()["schemaVersion"] == REPORT_SCHEMA_VERSION


@pytest.mark.parametrize(
    ("written", "read"),
    [({}, None), ({"unavailable": "ModelHub"}, Unavailable.MODEL_HUB), ({"unavailable": "GpuQuota"}, None)],
)
def test_what_a_failed_run_could_not_reach_is_read_across_releases(
    written: dict[str, Any], read: Unavailable | None
) -> None:
    report = RunReport.model_validate_json(json.dumps({"stage": "failed", "error": "x", **written}))
    assert report.unavailable == read  # a kind this operator does not know: an ordinary failure
    assert RunReport(stage="failed", unavailable="ModelHub").to_wire()["unavailable"] == "ModelHub"


def run_config(minimal_job: dict[str, Any], **spec_extra: Any) -> dict[str, Any]:
    spec = {k: v for k, v in minimal_job["spec"].items()}
    return {"schemaVersion": 3, "spec": {**spec, **spec_extra}, "run": {"jobName": "j", "futureField": 1}}


def test_a_run_config_from_a_newer_operator_drops_and_lists_spec_fields_it_does_not_know(
    minimal_job: dict[str, Any],
) -> None:
    document = run_config(minimal_job, telemetry={"enabled": True})
    document["spec"]["hyperparameters"] = {"learningRate": 0.001, "lookahead": 5}
    config = RunConfig.from_document(document)
    assert sorted(config.ignored_fields) == ["spec.hyperparameters.lookahead", "spec.telemetry"]
    assert config.spec.hyperparameters.learning_rate == 0.001 and config.run.job_name == "j"
    assert document["spec"]["telemetry"] == {"enabled": True}  # the caller's document is left alone
    assert RunConfig(spec=config.spec).to_wire()["schemaVersion"] == RUN_CONFIG_SCHEMA_VERSION


def test_a_run_config_with_a_wrong_value_is_still_an_error(minimal_job: dict[str, Any]) -> None:
    document = run_config(minimal_job, telemetry={"enabled": True})
    document["spec"]["hyperparameters"] = {"learningRate": -1.0}
    with pytest.raises(ValidationError) as raised:
        RunConfig.from_document(document)
    assert "learningRate" in str(raised.value)


def test_a_status_written_by_a_newer_operator_is_read(minimal_job: dict[str, Any]) -> None:
    status = FineTuneJobStatus.model_validate(
        {"phase": "Running", "costEstimate": "3 GPU-hours", "runs": [{"number": 1, "rayJobName": "j-r1",
         "trigger": "SpecChange", "specGeneration": 1, "phase": "Running", "queuePosition": 4}]}
    )  # fmt: skip
    assert status.runs and status.runs[0].ray_job_name == "j-r1"


def test_user_specs_still_reject_unknown_fields(minimal_job: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as raised:
        parse(mutated(minimal_job, "spec.hyperparameters.lookahead", 5))
    assert "spec.hyperparameters.lookahead: unknown field" in raised.value.problems
    job = parse(minimal_job)
    assert isinstance(job, FineTuneJob)


def test_settings_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    settings = Settings.from_environment({"KUBETUNE_WORKERS": "4", "KUBETUNE_RECHECK_SECONDS": "600"})
    assert (settings.workers, settings.recheck_seconds, settings.coalesce_seconds) == (4, 600.0, 0.5)
    with pytest.raises(SettingsError, match="KUBETUNE_WORKERS='many'"):
        Settings.from_environment({"KUBETUNE_WORKERS": "many"})
    with pytest.raises(SettingsError, match="KUBETUNE_WORKERS='0': Input should be greater than 0"):
        Settings.from_environment({"KUBETUNE_WORKERS": "0"})
    with pytest.raises(SettingsError, match="KUBETUNE_BACKOFF_MAX_SECONDS='-1': Input should be greater than or equal"):
        Settings.from_environment({"KUBETUNE_BACKOFF_MAX_SECONDS": "-1"})
    with pytest.raises(SettingsError, match="KUBETUNE_METRICS_PORT='70000'"):
        Settings.from_environment({"KUBETUNE_METRICS_PORT": "70000"})
    # An empty variable keeps the default, as an unset one does.
    assert Settings.from_environment({"KUBETUNE_WORKERS": "", "KUBETUNE_RUNTIME_IMAGE": ""}) == Settings()


def test_settings_read_the_process_environment_unless_given_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_WORKERS", "7")
    assert Settings.from_environment().workers == 7
    # A given mapping is the whole environment: nothing of the process's leaks in.
    assert Settings.from_environment({"KUBETUNE_RECHECK_SECONDS": "1"}).workers == 16
    monkeypatch.setenv("KUBETUNE_WORKERS", "-2")
    with pytest.raises(SettingsError, match="KUBETUNE_WORKERS='-2'"):
        Settings.from_environment()
