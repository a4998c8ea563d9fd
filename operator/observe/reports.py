"""A run's report: what the operator keeps of its ConfigMap, and how it is mirrored into the run record.

The report is written by the run's pod (where the user's code runs), and anyone who
may create ConfigMaps in a watched namespace can give one the report labels. So
what it holds is judged before it is parsed, in this order: the ConfigMap must
name a FineTuneJob as its controller (the job its label names), and its text
must fit REPORT_MAX_BYTES; what is parsed is then cut to what a run record can
hold (variants, metrics, hyperparameters), and only that record is cached.
`with_report` then mirrors it into the run record, within the same bounds. No I/O
and no clock (a refused report is logged).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.operator.api.common import GROUP
from kubetune.operator.api.finetunejob import KIND, MAX_ARTIFACTS, MAX_METRICS, RunRecord
from kubetune.operator.naming import JOB_LABEL, RUN_LABEL
from kubetune.runtime.contract.common import MESSAGE_MAX_LENGTH, SHORT_TEXT_MAX_LENGTH, URI_MAX_LENGTH, Metrics, Uri
from kubetune.runtime.contract.plan import PLAN_KEY, RunPlan
from kubetune.runtime.contract.report import REPORT_KEY, BaselineReport, RunProgress, RunReport, Stage, VariantReport
from kubetune.runtime.contract.search import Metric
from pydantic import TypeAdapter, ValidationError

log = logging.getLogger("kubetune.finetunejob")

# Longest report text read. The largest report a run writes (MAX_ARTIFACTS variants with the longest
# URIs and reasons, MAX_METRICS metrics per model, baseline and variant, the longest error, message and
# texts, hyperparameters at the record's cap, MAX_DECISIONS decisions) is about 112 KiB of JSON; anything
# longer is not a run's report, and is never parsed.
REPORT_MAX_BYTES = 128 * 1024


class Refusal(StrEnum):
    """Why a report ConfigMap is not read."""

    NOT_OWNED = "NotOwned"  # no controller ownerReference to the FineTuneJob its label names
    TOO_LARGE = "TooLarge"  # text over REPORT_MAX_BYTES
    MALFORMED = "Malformed"  # no run number, or not a report


@dataclass(frozen=True)
class Report:
    """A run's latest report, bounded; its run number and the UID of the job its ConfigMap names as controller."""

    number: int
    owner_uid: str
    report: RunReport | None  # None while only the plan is written
    plan: RunPlan | None = None  # a GPU run's plan, written before its RayJob exists


@dataclass(frozen=True)
class Refused:
    """A report ConfigMap that is not read, and why."""

    reason: Refusal
    detail: str


def read_report(config_map: Mapping[str, Any]) -> Report | Refused | None:
    """The bounded report (and plan) of a report ConfigMap; Refused when it is not read; None while the run
    wrote nothing."""
    meta = config_map.get("metadata") or {}
    data = config_map.get("data") or {}
    text, plan_text = data.get(REPORT_KEY), data.get(PLAN_KEY)
    if not text and not plan_text:
        return None
    owner_uid = job_controller_uid(meta)
    if owner_uid is None:
        job = (meta.get("labels") or {}).get(JOB_LABEL)
        return Refused(Refusal.NOT_OWNED, f"its controller is not the {KIND} {job!r} that its {JOB_LABEL} label names")
    # Characters first: a huge text is refused without being encoded.
    for key, value in ((REPORT_KEY, text), (PLAN_KEY, plan_text)):
        if value and (len(value) > REPORT_MAX_BYTES or len(value.encode()) > REPORT_MAX_BYTES):
            return Refused(Refusal.TOO_LARGE, f"{key} is over {REPORT_MAX_BYTES} bytes")
    try:
        number = int((meta.get("labels") or {})[RUN_LABEL])
        report = RunReport.model_validate_json(text) if text else None
        plan = RunPlan.model_validate_json(plan_text) if plan_text else None
    except KeyError:
        return Refused(Refusal.MALFORMED, f"no {RUN_LABEL} label")
    except ValueError as error:  # a ValidationError too
        return Refused(Refusal.MALFORMED, str(error)[:MESSAGE_MAX_LENGTH])
    return Report(number, owner_uid, bounded_report(report) if report is not None else None, plan)


