"""What the operator keeps of a run's report ConfigMap: a small typed record, or why it keeps nothing.

The report is written by the run's pod (where the user's code runs), and anyone who
may create ConfigMaps in a watched namespace can give one the report labels. So
what it holds is judged before it is parsed, in this order: the ConfigMap must
name a FineTuneJob as its controller (the job its label names), and its text
must fit REPORT_MAX_BYTES; what is parsed is then cut to what a run record can
hold (variants, metrics, hyperparameters), and only that record is cached. Pure:
no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.operator.api.common import GROUP
from kubetune.operator.api.finetunejob import KIND
from kubetune.operator.naming import JOB_LABEL, RUN_LABEL
from kubetune.runtime.contract.common import MESSAGE_MAX_LENGTH, URI_MAX_LENGTH
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, VariantReport

from .finetunejob import bounded_artifacts, bounded_hyperparameters, bounded_metrics

# Longest report text read. The largest report a run writes (MAX_ARTIFACTS variants with the longest
# URIs and reasons, MAX_METRICS metrics per model and variant, the longest error, message and texts,
# hyperparameters at the record's cap) is about 97 KiB of JSON; anything longer is not a run's report,
# and is never parsed.
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
    report: RunReport


@dataclass(frozen=True)
class Refused:
    """A report ConfigMap that is not read, and why."""

    reason: Refusal
    detail: str


def read_report(config_map: Mapping[str, Any]) -> Report | Refused | None:
    """The bounded report of a report ConfigMap; Refused when it is not read; None while the run wrote nothing."""
    meta = config_map.get("metadata") or {}
    text = (config_map.get("data") or {}).get(REPORT_KEY)
    if not text:
        return None
    owner_uid = job_controller_uid(meta)
    if owner_uid is None:
        job = (meta.get("labels") or {}).get(JOB_LABEL)
        return Refused(Refusal.NOT_OWNED, f"its controller is not the {KIND} {job!r} that its {JOB_LABEL} label names")
    # Characters first: a huge text is refused without being encoded.
    if len(text) > REPORT_MAX_BYTES or len(text.encode()) > REPORT_MAX_BYTES:
        return Refused(Refusal.TOO_LARGE, f"{REPORT_KEY} is over {REPORT_MAX_BYTES} bytes")
    try:
        number = int((meta.get("labels") or {})[RUN_LABEL])
        report = RunReport.model_validate_json(text)
    except KeyError:
        return Refused(Refusal.MALFORMED, f"no {RUN_LABEL} label")
    except ValueError as error:  # a ValidationError too
        return Refused(Refusal.MALFORMED, str(error)[:MESSAGE_MAX_LENGTH])
    return Report(number, owner_uid, bounded_report(report))


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

    At most MAX_ARTIFACTS variants (short names, URIs that fit), MAX_METRICS metrics per model and per
    variant, hyperparameters within the record's cap, a manifest URI that fits a URI.
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
            "variants": variants,
            "best_hyperparameters": bounded_hyperparameters(report.best_hyperparameters),
            "manifest_uri": manifest_uri,
        }
    )


def _bounded_variant(variant: VariantReport) -> VariantReport:
    return variant.model_copy(update={"metrics": bounded_metrics(variant.metrics)})
