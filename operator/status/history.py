"""A FineTuneJob's run history within its budgets: how many finished runs, and how many bytes. Pure."""

from __future__ import annotations

import json

from kubetune.operator.api.finetunejob import ACTIVE_PHASES, RunRecord

# The whole status as JSON stays under this many bytes (etcd holds at most 1.5 MiB per object, spec
# included): older runs are summarised, then forgotten, to fit; never the promoted or an active one.
STATUS_MAX_BYTES = 256 * 1024


# What the run history may take of it; conditions and the other fields fit in the rest.
RUNS_MAX_BYTES = STATUS_MAX_BYTES - 32 * 1024


def record_bytes(record: RunRecord) -> int:
    """Size of a run record in the status, as JSON."""
    return len(json.dumps(record.to_wire()))  # with json.dumps' spaces: a little over what is sent


def summarised(record: RunRecord) -> RunRecord:
    """What is kept of an older run when the history is over its budget: the outcome, not the details."""
    return record.model_copy(
        update={"progress": None, "ray_job": None, "best_hyperparameters": None, "decisions": None}
    )


def fit_history(records: list[RunRecord], budget: int = RUNS_MAX_BYTES) -> tuple[list[RunRecord], list[RunRecord]]:
    """Keep the run history under `budget` bytes of JSON; return (kept, dropped).

    Oldest first, finished runs are summarised, then forgotten, until it fits. The promoted
    run and active runs are kept whole: what they hold is bounded field by field.
    """
    promoted = next((r.number for r in reversed(records) if r.gate is not None and r.gate.passed), None)
    protected = {r.number for r in records if r.phase in ACTIVE_PHASES or r.number == promoted}
    kept = list(records)
    sizes = [record_bytes(r) for r in kept]
    total = sum(sizes)
    for index, record in enumerate(kept):
        if total <= budget:
            return kept, []
        if record.number not in protected:
            kept[index] = summarised(record)
            size = record_bytes(kept[index])
            total, sizes[index] = total + size - sizes[index], size
    dropped: set[int] = set()
    for index, record in enumerate(kept):
        if total <= budget:
            break
        if record.number not in protected:
            dropped.add(record.number)
            total -= sizes[index]
    return [r for r in kept if r.number not in dropped], [r for r in records if r.number in dropped]


def trim_history(records: list[RunRecord], limit: int) -> tuple[list[RunRecord], list[RunRecord]]:
    """Keep every active run and the newest `limit` finished ones; return (kept, dropped)."""
    finished = [r for r in records if r.phase not in ACTIVE_PHASES]
    dropped = {r.number for r in finished[:-limit]} if len(finished) > limit else set()
    return [r for r in records if r.number not in dropped], [r for r in records if r.number in dropped]
