"""A policy file: Markdown with YAML front matter, parsed into a `Policy`.

A policy's version is the hash of its file's bytes, so every verdict names exactly the text
that produced it.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from consumer.events import policy_key
from consumer.policy.actions import ACTIONS
from consumer.policy.exceptions import PolicyError

ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS = ("low", "medium", "high")
OUTPUT_TIERS = ("binary", "category", "rich")  # bare 0/1; + policy_category; + rule_ids, confidence, rationale
# Every front-matter key a policy may have: a misspelled one would otherwise change what is
# moderated in silence (`pattern:` leaves the keyword classifier with no patterns).
FRONT_MATTER_KEYS = (
    "id", "title", "sensitive", "reasoning_effort", "output", "categories", "actions", "patterns", "community",
    "shadow_of", "target_precision", "baseline_actions", "offender_thresholds",
)  # fmt: skip
# libyaml's loader where PyYAML was built with it: a tenth of the pure-Python one's time, which
# counts when a thousand communities' policies load at start.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with libyaml when available (the same safe subset of YAML)."""
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader, C or Python


@dataclass(frozen=True)
class Policy:
    id: str
    version: str
    text: str
    title: str | None = None  # shown to reviewers (the review console)
    sensitive: bool = False  # reviewers see its content only after a click (the review console)
    reasoning_effort: ReasoningEffort = "low"
    output: str = "rich"
    categories: dict[str, str] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)
    patterns: tuple[str, ...] = ()
    path: Path | None = None
    # A community's own policy applies to that community's events only (`community_id`), beside
    # the platform's policies (community None); two communities may use one id.
    community: str | None = None
    # A candidate version: runs beside the live policy of this id on a sample of traffic and
    # never acts (shadow results only); `policy promote` makes it live.
    shadow_of: str | None = None
    # The cascade's target precision for this policy (0 < x < 1); None: the configured one.
    target_precision: float | None = None
    # A community policy's overrides for its community's events: platform policy id -> its
    # `actions` entries replaced (category, violation, safe or review -> action) ...
    baseline_actions: dict[str, dict[str, str]] = field(default_factory=dict)
    # ... and the repeat-offender thresholds, (violations, action) by rising count, replacing
    # `chat.offender_thresholds`; None: the configured ones.
    offender_thresholds: tuple[tuple[int, str], ...] | None = None

    @functools.cached_property
    def key(self) -> str:
        """Unique among the policies in force: the id, scoped by the community that owns it."""
        return policy_key(self.id, self.community)

    @functools.cached_property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def action_for(self, violation: bool, category: str | None) -> str:
        """The platform action for a result: by category, else by `violation`/`safe`."""
        return action_for(self.actions, violation, category)

    @property
    def review_action(self) -> str:
        """The action for a result a person must decide first (`actions: {review: ...}`): hold by default."""
        return self.actions.get("review", "hold")


def action_for(actions: Mapping[str, str], violation: bool, category: str | None) -> str:
    """The action an `actions` map gives a result: by category, else by `violation`/`safe`."""
    if category and category in actions:
        return actions[category]
    return actions.get("violation" if violation else "safe", "flag" if violation else "allow")


def policy_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def parse_policy(data: bytes, path: Path | None = None) -> Policy:
    """Parse a policy file's bytes; raises PolicyError naming the file and line."""
    return parse_with_front_matter(data, path)[0]


def parse_with_front_matter(data: bytes, path: Path | None = None) -> tuple[Policy, dict[str, Any]]:
    """`parse_policy`, with the front matter as YAML read it (for `validate`: read once)."""
    where = str(path) if path else "<policy>"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{where}:1: not UTF-8 ({exc.reason})") from None
    if not text.startswith("---"):
        raise PolicyError(f"{where}:1: missing YAML front matter (a first line of ---)")
    end = text.find("\n---", 3)
    if end < 0:
        raise PolicyError(f"{where}:1: front matter is not closed by a line of ---")
    try:
        meta = load_yaml(text[3:end]) or {}
    except yaml.YAMLError as exc:
        # The YAML starts right after the opening ---, so its line 0 is the file's line 1; an
        # unclosed bracket or quote is where it opened (context), not where parsing gave up.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 2
        problem = getattr(exc, "problem", None)
        why = f" ({problem})" if problem else ""
        raise PolicyError(f"{where}:{line}: front matter is not valid YAML{why}") from None
    if not isinstance(meta, dict):
        raise PolicyError(f"{where}:2: front matter must be a mapping")
    for key in meta:
        if str(key) not in FRONT_MATTER_KEYS:
            raise PolicyError(f"{where}:{_meta_line(text, str(key))}: {unknown_key_message(str(key))}")
    body = text[end + 4 :].lstrip("\n").rstrip() + "\n"

    def need_str(key: str, default: str | None = None) -> str:
        value = meta.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise PolicyError(f"{where}:{_meta_line(text, key)}: `{key}` must be a non-empty string")
        return value.strip()

    policy_id = need_str("id")
    effort = need_str("reasoning_effort", "low")
    if effort not in REASONING_EFFORTS:
        raise PolicyError(
            f"{where}:{_meta_line(text, 'reasoning_effort')}: `reasoning_effort` must be one of "
            f"{', '.join(REASONING_EFFORTS)}, not {effort!r}"
        )
    categories = _str_map(meta.get("categories", {}), "categories", where, text)
    actions = _str_map(meta.get("actions", {}), "actions", where, text)
    title = meta.get("title")
    if title is not None and (not isinstance(title, str) or not title.strip()):
        raise PolicyError(f"{where}:{_meta_line(text, 'title')}: `title` must be a non-empty string")
    sensitive = meta.get("sensitive", False)
    if not isinstance(sensitive, bool):
        raise PolicyError(f"{where}:{_meta_line(text, 'sensitive')}: `sensitive` must be true or false")
    community = _optional_str(meta, "community", where, text)
    shadow_of = _optional_str(meta, "shadow_of", where, text)
    if shadow_of == policy_id:
        raise PolicyError(f"{where}:{_meta_line(text, 'shadow_of')}: `shadow_of` names the policy's own id; "
                          "a candidate has an id of its own")  # fmt: skip
    patterns = meta.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise PolicyError(f"{where}:{_meta_line(text, 'patterns')}: `patterns` must be a list of strings")
    problem = community_problem(meta, community, text)
    if problem is not None:
        raise PolicyError(f"{where}:{problem[0]}: {problem[1]}")
    thresholds = meta.get("offender_thresholds")
    policy = Policy(
        id=policy_id,
        version=policy_version(data),
        text=body,
        title=title.strip() if title else None,
        sensitive=sensitive,
        reasoning_effort=effort,  # type: ignore[arg-type]
        output=str(meta.get("output", "rich")),
        categories=categories,
        actions=actions,
        patterns=tuple(patterns),
        path=path,
        community=community,
        shadow_of=shadow_of,
        target_precision=meta.get("target_precision"),
        baseline_actions={str(pid): {str(r): a for r, a in actions.items()}
                          for pid, actions in meta.get("baseline_actions", {}).items()},
        offender_thresholds=None if thresholds is None
        else tuple(sorted((t["violations"], t["action"]) for t in thresholds)),
    )
    return policy, meta


