"""The platform actions a verdict can ask for, in rising severity, and what each is worth."""

from __future__ import annotations

# In rising severity. `hold`: keep the content back until a person decides (a result awaiting review).
ACTIONS = ("allow", "hold", "flag", "delete", "timeout", "escalate")
# The verdict's `severity` field for each action.
SEVERITY = {"allow": "none", "hold": "low", "flag": "low", "delete": "medium", "timeout": "high", "escalate": "critical"}


def rank(action: str) -> int:
    """The action's place in ACTIONS; an unknown action ranks with `allow`."""
    return ACTIONS.index(action) if action in ACTIONS else 0


def most_severe(actions: list[str]) -> str:
    if len(actions) == 1:
        return actions[0]
    return max(actions, key=rank, default="allow")
