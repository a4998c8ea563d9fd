"""Pod affinity and anti-affinity and node affinity, as core/v1 Affinity defines them.

Typed rather than passed through: a wrong shape is refused at admission (or marked InvalidSpec with
the field named) instead of failing every creation of the Ray pods' owner with 422. The operator's
settings may also bound the node labels that node affinity names (see policy.py).
Only pydantic, the standard library and the run contract may be imported here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from kubetune.runtime.contract.common import ContractModel, cel_rule, with_cel
from pydantic import Field, field_validator, model_validator
from pydantic.config import JsonDict

# Label keys and values: prefix/name, 63-character name segments; values empty or 63 characters.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_KEY_MAX_LENGTH = 317  # a 253-character prefix, '/', a 63-character name
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_VALUE_MAX_LENGTH = 63
MAX_TERMS = 16
MAX_VALUES = 64

LabelKey = Annotated[str, Field(min_length=1, max_length=LABEL_KEY_MAX_LENGTH, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=LABEL_VALUE_MAX_LENGTH, pattern=LABEL_VALUE_PATTERN)]
NamespaceName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]

# The keys of a label map, checked at admission (a CRD schema cannot constrain property names) and here.
LABEL_KEYS_SCHEMA: JsonDict = {
    "x-kubernetes-validations": [
        {
            "rule": f"self.all(k, k.matches('{LABEL_KEY_PATTERN.replace(chr(92) + '.', '[.]')}'))",
            "message": "every key must be a valid label key (prefix/name)",
        }
    ]
}


def check_label_keys(labels: dict[str, str] | None) -> dict[str, str] | None:
    """`labels` when each key is a valid label key (the mirror of LABEL_KEYS_SCHEMA)."""
    for key in labels or {}:
        if len(key) > LABEL_KEY_MAX_LENGTH or not re.fullmatch(LABEL_KEY_PATTERN, key):
            raise ValueError(f"{key!r} is not a valid label key")
    return labels


SET_OPERATORS = ("In", "NotIn")
PRESENCE_OPERATORS = ("Exists", "DoesNotExist")
NUMBER_OPERATORS = ("Gt", "Lt")
VALUES_NEEDED = "values must be non-empty with In and NotIn"
VALUES_FORBIDDEN = "values must be empty with Exists and DoesNotExist"
ONE_INTEGER = "values must be a single integer with Gt and Lt"


def _listed(operators: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{operator}'" for operator in operators) + "]"


def _operator_rules(operators: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """CEL mirrors of `_check_values`, for the operators a requirement of this kind takes."""
    rules = [
        cel_rule(
            f"!(self.operator in {_listed(SET_OPERATORS)}) || (has(self.values) && size(self.values) > 0)",
            VALUES_NEEDED,
            ".values",
        ),
        cel_rule(
            f"!(self.operator in {_listed(PRESENCE_OPERATORS)}) || !has(self.values) || size(self.values) == 0",
            VALUES_FORBIDDEN,
            ".values",
        ),
    ]
    if NUMBER_OPERATORS[0] in operators:
        rules.append(
            cel_rule(
                f"!(self.operator in {_listed(NUMBER_OPERATORS)})"
                " || (has(self.values) && size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$'))",
                ONE_INTEGER,
                ".values",
            )
        )
    return tuple(rules)


def _check_values(operator: str, values: list[str] | None) -> None:
    count = len(values or [])
    if operator in SET_OPERATORS and count == 0:
        raise ValueError(VALUES_NEEDED)
    if operator in PRESENCE_OPERATORS and count:
        raise ValueError(VALUES_FORBIDDEN)
    if operator in NUMBER_OPERATORS and (count != 1 or not re.fullmatch(r"-?[0-9]+", (values or [""])[0])):
        raise ValueError(ONE_INTEGER)


class NodeSelectorRequirement(ContractModel):
    """A node label (or field) and the values it may or may not take."""

    model_config = with_cel(*_operator_rules((*SET_OPERATORS, *PRESENCE_OPERATORS, *NUMBER_OPERATORS)))

    key: LabelKey = Field(description="The node label key (or field name, in matchFields) the selector applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="How the key relates to the values: In, NotIn, Exists, DoesNotExist, Gt or Lt."
    )
    values: list[LabelValue] | None = Field(
        default=None,
        max_length=MAX_VALUES,
        description="Values for In and NotIn (at least one), a single integer for Gt and Lt, none otherwise.",
    )

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> NodeSelectorRequirement:
        _check_values(self.operator, self.values)
        return self


class NodeSelectorTerm(ContractModel):
    """Requirements a node must all meet (ANDed)."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        default=None, max_length=MAX_TERMS, description="Requirements on the node's labels."
    )
    match_fields: list[NodeSelectorRequirement] | None = Field(
        default=None, max_length=MAX_TERMS, description="Requirements on the node's fields (metadata.name)."
    )


