"""Policies as data on a compacted Kafka topic (`policies.topic`), beside the policy files.

A record's key is its policy's `Policy.key` (the id, or `community/id`); its value is a policy
file's bytes (Markdown with YAML front matter), so its version is the hash a file of the same
bytes has; a tombstone (no value) retires the key. Who published it and when travel in headers
(`consumer.kafka.policy_topic` moves the records; this module says what they mean).

`TopicPolicyStore` is a `PolicyStore` (the same `get()`, `reloads`, `on_reload`) whose policies
in force are the files' merged with the topic's. Guarantees:

- **Checked as a file is.** A record is in force only if it passes `policy validate`'s checks
  (errors, not warnings) and its key is its policy's key; otherwise it is rejected: logged with
  where it is and why (never its text), counted (`rejected`), and the last good version of that
  key stays in force.
- **The topic wins.** A key that both a file and the topic hold is the topic's (it is what was
  published last, on purpose); retiring it on the topic brings the file's back.
- **Atomic per batch.** The policies in force are replaced once per batch of records, so an
  event sees the set before or after, never a mix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from consumer.policy.exceptions import PolicyError
from consumer.policy.parse import Policy
from consumer.policy.store import PolicyStore
from consumer.policy.validate import DEFAULT_MAX_TOKENS, check_policy

log = logging.getLogger(__name__)

# Who published a record and when (ISO 8601, UTC), and for `policy promote` the candidate's key:
# headers, so that the value stays the policy file's bytes and its version the same hash.
PUBLISHED_BY = "safeguard.published_by"
PUBLISHED_AT = "safeguard.published_at"
PROMOTED_FROM = "safeguard.promoted_from"
_BARE = re.compile(r"^[A-Za-z0-9_.-]+$")  # a front-matter value YAML reads as the same plain string


class PolicyRecord(Protocol):
    """A record of the policy topic, as `consumer.kafka.policy_topic.TopicRecord` reads it."""

    key: bytes | None
    value: bytes | None  # None: a tombstone
    headers: dict[str, str]
    where: str  # topic[partition]@offset


@dataclass(frozen=True)
class Published:
    """A policy in force from the topic, with who published it, when, and where it is."""

    policy: Policy
    published_by: str | None
    published_at: str | None
    where: str


def check_record(record: PolicyRecord, max_tokens: int = DEFAULT_MAX_TOKENS) -> Policy:
    """The policy a (non-tombstone) record carries; `PolicyError` naming where it is and why it
    cannot be in force: a key that is not UTF-8, a value that fails validation, a key that is not
    the policy's own `community/id`."""
    where = record.where
    try:
        key = (record.key or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{where}:0: key is not UTF-8") from None
    if not key:
        raise PolicyError(f"{where}:0: record has no key (the key is the policy's id, or community/id)")
    assert record.value is not None
    checked, found = check_policy(record.value, Path(where), max_tokens)
    errors = [p for p in found if p.severity == "error"]
    if errors or checked is None:
        raise PolicyError(str(errors[0]) + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    policy = dataclasses.replace(checked, path=None)  # no path: no examples file beside it, its EXAMPLES section only
    if policy.key != key:
        raise PolicyError(f"{where}:0: key {key!r} is not the policy's own key {policy.key!r} (community/id)")
    return policy


def latest(records: Iterable[PolicyRecord]) -> dict[str, PolicyRecord]:
    """The last record of each key, tombstoned keys left out: what compaction keeps in force."""
    last: dict[str, PolicyRecord] = {}
    for record in records:
        key = (record.key or b"").decode("utf-8", "replace")
        if record.value is None:
            last.pop(key, None)
        else:
            last[key] = record
    return last


class TopicPolicyStore(PolicyStore):
    """The policy files merged with the policy topic's records (`apply`), the topic winning."""

    def __init__(
        self,
        directory: Path,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        on_reload: Callable[[dict[str, Policy], list[str]], None] | None = None,
    ):
        self._from_topic: dict[str, Published] = {}
        self.rejected = 0  # records refused since the start (safeguard_policy_topic_rejected_total)
        super().__init__(directory, max_tokens, on_reload)

    def published(self) -> dict[str, Published]:
        """The topic's policies in force, by key, with their metadata."""
        return dict(self._from_topic)

    def apply(self, records: Iterable[PolicyRecord]) -> bool:
        """Take a batch of the topic's records, in topic order; True if the policies in force changed."""
        problems: list[str] = []
        with self._swap:
            before = {key: p.version for key, p in self.current.items()}
            for record in records:
                problem = self._apply_one(record)
                if problem:
                    problems.append(problem)
            self.current = self._in_force()
        return self._announce(before, problems)

    def _apply_one(self, record: PolicyRecord) -> str | None:
        if record.value is None:
            key = (record.key or b"").decode("utf-8", "replace")
            if self._from_topic.pop(key, None) is not None:
                log.info("policy %s retired on the policy topic (%s)", key, record.where)
            return None
        try:
            policy = check_record(record, self.max_tokens)
        except PolicyError as exc:
            self.rejected += 1
            log.error("policy topic: record rejected: %s; the last good version of its key stays in force", exc)
            return str(exc)
        self._from_topic[policy.key] = Published(
            policy, record.headers.get(PUBLISHED_BY), record.headers.get(PUBLISHED_AT),
            record.where,
        )  # fmt: skip
        return None

    def _in_force(self) -> dict[str, Policy]:
        merged = super()._in_force()
        merged.update((key, published.policy) for key, published in self._from_topic.items())
        return merged


def with_front_matter(data: bytes, where: str, **values: str | None) -> bytes:
    """The policy file's bytes with top-level front-matter keys set (None: removed), every other
    byte kept; a new key goes right after `id:`. `PolicyError` when there is no front matter."""
    text = data.decode("utf-8")
    end = text.find("\n---", 3)
    if not text.startswith("---") or end < 0:
        raise PolicyError(f"{where}:1: missing YAML front matter (a first line of --- and a closing ---)")
    lines = text[:end].split("\n")
    for key, value in values.items():
        at = next((i for i, line in enumerate(lines) if line.startswith(f"{key}:")), None)
        line = None if value is None else f"{key}: {value if _BARE.match(value) else json.dumps(value)}"
        if at is not None:
            # A value continued on indented lines (a block scalar) goes with its key.
            stop = at + 1
            while stop < len(lines) and lines[stop][:1] in (" ", "\t"):
                stop += 1
            lines[at:stop] = [] if line is None else [line]
        elif line is not None:
            after = next((i + 1 for i, existing in enumerate(lines) if existing.startswith("id:")), 1)
            lines.insert(after, line)
    return ("\n".join(lines) + text[end:]).encode("utf-8")

