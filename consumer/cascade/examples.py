"""Training data for the cheap stages: the policy's EXAMPLES section plus its examples file.

The examples file sits next to the policy, `<policy-file-stem>.examples.jsonl`, one
`{"content": ..., "label": 0|1}` a line. Its bytes count in the training version, so
editing the file (like editing the policy) discards learned heads and retrains them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from consumer.evaluate import load_examples
from consumer.policy import Policy

_HEADING = re.compile(r"^#{1,6}\s+([A-Za-z]+)")
# `- "content" -> label`, split at the last arrow: the content may itself contain arrows.
_EXAMPLE = re.compile(r"^\s*[-*]\s+(?P<content>.+)\s+(?:->|=>)\s*(?P<label>.+?)\s*$")


@dataclass(frozen=True)
class TrainingSet:
    texts: list[str]
    labels: list[int]
    version: str  # changes when the policy or its examples file changes


def examples_path(policy: Policy) -> Path | None:
    if policy.path is None:
        return None
    return policy.path.with_name(f"{policy.path.stem}.examples.jsonl")


def training_set(policy: Policy) -> TrainingSet:
    """The policy's labelled examples; a missing examples file means only the EXAMPLES section."""
    texts, labels = [], []
    for content, label in section_examples(policy.text):
        texts.append(content)
        labels.append(label)
    digest = hashlib.sha256(policy.version.encode())
    path = examples_path(policy)
    if path is not None and path.is_file():
        digest.update(path.read_bytes())
        for example in load_examples(path):
            texts.append(example.content)
            labels.append(int(example.label))
    return TrainingSet(texts, labels, digest.hexdigest()[:16])


def section_examples(text: str) -> list[tuple[str, int]]:
    """(content, label) of each example line under the policy's EXAMPLES heading."""
    found: list[tuple[str, int]] = []
    inside = False
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            inside = heading.group(1).upper() == "EXAMPLES"
            continue
        match = _EXAMPLE.match(line) if inside else None
        if not match:
            continue
        label = _label(match.group("label"))
        if label is not None:
            found.append((match.group("content").strip().strip("\"'“”"), label))
    return found


def _label(text: str) -> int | None:
    if text in ("0", "1"):
        return int(text)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict) and value.get("violation") in (0, 1):
        return int(value["violation"])
    return None
