"""Roles: what each kind of person may do in the console, in one table.

`review.console.reviewers[*].role` names a reviewer's role (moderator by default; with `identity:
header` and no `reviewers` list, everyone the proxy names is a moderator). The app asks `allows`
on every route before it reads a form or touches a lease, so a page a role may not use answers
403 and writes nothing, whatever the browser sends.

| role | decide (queues, appeals, escalate, comment) | lead (escalations, overturn) | audit |
| --- | --- | --- | --- |
| moderator | yes | no | no |
| lead | yes | yes | yes |
| analyst | no (nothing is leased to them) | no | yes (read-only, with the dashboard) |
| admin | yes | yes | yes |

The decisions topic itself does not know roles: the console enforces them, and the topic's ACLs
decide who else may write there (Coop's bridge, a script).
"""

from __future__ import annotations

import enum

from consumer.config.console import Role


class Can(str, enum.Enum):
    DECIDE = "decide"  # take items from the queues and the appeals queue; decide, escalate, comment
    LEAD = "lead"  # the escalation queue; overturn a decided item
    AUDIT = "audit"  # the audit trail, in the console and as CSV or JSONL


PERMISSIONS: dict[str, frozenset[Can]] = {
    "moderator": frozenset({Can.DECIDE}),
    "lead": frozenset({Can.DECIDE, Can.LEAD, Can.AUDIT}),
    "analyst": frozenset({Can.AUDIT}),
    "admin": frozenset({Can.DECIDE, Can.LEAD, Can.AUDIT}),
}


def allows(role: Role | str, what: Can) -> bool:
    return what in PERMISSIONS.get(role, frozenset())