def job_controller_uid(meta: Mapping[str, Any]) -> str | None:
    """The UID of the object's controller when that is the kubetune FineTuneJob its job label names, else None."""
    job = (meta.get("labels") or {}).get(JOB_LABEL)
    for reference in meta.get("ownerReferences") or []:
        if reference.get("controller") is not True:
            continue
        group = str(reference.get("apiVersion") or "").partition("/")[0]
        uid = reference.get("uid")
        if group == GROUP and reference.get("kind") == KIND and job and reference.get("name") == job and uid:
            return str(uid)
        return None  # an object has at most one controller
    return None


def bounded_report(report: RunReport) -> RunReport:
    """The report cut to what a run record can hold: the same bounds as the status, applied before caching.

    At most MAX_ARTIFACTS variants (short names, URIs that fit), MAX_METRICS metrics per model (the
    classical baseline too) and per variant, hyperparameters within the record's cap, a manifest URI that fits a URI.
    """
    variants = None
    if report.variants is not None:
        kept = bounded_artifacts({name: variant.uri for name, variant in report.variants.items()})
        variants = {name: _bounded_variant(report.variants[name]) for name in kept}
    manifest_uri = report.manifest_uri if report.manifest_uri and len(report.manifest_uri) <= URI_MAX_LENGTH else None
    return report.model_copy(
        update={
            "metrics_before": None if report.metrics_before is None else bounded_metrics(report.metrics_before),
            "metrics_after": None if report.metrics_after is None else bounded_metrics(report.metrics_after),
            "baseline": _bounded_baseline(report.baseline),
            "variants": variants,
            "best_hyperparameters": bounded_hyperparameters(report.best_hyperparameters),
            "manifest_uri": manifest_uri,
        }
    )


def _bounded_variant(variant: VariantReport) -> VariantReport:
    return variant.model_copy(update={"metrics": bounded_metrics(variant.metrics)})


def _bounded_baseline(baseline: BaselineReport | None) -> BaselineReport | None:
    return None if baseline is None else baseline.model_copy(update={"metrics": bounded_metrics(baseline.metrics)})


def observe_report(config_map: Mapping[str, Any]) -> Report | None:
    """What the report cache keeps of a run's report ConfigMap: the bounded report, or nothing.

    Nothing while the run has written nothing, and nothing for a ConfigMap that is not a
    FineTuneJob's, whose text is too large, or that is not a report (with a warning).
    """
    seen = read_report(config_map)
    if isinstance(seen, Refused):  # a bad report never breaks the job's status, nor the operator
        name = (config_map.get("metadata") or {}).get("name")
        log.warning("ignoring report ConfigMap %s (%s): %s", name, seen.reason.value, seen.detail)
        return None
    return seen


# What a run record keeps of a report's hyperparameters: small ones only.
HYPERPARAMETERS_MAX_BYTES = 4096


