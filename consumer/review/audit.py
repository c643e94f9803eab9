"""The audit trail: what people did on review items, from the topics alone.

One row per decision, overturn, escalation, comment and appeal outcome that the review and
decisions topics hold (the same `ReviewState` the loop and the console keep: no store of its
own): who, when, the item and what the machine said before, the answer in force before the
row (the machine's, or the decision an overturn replaced), the answer or note, and where the
record sits on the decisions topic. Oldest first. `review audit` writes it as CSV or JSONL;
the console shows it to leads, analysts and admins with the same two downloads.

Rows carry no content under review (a reviewer's note or reason only): the audit answers "who
decided what, when, against which machine answer", and the item itself stays on its topic.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, Literal

import orjson

from consumer.events import ReviewItem, ReviewReason
from consumer.review.state import Applied, Noted, ReviewState

COLUMNS = (
    "at", "action", "reviewer_id", "review_id", "reason", "policy_id", "policy_version", "event_id", "source",
    "machine_violation", "machine_category", "machine_stage", "machine_action", "before_violation",
    "before_category", "violation", "category", "rule_ids", "note", "record",
)  # fmt: skip
Format = Literal["csv", "jsonl"]
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): such a
# note is written with a leading apostrophe in CSV (JSONL keeps it as written).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def audit_rows(state: ReviewState) -> list[dict[str, Any]]:
    """Every person's action on the held items, oldest first."""
    rows = []
    for item, done in state.history():
        before: tuple[bool | None, str | None] = (item.machine.violation, item.machine.category)
        for entry in done:
            if isinstance(entry, Noted):
                rows.append(_note_row(item, entry))
                continue
            rows.append(_answer_row(item, entry, before))
            before = (entry.decision.violation, entry.decision.category)
    return sorted(rows, key=lambda r: datetime.fromisoformat(r["at"]).timestamp())


def _common(item: ReviewItem) -> dict[str, Any]:
    machine = item.machine
    source = item.source
    return {
        "review_id": item.review_id, "reason": item.reason.value, "policy_id": item.policy_id,
        "policy_version": item.policy_version, "event_id": item.event.event_id,
        "source": f"{source.topic}[{source.partition}]@{source.offset}",
        "machine_violation": machine.violation, "machine_category": machine.category,
        "machine_stage": machine.stage, "machine_action": machine.action,
    }  # fmt: skip


def _answer_row(item: ReviewItem, applied: Applied, before: tuple[bool | None, str | None]) -> dict[str, Any]:
    decision = applied.decision
    action = decision.kind
    if action == "decision" and item.reason == ReviewReason.APPEAL:
        action = "appeal_upheld" if decision.violation == item.machine.violation else "appeal_overturned"
    return {
        "at": decision.decided_at.isoformat(), "action": action, "reviewer_id": decision.reviewer_id,
        **_common(item), "before_violation": before[0], "before_category": before[1],
        "violation": decision.violation, "category": decision.category, "rule_ids": list(decision.rule_ids),
        "note": decision.note, "record": _where(applied.at),
    }  # fmt: skip


def _note_row(item: ReviewItem, noted: Noted) -> dict[str, Any]:
    note = noted.note
    return {
        "at": note.written_at.isoformat(), "action": note.kind, "reviewer_id": note.reviewer_id, **_common(item),
        "before_violation": None, "before_category": None, "violation": None, "category": None, "rule_ids": [],
        "note": note.text, "record": _where(noted.at),
    }  # fmt: skip


def _where(at: tuple[str, int, int]) -> str:
    return f"{at[0]}[{at[1]}]@{at[2]}"


def render(rows: Iterable[dict[str, Any]], fmt: Format) -> Iterator[bytes]:
    """The rows as CSV (a header line first) or JSONL, a line at a time."""
    if fmt == "jsonl":
        for row in rows:
            yield orjson.dumps(row) + b"\n"
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue().encode()  # the header alone when there are no rows


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(value)
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value
