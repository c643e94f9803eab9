"""The review team's records through the review package's public interfaces: which overturn
counts and what it replaces, what its corrected verdict and an appeal's supersede, notes as
non-decisions, and the audit rows they make."""

from __future__ import annotations

from datetime import timedelta

import pytest

from consumer.events import ErrorType, ReviewDecision, ReviewNote, ReviewReason, SourceRecord, Verdict
from consumer.review.audit import audit_rows
from consumer.review.decisions import RejectedInput, corrected_verdict, parse_record
from consumer.review.state import ReviewState
from tests.unit.review.test_review import POLICY, item_and_decision


def overturn(item, violation: bool, minutes: int, reviewer: str = "lead-1", note: str = "a threat") -> ReviewDecision:
    return ReviewDecision(kind="overturn", review_id=item.review_id, violation=violation, note=note,
                          reviewer_id=reviewer, decided_at=item.created_at + timedelta(minutes=minutes))  # fmt: skip


def note(item, kind: str, minutes: int, text: str = "unsure") -> ReviewNote:
    return ReviewNote(kind=kind, review_id=item.review_id, text=text, reviewer_id="mod-1",  # type: ignore[arg-type]
                      written_at=item.created_at + timedelta(minutes=minutes))  # fmt: skip


def test_an_overturn_counts_on_a_decided_review_when_it_changes_the_answer_and_knows_what_it_replaced():
    item, first = item_and_decision(False)
    state = ReviewState()
    state.add_item(item)
    assert state.add_decision(overturn(item, True, 1), ("d", 0, 0)) is None  # nothing to overturn yet
    assert state.add_decision(first, ("d", 0, 1)) is not None
    assert state.add_decision(overturn(item, False, 6), ("d", 0, 2)) is None  # the answer in force already
    up = overturn(item, True, 7)
    decided = state.add_decision(up, ("d", 0, 3))
    assert decided is not None and decided.decision == up and decided.replaces.at == ("d", 0, 1)
    assert state.add_decision(up, ("d", 0, 3)) is None  # the same record read twice
    back = state.add_decision(overturn(item, False, 8, "admin-1"), ("d", 0, 4))
    assert back is not None and back.replaces.at == ("d", 0, 3)
    assert state.replaced(item.review_id, ("d", 0, 4)).at == ("d", 0, 3)
    assert state.replaced(item.review_id, ("d", 0, 2)) is None
    assert state.standing(item.review_id).at == ("d", 0, 4) and state.applied(item.review_id).decision == first
    assert state.decisions == 1 and state.overturns == 2  # agreement counts first decisions only
    assert sum(state.agreement.values()) == 1


def test_an_overturns_corrected_verdict_supersedes_the_corrected_verdict_of_the_answer_it_replaced():
    item, first = item_and_decision(False)
    state = ReviewState()
    state.add_item(item)
    state.add_decision(first, ("decisions", 2, 40))
    decided = state.add_decision(overturn(item, True, 9), ("decisions", 2, 41))
    verdict = Verdict.model_validate(corrected_verdict(item, decided.decision, lambda: {POLICY.id: POLICY},
                                                       replaces=decided.replaces))  # fmt: skip
    assert verdict.supersedes.decided_by == "human"
    assert verdict.supersedes.decision == SourceRecord(topic="decisions", partition=2, offset=40)
    assert verdict.results[0].violation is True and verdict.results[0].rationale == "a threat"
    assert verdict.note.startswith("overturned by lead-1") and verdict.appeal is None
    machine = Verdict.model_validate(corrected_verdict(item, first, lambda: {POLICY.id: POLICY}))
    assert machine.supersedes.decided_by == "machine" and machine.supersedes.decision is None


def test_an_appeals_corrected_verdict_names_the_appealed_verdict_and_says_upheld_or_overturned():
    item, safe = item_and_decision(False)
    item = item.model_copy(update={"reason": ReviewReason.APPEAL,
                                   "verdict": SourceRecord(topic="verdicts", partition=1, offset=12)})  # fmt: skip
    overturned = Verdict.model_validate(corrected_verdict(item, safe, lambda: {POLICY.id: POLICY}))
    assert overturned.appeal == "overturned"  # the machine said violation (an undecided guess), the person safe
    assert overturned.supersedes.verdict == SourceRecord(topic="verdicts", partition=1, offset=12)
    _, violation = item_and_decision(True)
    upheld = Verdict.model_validate(corrected_verdict(item, violation, lambda: {POLICY.id: POLICY}))
    assert upheld.appeal == "upheld" and upheld.decided_by == "human"


def test_notes_are_no_decisions_and_an_overturn_must_say_why():
    item, _ = item_and_decision(False)
    parsed = parse_record(note(item, "escalation", 1).model_dump_json().encode())
    assert isinstance(parsed, ReviewNote) and parsed.kind == "escalation"
    state = ReviewState()
    state.add_item(item)
    assert state.add_record(parsed, ("d", 0, 0)) is None
    state.add_record(parsed, ("d", 0, 0))  # read again: kept once
    state.add_record(note(item, "comment", 2), ("d", 0, 1))
    assert [n.note.kind for n in state.notes(item.review_id)] == ["escalation", "comment"]
    assert state.escalation(item.review_id).at == ("d", 0, 0)
    assert state.applied(item.review_id) is None and len(state.pending()) == 1 and state.decisions == 0
    with pytest.raises(RejectedInput) as why:
        parse_record(b'{"kind": "overturn", "review_id": "rv-1", "violation": true, "reviewer_id": "l",'
                     b' "decided_at": "2026-12-01T10:00:00Z"}')  # fmt: skip
    assert why.value.error_type is ErrorType.SCHEMA_VIOLATION and "reason" in str(why.value)
    assert isinstance(parse_record(b'{"review_id": "rv-1", "violation": true, "reviewer_id": "m",'
                                   b' "decided_at": "2026-12-01T10:00:00Z"}'), ReviewDecision)  # fmt: skip


def test_audit_rows_say_who_when_what_the_machine_said_and_what_stood_before():
    item, first = item_and_decision(False)
    state = ReviewState()
    state.add_item(item)
    state.add_record(note(item, "comment", 1, "looks like a joke"), ("d", 0, 0))
    state.add_record(first, ("d", 0, 1))
    state.add_record(overturn(item, True, 9), ("d", 0, 2))
    rows = audit_rows(state)
    assert [(r["action"], r["reviewer_id"]) for r in rows] == [("comment", "mod-1"), ("decision", "mod-1"),
                                                              ("overturn", "lead-1")]  # fmt: skip
    assert all(r["machine_violation"] is True and r["machine_stage"] == "undecided" for r in rows)
    assert [r["before_violation"] for r in rows] == [None, True, False]
    assert [r["violation"] for r in rows] == [None, False, True] and rows[2]["note"] == "a threat"
    assert rows[2]["record"] == "d[0]@2" and rows[0]["note"] == "looks like a joke"
