"""The promotion gate of a FineTuneJob: whether a finished run may be promoted, and why. Pure."""

from __future__ import annotations

from kubetune.operator.api.finetunejob import FineTuneJob, GateReason, GateResult, JobPhase, RunRecord
from kubetune.runtime.contract.report import RunReport
from kubetune.runtime.contract.search import METRIC_MODE, Metric, Mode
from kubetune.runtime.contract.serving import Variant


def gate(job: FineTuneJob, record: RunRecord, report: RunReport | None = None) -> GateResult:
    """Whether a finished run may be promoted, and why."""
    promotion = job.spec.promotion
    if record.phase != JobPhase.SUCCEEDED:
        return GateResult(
            passed=False, reason=GateReason.RUN_NOT_SUCCEEDED, message=f"run {record.number} did not succeed"
        )
    if not promotion.enabled:
        return GateResult(passed=False, reason=GateReason.PROMOTION_DISABLED, message="promotion is disabled")
    metric: Metric = promotion.metric or job.spec.search_metric
    before = (record.metrics_before or {}).get(metric.value)
    after = (record.metrics_after or {}).get(metric.value)
    measured = {"metric": metric, "value": after, "baseline": before}
    # A metric that was NaN or infinite (a diverged run, say) leaves nothing to compare.
    for model, field in (("fine-tuned", "metricsAfter"), ("base", "metricsBefore")):
        if f"{field}.{metric.value}" in (record.not_finite or []):
            return GateResult(
                passed=False,
                reason=GateReason.METRIC_NOT_FINITE,
                message=f"run {record.number}: the {model} model's {metric.value} is not a finite number",
                **measured,
            )
    if after is None:
        return GateResult(
            passed=False,
            reason=GateReason.METRIC_MISSING,
            message=f"run {record.number} reported no {metric.value}",
            **measured,
        )
    maximise = METRIC_MODE[metric] == Mode.MAX
    if before is not None:
        improvement = after - before if maximise else before - after
        if improvement < promotion.min_improvement:
            return GateResult(
                passed=False,
                reason=GateReason.IMPROVEMENT_TOO_SMALL,
                message=f"{metric.value} improved by {improvement:.4g}, "
                f"less than promotion.minImprovement {promotion.min_improvement:g}",
                **measured,
            )
    if promotion.min_value is not None and (after < promotion.min_value if maximise else after > promotion.min_value):
        bound = "at least" if maximise else "at most"
        return GateResult(
            passed=False,
            reason=GateReason.OUT_OF_BOUND,
            message=f"{metric.value} {after:.4g} is not {bound} promotion.minValue {promotion.min_value:g}",
            **measured,
        )
    if promotion.min_baseline_improvement is not None:
        refused = _baseline_refusal(record, metric, after, promotion.min_baseline_improvement)
        if refused is not None:
            return refused.model_copy(update=measured)
        measured["classical_baseline"] = (record.metrics_baseline or {}).get(metric.value)
    dropped = _benchmark_refusal(job, record, report)
    if dropped is not None:
        return dropped.model_copy(update=measured)
    if promotion.require_compressed:
        variants = (report.variants if report else None) or {}
        if not any(v.accepted for name, v in variants.items() if name not in (Variant.FULL, Variant.MERGED)):
            return GateResult(
                passed=False,
                reason=GateReason.NO_COMPRESSED_VARIANT,
                message="no compressed variant within compression.maxAccuracyDrop",
                **measured,
            )
    compared = [f"base {before:.4g}"] if before is not None else []
    classical = measured.get("classical_baseline")
    if classical is not None:
        compared.append(f"classical baseline {classical:.4g}")
    message = f"{metric.value} {after:.4g}" + (f" ({', '.join(compared)})" if compared else "")
    return GateResult(passed=True, reason=GateReason.PASSED, message=message, **measured)


def _baseline_refusal(record: RunRecord, metric: Metric, after: float, margin: float) -> GateResult | None:
    """Why the fine-tuned model does not beat the classical baseline by `margin`; None when it does."""
    baseline = (record.metrics_baseline or {}).get(metric.value)
    named = f"classical baseline {record.baseline_model}" if record.baseline_model else "classical baseline"
    if f"metricsBaseline.{metric.value}" in (record.not_finite or []):
        return GateResult(
            passed=False,
            reason=GateReason.METRIC_NOT_FINITE,
            message=f"run {record.number}: the {named}'s {metric.value} is not a finite number",
        )
    if baseline is None:
        why = f": {record.baseline_skipped}" if record.baseline_skipped else ""
        return GateResult(
            passed=False,
            reason=GateReason.BASELINE_MISSING,
            message=f"run {record.number} reported no classical baseline {metric.value} for "
            f"promotion.minBaselineImprovement{why}",
        )
    improvement = after - baseline if METRIC_MODE[metric] == Mode.MAX else baseline - after
    if improvement >= margin:
        return None
    return GateResult(
        passed=False,
        reason=GateReason.BASELINE_NOT_BEATEN,
        classical_baseline=baseline,
        message=f"{metric.value} {after:.4g} beats the {named} ({baseline:.4g}) by {improvement:.4g}, "
        f"less than promotion.minBaselineImprovement {margin:g}",
    )


def best_metric(verdict: GateResult | None) -> str | None:
    """What the printer column Best shows of a promoted run, e.g. `accuracy=0.91`."""
    if verdict is None or verdict.metric is None or verdict.value is None:
        return None
    return f"{verdict.metric.value}={verdict.value:.4g}"


def _benchmark_refusal(job: FineTuneJob, record: RunRecord, report: RunReport | None) -> GateResult | None:
    """A refusal when a benchmark metric of the fine-tuned model fell more than evaluation.lmEval.maxDrop."""
    lm_eval = job.spec.lm_eval
    if lm_eval is None or lm_eval.max_drop is None:
        return None
    names = report.benchmark_metrics if report is not None else None
    if not names:
        return GateResult(
            passed=False,
            reason=GateReason.METRIC_MISSING,
            message=f"run {record.number} reported no evaluation.lmEval metrics to bound with maxDrop",
        )
    before, after = record.metrics_before or {}, record.metrics_after or {}
    for name in names:
        if before.get(name) is None or after.get(name) is None:
            return GateResult(
                passed=False,
                reason=GateReason.METRIC_MISSING,
                message=f"run {record.number} reported no {name} for both the base and the fine-tuned model",
            )
        drop = before[name] - after[name]  # benchmark metrics improve upward
        if drop > lm_eval.max_drop + 1e-12:
            return GateResult(
                passed=False,
                reason=GateReason.BENCHMARK_DROPPED,
                message=f"{name} fell by {drop:.4g} ({before[name]:.4g} to {after[name]:.4g}), "
                f"more than evaluation.lmEval.maxDrop {lm_eval.max_drop:g}",
            )
    return None
