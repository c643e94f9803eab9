"""The outputs as documents: what `Verdict` and `DeadLetter` (consumer.events) serialise to.

Verdicts are built as plain dicts, ready for orjson, because building and dumping the
pydantic models costs more than the rest of a cheaply decided record's handling. The
models stay the contract: `tests/unit/pipeline/test_outputs.py` checks that every document here
validates as its model and dumps back to itself, so the two cannot drift apart. Dead
letters are rare and go through their model.
"""

from __future__ import annotations

import consumer
from consumer import stages
from consumer.classify import Classification
from consumer.events import (
    SCHEMA_VERSION,
    Document,
)
from consumer.policy import Policy
from consumer.policy.actions import SEVERITY
from consumer.policy.parse import action_for


def policy_result(
    policy: Policy, outcome: Classification, latency_ms: float, actions: dict[str, str] | None = None
) -> Document:
    """One policy's decision (`PolicyResult`), its action from the policy's actions map (or
    `actions`: that map with the event's community's `baseline_actions` laid over it); an
    undecided result takes the review action (hold by default), review enabled or not: nothing
    downstream should punish on a guess."""
    if actions is None:
        actions = policy.actions
    if outcome.stage == stages.UNDECIDED:
        action = actions.get("review", "hold")
    else:
        action = action_for(actions, outcome.violation, outcome.category)
    return {
        "policy_id": policy.id,
        "policy_version": policy.version,
        "policy_community": policy.community,
        "violation": outcome.violation,
        "category": outcome.category,
        "rule_ids": list(outcome.rule_ids),
        "confidence": outcome.confidence,
        "rationale": outcome.rationale,
        "action": action,
        "reasoning": outcome.reasoning,
        "model": outcome.model,
        "stage": outcome.stage,
        "latency_ms": latency_ms,
        "review": None,
    }


def verdict(
    event_id: str,
    source: Document,
    violation: bool,
    action: str,
    results: list[Document],
    author_id: str | None,
    community_id: str | None,
    context_id: str | None,
    offender_violations: int | None,
    note: str | None,
    latency_ms: float,
) -> Document:
    """The output for one event (`Verdict`); the severity follows from the action."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "verdict",
        "event_id": event_id,
        "source": source,
        "violation": violation,
        "action": action,
        "severity": SEVERITY.get(action, "low"),
        "results": results,
        "author_id": author_id,
        "community_id": community_id,
        "context_id": context_id,
        "offender_violations": offender_violations,
        "note": note,
        "latency_ms": latency_ms,
        "consumer_version": consumer.__version__,
        "replay": None,
        "truncated": None,
        "decided_by": "machine",
        "supersedes": None,
        "appeal": None,
    }