class NodeSelector(ContractModel):
    """Node selector terms, ORed: a node that meets any of them matches."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=MAX_TERMS, description="The terms; a node must meet at least one."
    )


class PreferredSchedulingTerm(ContractModel):
    """A node selector term the scheduler prefers, with its weight."""

    weight: int = Field(ge=1, le=100, description="Weight of the preference, 1 to 100.")
    preference: NodeSelectorTerm = Field(description="The nodes preferred.")


class NodeAffinity(ContractModel):
    """Which nodes the pods must, or should, run on, by their labels."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        default=None, description="Nodes the pods must run on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        default=None, max_length=MAX_TERMS, description="Nodes the scheduler prefers, by weight."
    )


class LabelSelectorRequirement(ContractModel):
    """A pod label and the values it may or may not take."""

    model_config = with_cel(*_operator_rules((*SET_OPERATORS, *PRESENCE_OPERATORS)))

    key: LabelKey = Field(description="The label key the selector applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[LabelValue] | None = Field(
        default=None, max_length=MAX_VALUES, description="Values for In and NotIn (at least one), none otherwise."
    )

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> LabelSelectorRequirement:
        _check_values(self.operator, self.values)
        return self


class LabelSelector(ContractModel):
    """Pods (or namespaces) by their labels: all of matchLabels and matchExpressions must hold."""

    match_labels: dict[str, LabelValue] | None = Field(
        default=None,
        max_length=MAX_VALUES,
        description="Labels that must have these values.",
        json_schema_extra=LABEL_KEYS_SCHEMA,
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=MAX_TERMS, description="Requirements on the labels."
    )

    @field_validator("match_labels")
    @classmethod
    def _label_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_label_keys(value)


class PodAffinityTerm(ContractModel):
    """Pods that run (or must not run) in the same topology domain (node, zone, ...) as these pods."""

    label_selector: LabelSelector | None = Field(default=None, description="The other pods, by their labels.")
    namespace_selector: LabelSelector | None = Field(
        default=None, description="Namespaces of the other pods, by their labels; this namespace when omitted."
    )
    namespaces: list[NamespaceName] | None = Field(
        default=None, max_length=MAX_VALUES, description="Namespaces of the other pods, by name."
    )
    topology_key: LabelKey = Field(
        description=(
            "Node label whose value defines the domain, e.g. kubernetes.io/hostname or topology.kubernetes.io/zone."
        )
    )
    match_label_keys: list[LabelKey] | None = Field(
        default=None,
        max_length=MAX_VALUES,
        description="Label keys whose values, taken from this pod, are added to labelSelector with In.",
    )
    mismatch_label_keys: list[LabelKey] | None = Field(
        default=None,
        max_length=MAX_VALUES,
        description="Label keys whose values, taken from this pod, are added to labelSelector with NotIn.",
    )


class WeightedPodAffinityTerm(ContractModel):
    """A pod affinity term the scheduler prefers, with its weight."""

    weight: int = Field(ge=1, le=100, description="Weight of the preference, 1 to 100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(ContractModel):
    """Pods these pods must, or should, run near (or, as anti-affinity, away from)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=MAX_TERMS, description="Terms that must hold."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        default=None, max_length=MAX_TERMS, description="Terms the scheduler prefers, by weight."
    )


class Affinity(ContractModel):
    """Node affinity, pod affinity and pod anti-affinity of the pods (core/v1 Affinity)."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Nodes the pods must or should run on.")
    pod_affinity: PodAffinity | None = Field(default=None, description="Pods these pods must or should run near.")
    pod_anti_affinity: PodAffinity | None = Field(
        default=None, description="Pods these pods must or should run away from."
    )

    def node_requirements(self) -> list[NodeSelectorRequirement]:
        """Every requirement on node labels and fields, required and preferred."""
        node = self.node_affinity
        if node is None:
            return []
        required = node.required_during_scheduling_ignored_during_execution
        terms = list(required.node_selector_terms) if required else []
        terms += [preferred.preference for preferred in node.preferred_during_scheduling_ignored_during_execution or []]
        return [item for term in terms for item in [*(term.match_expressions or []), *(term.match_fields or [])]]
