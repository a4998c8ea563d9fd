"""API building blocks shared by kubetune's kinds: scheduling, secrets, conditions.

Only pydantic, the standard library and the run contract may be imported here.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from kubetune.runtime.contract.common import (
    ContractModel,
    KubernetesName,
    Message,
    Quantity,
    WireModel,
    cel_rule,
    check_cpu_limit,
    cpu_limit_rule,
    with_cel,
)
from pydantic import Field, field_validator, model_validator

from .affinity import LABEL_KEYS_SCHEMA, Affinity, LabelValue, check_label_keys

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetune"

IMAGE_PATTERN = r"^[^\s]+$"
RAY_VERSION_PATTERN = r"^[0-9]+\.[0-9]+\.[0-9]+([-.+][0-9A-Za-z.]+)?$"
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Names of FineTuneJobs and ModelDeployments: DNS-1035 labels, as KubeRay requires of the RayJobs and
# RayServices named after them (no dot, no leading digit), and short enough to be a label value.
OBJECT_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
OBJECT_NAME_MAX_LENGTH = 63
_CRON_NAMES = {
    3: ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    4: ("sun", "mon", "tue", "wed", "thu", "fri", "sat"),
}
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")


def any_case(word: str) -> str:
    """`jan` as `[Jj][Aa][Nn]`: case-insensitive in the API server's regular expressions too."""
    return "".join(f"[{c.upper()}{c}]" for c in word)


def _cron_field(index: int) -> str:
    """The exact grammar of one cron field: values in range, ranges, lists and positive steps."""
    numbers = (
        r"[0-5]?[0-9]",
        r"[01]?[0-9]|2[0-3]",
        r"0?[1-9]|[12][0-9]|3[01]",
        r"0?[1-9]|1[0-2]",
        r"0?[0-7]",
    )[index]
    value = "|".join([numbers, *(any_case(name) for name in _CRON_NAMES.get(index, ()))])
    item = rf"(\*|({value})(-({value}))?)(/0*[1-9][0-9]{{0,3}})?"
    if index in (2, 4):  # "?" (no specific value) is for the day fields only, and alone
        item = rf"(\?|{item})"
    return rf"{item}(,{item})*"


_CRON_FIELDS = tuple(re.compile(_cron_field(index)) for index in range(5))
CRON_MACROS = ("yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly")
# Five fields separated by single spaces, or a macro: what the schedule's croniter reads, as one pattern.
CRON_PATTERN = rf"^(@({'|'.join(CRON_MACROS)})|" + " ".join(f"({_cron_field(index)})" for index in range(5)) + ")$"


def _cron_value(token: str, index: int) -> int:
    names = _CRON_NAMES.get(index, ())
    if token.lower() in names:
        return names.index(token.lower()) + (1 if index == 3 else 0)
    if not token.isdigit():
        raise ValueError(f"cron {_CRON_FIELD_NAMES[index]} has an unknown value {token!r}")
    low, high = _CRON_RANGES[index]
    if not low <= int(token) <= high:
        raise ValueError(f"cron {_CRON_FIELD_NAMES[index]} value {token} is outside {low}-{high}")
    return int(token)


def check_cron(expression: str) -> str:
    """Validate a 5-field cron expression (or a macro such as @daily) with clear messages.

    Exactly what CRON_PATTERN admits. A reversed range (22-2) wraps around, as croniter reads it.
    """
    if expression.startswith("@") and expression[1:] in CRON_MACROS:
        return expression
    fields = expression.split(" ")
    if len(fields) != 5 or not all(fields):
        raise ValueError(
            f"{expression!r} is not a cron expression: expected 5 fields separated by single spaces "
            "(minute hour day-of-month month day-of-week) or a macro such as @daily"
        )
    for index, field in enumerate(fields):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step.isdigit() and int(step) == 0:
                raise ValueError(f"cron {_CRON_FIELD_NAMES[index]} step must be positive")
            for token in base.split("-") if base not in ("*", "?") else ():
                _cron_value(token, index)
        if not _CRON_FIELDS[index].fullmatch(field):
            raise ValueError(f"cron {_CRON_FIELD_NAMES[index]} field {field!r} is not valid")
    return expression


def object_name_problem(name: object) -> str | None:
    """Why `name` cannot name a FineTuneJob or ModelDeployment; None when it can."""
    if not isinstance(name, str) or not name:
        return f"expected a name, got {name!r}"
    if len(name) > OBJECT_NAME_MAX_LENGTH:
        return f"{name!r} is longer than {OBJECT_NAME_MAX_LENGTH} characters"
    if not re.fullmatch(OBJECT_NAME_PATTERN, name):
        return (
            f"{name!r} is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, "
            "no dots), which KubeRay requires of the objects named after it"
        )
    return None


