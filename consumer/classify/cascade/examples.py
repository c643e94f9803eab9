"""Training data for the cheap stages: the policy's EXAMPLES section plus its examples file.

The examples file sits next to the policy, `<policy-file-stem>.examples.jsonl`, one
`{"content": ..., "label": 0|1}` a line. Its bytes count in the training version, so
editing the file (like editing the policy) discards learned heads and retrains them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from consumer.policy import Policy
from consumer.policy.examples import examples_path, load_examples, section_examples


@dataclass(frozen=True)
class TrainingSet:
    texts: list[str]
    labels: list[int]
    version: str  # changes when the policy or its examples file changes


def training_set(policy: Policy) -> TrainingSet:
    """The policy's labelled examples; a missing examples file means only the EXAMPLES section."""
    texts, labels = [], []
    for example in section_examples(policy.text):
        if example.label is not None and example.content:
            texts.append(example.content)
            labels.append(example.label)
    digest = hashlib.sha256(policy.version.encode())
    path = examples_path(policy)
    if path is not None and path.is_file():
        digest.update(path.read_bytes())
        for example in load_examples(path):
            texts.append(example.content)
            labels.append(int(example.label))
    return TrainingSet(texts, labels, digest.hexdigest()[:16])


