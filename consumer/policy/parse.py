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
from typing import Any, Literal

import yaml

from consumer.policy.exceptions import PolicyError

ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS = ("low", "medium", "high")
OUTPUT_TIERS = ("binary", "category", "rich")  # bare 0/1; + policy_category; + rule_ids, confidence, rationale
# Every front-matter key a policy may have: a misspelled one would otherwise change what is
# moderated in silence (`pattern:` leaves the keyword classifier with no patterns).
FRONT_MATTER_KEYS = (
    "id", "title", "sensitive", "reasoning_effort", "output", "categories", "actions", "patterns", "community",
    "shadow_of",
)  # fmt: skip


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

    @functools.cached_property
    def key(self) -> str:
        """Unique among the policies in force: the id, scoped by the community that owns it."""
        return f"{self.community}/{self.id}" if self.community else self.id

    @functools.cached_property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def action_for(self, violation: bool, category: str | None) -> str:
        """The platform action for a result: by category, else by `violation`/`safe`."""
        if category and category in self.actions:
            return self.actions[category]
        return self.actions.get("violation" if violation else "safe", "flag" if violation else "allow")

    @property
    def review_action(self) -> str:
        """The action for a result a person must decide first (`actions: {review: ...}`): hold by default."""
        return self.actions.get("review", "hold")


def policy_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def parse_policy(data: bytes, path: Path | None = None) -> Policy:
    """Parse a policy file's bytes; raises PolicyError naming the file and line."""
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
        meta = yaml.safe_load(text[3:end]) or {}
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
    return Policy(
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
    )


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