def community_problem(meta: dict, community: str | None, text: str) -> tuple[int, str] | None:
    """The first problem of the overrides (`target_precision`, `baseline_actions`,
    `offender_thresholds`) as (line, message), or None."""
    if "target_precision" in meta:
        value = meta["target_precision"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            return _meta_line(text, "target_precision"), (
                "`target_precision` must be a number between 0 and 1 (exclusive)")
    for key in ("baseline_actions", "offender_thresholds"):
        if key in meta and community is None:
            return _meta_line(text, key), (f"`{key}` overrides the platform's settings for one community: "
                                           "only a community policy (`community:`) may carry it")  # fmt: skip
    overrides = meta.get("baseline_actions", {})
    if not isinstance(overrides, dict):
        return _meta_line(text, "baseline_actions"), ("`baseline_actions` must be a mapping of platform policy id "
                                                      "-> {category, violation, safe or review: action}")
    for policy_id, actions in overrides.items():
        line = _entry_line(text, "baseline_actions", str(policy_id))
        if not isinstance(actions, dict) or not actions:
            return line, (f"`baseline_actions` of {policy_id!r} must be a mapping of category, violation, safe "
                          "or review -> action")
        for result, action in actions.items():
            if action not in ACTIONS:
                return line, (f"`baseline_actions` of {policy_id!r}: action {action!r} for {result!r} is not one of "
                              f"{', '.join(ACTIONS)}")  # fmt: skip
    thresholds = meta.get("offender_thresholds", [])
    line = _meta_line(text, "offender_thresholds")
    if not isinstance(thresholds, list):
        return line, "`offender_thresholds` must be a list of {violations: N, action: ACTION}"
    for threshold in thresholds:
        if not isinstance(threshold, dict) or set(threshold) != {"violations", "action"}:
            return line, "each of `offender_thresholds` must be {violations: N, action: ACTION}, those two keys"
        count, action = threshold["violations"], threshold["action"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return line, f"`offender_thresholds`: violations must be a whole number >= 1, not {count!r}"
        if action not in ACTIONS:
            return line, f"`offender_thresholds`: action {action!r} is not one of {', '.join(ACTIONS)}"
    return None


def unknown_key_message(key: str) -> str:
    """`unknown front-matter key 'outptu'; did you mean 'output'?` (or the keys there are)."""
    close = difflib.get_close_matches(key, FRONT_MATTER_KEYS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(FRONT_MATTER_KEYS)}"
    return f"unknown front-matter key {key!r}; {hint}"


def load_policy(path: Path) -> Policy:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}:0: cannot read ({exc.strerror})") from None
    return parse_policy(data, path)


def _optional_str(meta: dict, key: str, where: str, text: str) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise PolicyError(f"{where}:{_meta_line(text, key)}: `{key}` must be a non-empty string without '/'")
    return value.strip()


def _str_map(value: Any, key: str, where: str, text: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where}:{_meta_line(text, key)}: `{key}` must be a mapping")
    return {str(k): str(v) for k, v in value.items()}


def _entry_line(text: str, section: str, key: str) -> int:
    """The line of `key:` inside the front-matter mapping `section`, else the section's line."""
    start = _meta_line(text, section)
    for number, line in enumerate(text.splitlines()[start:], start=start + 1):
        if line and not line[0].isspace():
            break
        if line.strip().startswith(f"{key}:"):
            return number
    return start


def _meta_line(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(f"{key}:"):
            return number
    return 1