def check_object_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Object metadata whose name (when present) is one KubeRay and labels accept."""
    if "name" in metadata:
        problem = object_name_problem(metadata["name"])
        if problem is not None:
            raise ValueError(f"name: {problem}")
    return metadata


class SecretReference(ContractModel):
    """A Secret in the same namespace. Its values are never copied into other objects."""

    name: KubernetesName = Field(description="Name of the Secret.")


class SecretKeyReference(ContractModel):
    """One key of a Secret in the same namespace."""

    name: KubernetesName = Field(description="Name of the Secret.")
    key: str = Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret.",
    )


HUB_ENDPOINT_PATTERN = r"^https?://[^\s/]+(/.*)?$"
HUGGING_FACE_RULES = (
    cel_rule(
        "!(has(self.offline) && self.offline && has(self.endpoint))",
        "offline never contacts a hub: set endpoint or offline, not both",
        ".endpoint",
    ),
)


class HuggingFaceAccess(ContractModel):
    """How the pods reach the Hugging Face Hub for hf:// models and datasets: directly, through a mirror or not."""

    model_config = with_cel(*HUGGING_FACE_RULES)

    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        pattern=HUB_ENDPOINT_PATTERN,
        description=(
            "Base URL of a Hugging Face Hub mirror or proxy the pods download hf:// models and datasets from "
            "(HF_ENDPOINT), "
            "e.g. http://hf-mirror.models.svc; https://huggingface.co when omitted."
        ),
    )
    offline: bool = Field(
        default=False,
        description=(
            "Never contact a hub (HF_HUB_OFFLINE=1): hf:// models and datasets load only from the Hugging Face "
            "cache that the runtime image carries (its HF_HUB_CACHE). One missing there fails the run as "
            "ModelUnavailable. "
            "false leaves the image's own HF_HUB_OFFLINE as it is."
        ),
    )

    @model_validator(mode="after")
    def _endpoint_or_offline(self) -> HuggingFaceAccess:
        if self.offline and self.endpoint is not None:
            raise ValueError("offline never contacts a hub: set endpoint or offline, not both")
        return self


class StorageAccess(ContractModel):
    """Credentials and endpoints for object storage (s3://) and model hubs (hf://)."""

    credentials_secret: SecretReference | None = Field(
        default=None,
        description=(
            "Secret whose keys are exposed as environment variables of the run, e.g. "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, HF_TOKEN. Referenced, never copied."
        ),
    )
    s3_endpoint: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="Endpoint URL of an S3-compatible store (e.g. MinIO); AWS when omitted.",
    )
    s3_region: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9-]+$", description="Region of the S3 bucket."
    )
    hugging_face: HuggingFaceAccess | None = Field(
        default=None,
        description=(
            "Access to the Hugging Face Hub for hf:// models and datasets: a mirror (endpoint) or none at all "
            "(offline), as "
            "air-gapped clusters need. The hub's token, if any, comes from credentialsSecret (HF_TOKEN)."
        ),
    )


class Toleration(ContractModel):
    """Lets pods schedule onto nodes with a matching taint (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all effects when empty."
    )
    toleration_seconds: int | None = Field(default=None, ge=0, description="How long a NoExecute taint is tolerated.")


class NodePlacement(ContractModel):
    """Which nodes pods may run on: node selection, tolerations and affinity."""

    node_selector: dict[str, LabelValue] | None = Field(
        default=None,
        max_length=64,
        description="Node labels the pods require (label keys to values).",
        json_schema_extra=LABEL_KEYS_SCHEMA,
    )
    tolerations: list[Toleration] | None = Field(default=None, max_length=64, description="Tolerated node taints.")
    affinity: Affinity | None = Field(
        default=None, description="Node affinity, pod affinity and pod anti-affinity (core/v1 Affinity)."
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_label_keys(value)


CPU_LIMIT_DESCRIPTION = (
    "CPU limit, at least the request; the request when omitted (a Guaranteed pod). A higher limit lets the"
    " pod use idle CPU beyond what it reserves, e.g. Ray's control processes as they start on a small node."
)


class HeadResources(NodePlacement):
    """The Ray head pod, which runs the driver and Ray's control processes: no training, no GPU.

    Its placement is its own: the workers' node selector, tolerations and GPU type do not apply to it.
    """

    model_config = with_cel(cpu_limit_rule("cpu", "cpuLimit"))

    cpu: Quantity = Field(default="1", description="CPU request of the head (and its limit, unless cpuLimit).")
    cpu_limit: Quantity | None = Field(default=None, description=CPU_LIMIT_DESCRIPTION)
    memory: Quantity = Field(default="4Gi", description="Memory request and limit of the head.")
    ephemeral_storage: Quantity = Field(
        default="10Gi", description="Ephemeral storage requested for the head (caches, /tmp, Ray's logs)."
    )

    @model_validator(mode="after")
    def _limit_covers_request(self) -> HeadResources:
        check_cpu_limit(self.cpu, self.cpu_limit, "cpuLimit", "cpu")
        return self


# Every model that extends Placement and sets its own CEL rules adds these.
PLACEMENT_RULES = (
    cel_rule("!has(self.rayVersion) || has(self.image)", "rayVersion describes image: set image too", ".rayVersion"),
)


class Placement(NodePlacement):
    """Where pods may run (node selection, tolerations, affinity, priority) and which image they run."""

    model_config = with_cel(*PLACEMENT_RULES)

    gpu_type: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="GPU model, matched against the node label nvidia.com/gpu.product (e.g. NVIDIA-H100-80GB-HBM3).",
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=SUBDOMAIN_PATTERN, description="PriorityClass of the pods."
    )
    image: str | None = Field(
        default=None,
        max_length=1024,
        pattern=IMAGE_PATTERN,
        description="Container image with kubetune's runtime; the operator's default when omitted.",
    )
    ray_version: str | None = Field(
        default=None,
        max_length=32,
        pattern=RAY_VERSION_PATTERN,
        description=(
            "Ray version inside `image` (KubeRay's rayVersion); the operator's runtime Ray version when omitted. "
            "Set it when the image carries another Ray than the operator's runtime image."
        ),
    )
    image_pull_secrets: list[KubernetesName] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Secrets in the namespace with the credentials to pull the image, besides the operator's default ones "
            "(the pods run under their own ServiceAccount, so the namespace default's pull secrets do not apply)."
        ),
    )

    @model_validator(mode="after")
    def _version_with_image(self) -> Placement:
        if self.ray_version is not None and self.image is None:
            raise ValueError("rayVersion describes image: set image too")
        return self


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(WireModel):
    """The state of one aspect of the object, as in metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: Message = Field(default="", description="Human-readable details.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for."
    )
    last_transition_time: datetime | None = Field(default=None, description="When status last changed.")