def with_report(record: RunRecord, report: RunReport | None, output_uri: str) -> RunRecord:
    """Mirror the runtime's report into the run record.

    `output_uri` is where the run writes (its folder under spec.output.uri): the artifacts and the manifest
    a report names are kept only when they lie there, since an endpoint mounts and loads what they name.
    """
    if report is None:
        return record
    fields = report.model_dump(include=set(RunProgress.model_fields))
    if report.stage == Stage.FAILED:  # a failed run's message is its error, cut to what a message holds
        fields["message"] = report.error[:MESSAGE_MAX_LENGTH] if report.error else None
    progress = RunProgress.model_validate(fields)
    update: dict[str, Any] = {"progress": progress}
    # The report is written by the run's pod: what it holds is bounded before it reaches the status.
    update.update(finite_metrics(report.metrics_before, report.metrics_after, report.baseline))
    if report.variants:
        produced = {
            name: variant.uri for name, variant in report.variants.items() if lies_under(variant.uri, output_uri)
        }
        update["artifacts"] = bounded_artifacts(produced)
    if report.best_variant:
        update["best_variant"] = report.best_variant
    if report.manifest_uri and lies_under(report.manifest_uri, output_uri):
        update["manifest_uri"] = report.manifest_uri
    hyperparameters = bounded_hyperparameters(report.best_hyperparameters)
    if hyperparameters is not None:
        update["best_hyperparameters"] = hyperparameters
    if report.decisions:  # already bounded: MAX_DECISIONS, each text cut to its field's length
        update["decisions"] = report.decisions
    return record.model_copy(update=update)


_URI = TypeAdapter(Uri)


def lies_under(uri: str, folder: str) -> bool:
    """Whether `uri` is a valid URI inside `folder` (same scheme, bucket or claim, and path prefix).

    Its path below the folder may not step out of it: no empty, `.` or `..` segments.
    """
    try:
        _URI.validate_python(uri)
    except ValidationError:
        return False
    base = folder.rstrip("/")
    if not base or not uri.startswith(base + "/"):
        return False
    below = uri[len(base) + 1 :].removesuffix("/")
    return bool(below) and all(part not in ("", ".", "..") for part in below.split("/"))


def bounded_hyperparameters(hyperparameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Reported hyperparameters that a run record keeps: small ones only (None: none, or too large)."""
    if hyperparameters is None or len(json.dumps(hyperparameters)) > HYPERPARAMETERS_MAX_BYTES:
        return None
    return hyperparameters


def bounded_metrics(metrics: Metrics) -> Metrics:
    """At most MAX_METRICS metrics with short names, kubetune's own (accuracy, loss, ...) first."""
    known = {metric.value for metric in Metric}
    names = sorted((n for n in metrics if len(n) <= SHORT_TEXT_MAX_LENGTH), key=lambda n: (n not in known, n))
    return {name: metrics[name] for name in names[:MAX_METRICS]}


def finite_metrics(
    before: Metrics | None, after: Metrics | None, baseline: BaselineReport | None = None
) -> dict[str, Any]:
    """A run record's metrics fields from reported ones: finite values, and which were not (NaN, infinite).

    At most MAX_METRICS metrics per model with short names, kubetune's own (accuracy, loss, ...) first.
    The classical baseline's metrics go beside the base and fine-tuned models', with its model, or why
    there is none.
    """
    fields: dict[str, Any] = {}
    not_finite: list[str] = []
    if baseline is not None:
        if baseline.model:
            fields["baseline_model"] = baseline.model
        if baseline.skipped:
            fields["baseline_skipped"] = baseline.skipped
    baseline_metrics = baseline.metrics if baseline is not None and baseline.metrics else None
    for field, wire, metrics in (
        ("metrics_before", "metricsBefore", before),
        ("metrics_after", "metricsAfter", after),
        ("metrics_baseline", "metricsBaseline", baseline_metrics),
    ):
        if metrics is None:
            continue
        kept = bounded_metrics(metrics)
        fields[field] = {name: value for name, value in kept.items() if value is not None}
        not_finite += [f"{wire}.{name}" for name, value in kept.items() if value is None]
    if not_finite:
        fields["not_finite"] = not_finite
    return fields


def bounded_artifacts(artifacts: Mapping[str, str]) -> dict[str, str]:
    """At most MAX_ARTIFACTS variants with short names and URIs that fit a URI field, by name."""
    fitting = sorted(
        (name, uri)
        for name, uri in artifacts.items()
        if len(name) <= SHORT_TEXT_MAX_LENGTH and len(uri) <= URI_MAX_LENGTH
    )
    return dict(fitting[:MAX_ARTIFACTS])
