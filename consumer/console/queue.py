"""What the console shows: queues of open reviews, the policy beside an item, the dashboard's figures.

Read-only views over `ReviewState` and the policies in force; the app renders them. An item
escalated to a lead (a `ReviewNote` of kind escalation) leaves the moderators' queues for the
lead queue until it is decided.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from consumer.events import ReviewItem
from consumer.policy import Policy
from consumer.policy.sections import sections
from consumer.review.state import ReviewState

# "- H1: Threats of violence ..." in a policy's VIOLATES and SAFE sections
_RULE = re.compile(r"^\s*[-*]\s*([A-Za-z][A-Za-z0-9_.-]{0,15})\s*:\s*(.+)$")


@dataclass(frozen=True)
class Queue:
    """Open reviews of one policy for one reason."""

    policy_id: str  # the policy's key: its id, or community/id for a community's own
    reason: str
    open: int
    oldest: datetime | None
    title: str | None = None
    escalated: bool = False  # the lead queue's

    @property
    def key(self) -> tuple[str, str]:
        return self.policy_id, self.reason


def queues(state: ReviewState, policies: dict[str, Policy], escalated: bool = False) -> list[Queue]:
    """Every (policy, reason) with open reviews, the one waiting longest first; `escalated`: the lead
    queue's, else the moderators'."""
    oldest: dict[tuple[str, str], datetime] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for item in _pending(state, escalated):
        key = (item.policy_key, item.reason.value)
        counts[key] += 1
        if key not in oldest or item.created_at < oldest[key]:
            oldest[key] = item.created_at
    found = [Queue(p, r, n, oldest.get((p, r)), getattr(policies.get(p), "title", None), escalated)
             for (p, r), n in counts.items()]  # fmt: skip
    return sorted(found, key=lambda q: (q.oldest or datetime.max.replace(tzinfo=timezone.utc), q.policy_id, q.reason))


def in_queue(state: ReviewState, policy_id: str | None, reason: str | None,
             escalated: bool = False) -> list[ReviewItem]:  # fmt: skip
    """The open reviews of a queue (either filter may be None: all), oldest first; `escalated`: of
    the lead queue, else of the moderators'."""
    items = [i for i in _pending(state, escalated)
             if (policy_id is None or i.policy_key == policy_id) and (reason is None or i.reason.value == reason)]  # fmt: skip
    return sorted(items, key=lambda i: i.created_at)


def _pending(state: ReviewState, escalated: bool) -> list[ReviewItem]:
    return [i for i in state.pending() if (state.escalation(i.review_id) is not None) == escalated]


@dataclass(frozen=True)
class Rule:
    id: str
    text: str
    section: str


@dataclass
class PolicyView:
    """The policy beside an item: its title, the rules the machine cited, the section that applies."""

    policy_id: str
    title: str | None
    version: str | None
    sensitive: bool
    categories: dict[str, str]
    cited: list[Rule]
    section_name: str | None
    section: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)  # every rule of VIOLATES, for the decision form


def policy_view(policy: Policy | None, item: ReviewItem) -> PolicyView:
    """What a reviewer reads of the policy: the machine's rule ids with their text, and the section
    they come from (VIOLATES when the machine cited none: what the item is checked against)."""
    if policy is None:
        return PolicyView(item.policy_id, None, None, False, {}, [], None)
    titled = _by_title(policy.text)
    rules = [Rule(m.group(1), m.group(2).strip(), name) for name, lines in titled.items() for line in lines
             if (m := _RULE.match(line))]  # fmt: skip
    by_id = {r.id.upper(): r for r in rules}
    cited = [by_id[r.upper()] for r in item.machine.rule_ids if r.upper() in by_id]
    violates = next((n for n in titled if n.upper().startswith("VIOLATES")), None)
    name = cited[0].section if cited else violates
    return PolicyView(
        policy_id=policy.id,
        title=policy.title,
        version=policy.version,
        sensitive=policy.sensitive,
        categories=dict(policy.categories),
        cited=cited,
        section_name=name,
        section=[line for line in titled.get(name, []) if line.strip()] if name else [],
        rules=[r for r in rules if r.section == violates],
    )


def _by_title(text: str) -> dict[str, list[str]]:
    """The policy's `##` sections by title, as a reviewer reads them: a `#` heading inside one
    (the document's title, say) is shown as one of its lines."""
    titled: dict[str, list[str]] = {}
    current: list[str] | None = None
    for section in sections(text):
        if section.level >= 2:
            current = titled.setdefault(section.title, [])
        elif current is not None:
            current.append(section.heading)
        if current is not None:
            current.extend(line for _, line in section.body)
    return titled


def author_decided_violations(state: ReviewState, item: ReviewItem) -> int:
    """How many of this author's reviewed items (same community) reviewers found violations."""
    if item.author_id is None:
        return 0
    return sum(1 for d in state.decided_items()
               if d.decision.violation and d.item.author_id == item.author_id
               and d.item.community_id == item.community_id)  # fmt: skip


# -- the dashboard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    policy_id: str
    stage: str
    decisions: int
    agreed: int

    @property
    def percent(self) -> int:
        return round(100 * self.agreed / self.decisions) if self.decisions else 0


@dataclass
class Dashboard:
    queues: list[Queue]
    hours: list[tuple[datetime, int]]  # the last 24 hours, oldest first: (hour start, decisions)
    agreement: list[Agreement]
    decisions: int
    open: int

    @property
    def busiest_hour(self) -> int:
        return max((n for _, n in self.hours), default=0)


def dashboard(state: ReviewState, policies: dict[str, Policy], now: datetime | None = None) -> Dashboard:
    now = now or datetime.now(timezone.utc)
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    starts = [this_hour - timedelta(hours=h) for h in range(23, -1, -1)]
    per_hour: Counter[datetime] = Counter()
    for decided in state.decided_items():
        at = decided.decision.decided_at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        if starts[0] <= at <= this_hour:
            per_hour[at] += 1
    agreed: Counter[tuple[str, str]] = Counter()
    total: Counter[tuple[str, str]] = Counter()
    for (policy_id, stage, ok), count in list(state.agreement.items()):
        total[(policy_id, stage)] += count
        if ok:
            agreed[(policy_id, stage)] += count
    qs = queues(state, policies) + queues(state, policies, escalated=True)
    return Dashboard(
        queues=qs,
        hours=[(start, per_hour[start]) for start in starts],
        agreement=[Agreement(p, s, n, agreed[(p, s)]) for (p, s), n in sorted(total.items())],
        decisions=state.decisions,
        open=sum(q.open for q in qs),
    )
