"""A GPU run's first step: planned on CPU, then launched (its RayJob created) or refused. Pure.

A run that asks for GPUs starts as a plan Job (the head's pod, no GPU) that reads the
model's config.json and writes a RunPlan into the run's report ConfigMap. Only a plan that
fits (or that could not be judged: a GPU type the planner does not know) creates the RayJob,
so a run that cannot fit fails with the figures before any GPU worker is scheduled.
"""

from __future__ import annotations

from kubetune.operator.api.finetunejob import FineTuneJob, JobPhase, RunFailure, RunRecord
from kubetune.operator.observe.kuberay import ray_job_state
from kubetune.operator.observe.plan_jobs import PlanJobState
from kubetune.operator.observe.pods import PodWait
from kubetune.runtime.contract.plan import RunPlan

GIB = 2**30
PLANNING_MESSAGE = "planning on CPU from the model's config.json: the RayJob is created when the run fits"
# While a run is planned, its plan Job is read this often: a Job's failure reaches no watch of the operator.
PLANNING_RECHECK_SECONDS = 10.0


def plans_first(job: FineTuneJob) -> bool:
    """Whether the job's runs are planned on CPU before their RayJob requests GPUs: when they ask for GPUs."""
    return job.spec.resources.gpus_per_worker > 0


def plan_summary(plan: RunPlan) -> str:
    """The plan in a few figures: memory per GPU against the GPU's, and the planned speed."""
    if plan.memory_per_device_bytes is None:
        return "no memory figure"
    memory = f"{plan.memory_per_device_bytes / GIB:.3g} GiB per GPU"
    if plan.gpu is None or plan.device_memory_bytes is None:
        return f"{memory} (the GPU type is not in the planner's table: not judged)"
    text = f"{memory} of {plan.device_memory_bytes / GIB:.3g} on {plan.gpu}"
    if plan.tokens_per_second is not None:
        text += f", about {plan.tokens_per_second:,.0f} tokens/s"
    return text


def planned(
    record: RunRecord, plan: RunPlan | None, job: PlanJobState | None, wait: PodWait | None
) -> tuple[RunRecord, bool]:
    """A Planning run after what is seen now, and whether its RayJob is to be created.

    `job` is None when the plan Job is gone. A plan is read even then: it was written before.
    A refused or failed run is returned in phase Failed (the caller finishes and judges it).
    """
    if plan is not None:
        record = record.model_copy(update={"plan": plan, "waiting": None})
        if plan.invalid_field is not None:
            detail = (plan.error or "the run cannot be planned").removeprefix(f"{plan.invalid_field}: ")
            return _failed(record, RunFailure.INVALID_SPEC, f"spec.{plan.invalid_field}: {detail}"), False
        if plan.fits is False:
            message = plan.message or f"the run does not fit its GPU: {plan_summary(plan)}"
            return _failed(record, RunFailure.INVALID_SPEC, message), False
        message = f"planned: {plan_summary(plan)}; RayJob created"
        # What observing the new RayJob gives: no status yet.
        launched = {"phase": JobPhase.PENDING, "message": message, "ray_job": ray_job_state(record.ray_job_name, None)}
        return record.model_copy(update=launched), True
    if job is None:
        return _failed(record, RunFailure.PLAN_FAILED, "the plan Job was deleted before it wrote the plan"), False
    if job.failure is not None:
        return _failed(record, RunFailure.PLAN_FAILED, f"the plan Job failed: {job.failure}"), False
    if wait is not None:
        return record.model_copy(update={"waiting": wait.reason, "message": wait.message}), False
    return record.model_copy(update={"waiting": None, "message": PLANNING_MESSAGE}), False


def _failed(record: RunRecord, failure: RunFailure, message: str) -> RunRecord:
    return record.model_copy(update={"phase": JobPhase.FAILED, "failure": failure, "message": message, "waiting": None})
