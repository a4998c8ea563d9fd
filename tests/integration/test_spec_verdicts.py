"""Properties over generated specs, against the real API server: the same verdict, and the intended one.

- same verdict: `kubetune validate` (its checker, called directly) and the API server's
  admission (a server-side dry run with strict field validation, as kubectl sends it)
  accept and refuse the same FineTuneJob and ModelDeployment manifests;
- intended verdict: manifests that are wrong by intent (a quantity of -2, a cron that never
  fires, remote code at a branch) are refused by both, while ones that are right by intent
  are accepted by both.

The cases and their verdicts come from the session's `spec_verdicts` fixture (spec_judging).
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from .spec_generation import SPEC_EXAMPLES, Judged, RecordProperty, SpecVerdicts, write_counts
from .spec_judging import spec_verdicts

__all__ = ["spec_verdicts"]  # a fixture, used by name


def show_verdicts(judged: Judged) -> str:
    local = "accepts" if judged.local.accepted else f"refuses: {judged.local.detail[:300]}"
    server = "admits" if judged.server.accepted else f"refuses: {judged.server.detail[:300]}"
    return f"      kubetune validate {local}\n      API server {server}"


def disagreement_report(disagreements: list[Judged]) -> str:
    """Every disagreement, grouped by direction and by the mutation that shows it alone."""
    groups: dict[tuple[str, str], list[Judged]] = defaultdict(list)
    for judged in disagreements:
        minimal = judged.minimal or judged.case
        groups[(judged.direction, " + ".join(m.label for m in minimal.mutations) or "(unchanged)")].append(judged)
    lines = [f"{len(disagreements)} manifests where kubetune validate and admission disagree:"]
    for (direction, label), members in sorted(groups.items()):
        smallest = min(members, key=lambda j: (len((j.minimal or j.case).mutations), len(j.case.describe())))
        example = (smallest.minimal or smallest.case).describe()
        lines.append(f"\n  {direction} — {label} ({len(members)} times); smallest: {example}")
        lines.append(show_verdicts(smallest))
        lines += [f"    - {member.case.describe()}" for member in members if member is not smallest]
    return "\n".join(lines)


def test_validate_and_admission_give_the_same_verdict(
    spec_verdicts: SpecVerdicts, tmp_path_factory: pytest.TempPathFactory, record_property: RecordProperty
) -> None:
    write_counts(tmp_path_factory.getbasetemp(), "same-verdict", spec_verdicts.counts(), record_property)
    assert spec_verdicts.counts()["tried"] >= SPEC_EXAMPLES // 2
    disagreements = [judged for judged in spec_verdicts.judged if not judged.agree]
    assert not disagreements, disagreement_report(disagreements)


def test_mistakes_are_refused_and_right_changes_admitted_by_both(
    spec_verdicts: SpecVerdicts, tmp_path_factory: pytest.TempPathFactory, record_property: RecordProperty
) -> None:
    checked = [judged for judged in spec_verdicts.judged if judged.case.intent != "unknown"]
    violations = [judged for judged in checked if not judged.meets_intent()]
    counts = {
        "checked": len(checked),
        "meant_invalid": sum(j.case.intent == "invalid" for j in checked),
        "meant_valid": sum(j.case.intent == "valid" for j in checked),
        "violations": len(violations),
    }
    write_counts(tmp_path_factory.getbasetemp(), "intended-verdict", counts, record_property)
    groups: dict[str, list[Judged]] = defaultdict(list)
    for judged in violations:
        deciding = [m.label for m in judged.case.mutations if m.intent == judged.case.intent] or ["(unchanged)"]
        groups[f"meant {judged.case.intent}: " + " + ".join(deciding)].append(judged)
    lines = [f"{len(violations)} manifests did not get their intended verdict:"]
    for label, members in sorted(groups.items()):
        smallest = min(members, key=lambda j: (len(j.case.mutations), len(j.case.describe())))
        lines += [f"\n  {label} ({len(members)} times); e.g. {smallest.case.describe()}", show_verdicts(smallest)]
    assert not violations, "\n".join(lines)
