"""Labelled examples of a policy, from its EXAMPLES section and from JSONL files; one parser each.

The EXAMPLES section holds lines like `- "content" -> 1` or `- "content" -> {"violation": 1,
"policy_category": "..."}`; validation checks them, the cascade trains on them. A JSONL file
holds one `{"content": str, "label": 0|1, "id"?: str}` a line: `policy eval`'s data and the
cascade's `<policy-file-stem>.examples.jsonl` beside the policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from consumer.policy.exceptions import DataError
from consumer.policy.parse import Policy
from consumer.policy.sections import sections

# `- "content" -> label`, split at the last arrow: the content may itself contain arrows.
_EXAMPLE = re.compile(r"^\s*[-*]\s+(?P<content>.*)(?:->|=>)\s*(?P<label>.+?)\s*$")


@dataclass(frozen=True)
class SectionExample:
    """One example line of a policy's EXAMPLES section; `label` is None where `error` says why."""

    line: int
    content: str
    label: int | None
    category: str | None = None
    error: str | None = None


def section_examples(text: str, first_line: int = 1) -> list[SectionExample]:
    """Every example line under the EXAMPLES heading of a policy's body, numbered from `first_line`."""
    found: list[SectionExample] = []
    inside = False
    for section in sections(text, first_line):
        if section.name is not None:  # a heading without a name continues the section before it
            inside = section.name == "EXAMPLES"
        if not inside:
            continue
        for number, line in section.body:
            match = _EXAMPLE.match(line)
            if match:
                content = match.group("content").strip().strip("\"'“”")
                found.append(SectionExample(number, content, *_label(match.group("label"))))
    return found


def _label(text: str) -> tuple[int | None, str | None, str | None]:
    """(label, category, error) of an example's label: `0`, `1` or a JSON object with `violation`."""
    if text in ("0", "1"):
        return int(text), None, None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, None, f"example label {text!r} is neither 0, 1 nor a JSON object"
    if not isinstance(value, dict) or value.get("violation") not in (0, 1):
        return None, None, "example label must have \"violation\": 0 or 1"
    category = value.get("policy_category")
    return int(value["violation"]), category if isinstance(category, str) else None, None


@dataclass(frozen=True)
class Example:
    id: str
    content: str
    label: bool


def examples_path(policy: Policy) -> Path | None:
    """Where a policy's examples file sits: `<policy-file-stem>.examples.jsonl` beside it."""
    if policy.path is None:
        return None
    return policy.path.with_name(f"{policy.path.stem}.examples.jsonl")


def load_examples(path: Path) -> list[Example]:
    """JSONL, one `{"content": str, "label": 0|1, "id"?: str}` a line (`violation` also accepted for label)."""
    examples = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON ({exc})") from None
        label = row.get("label", row.get("violation")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("content"), str) or label not in (0, 1, True, False):
            raise DataError(f"{path}:{number}: needs a string `content` and a `label` of 0 or 1")
        examples.append(Example(id=str(row.get("id", number)), content=row["content"], label=bool(label)))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples
