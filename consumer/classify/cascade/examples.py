"""Training data for the cheap stages: the policy's EXAMPLES section plus its examples file.

The examples file sits next to the policy, `<policy-file-stem>.examples.jsonl`, one
`{"content": ..., "label": 0|1}` a line. The training version hashes what the heads are
trained from and taught by: the policy text (the reasoner's instructions, EXAMPLES included),
its reasoning effort and the examples file's bytes. Editing any of them discards learned heads
and retrains them; policies for which all three are the same (communities that adopt one
policy under ids of their own) share one set of heads.
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
    version: str  # changes when the policy's text or effort, or its examples file, changes


def training_set(policy: Policy) -> TrainingSet:
    """The policy's labelled examples; a missing examples file means only the EXAMPLES section."""
    texts, labels = [], []
    for example in section_examples(policy.text):
        if example.label is not None and example.content:
            texts.append(example.content)
            labels.append(example.label)
    # Length-prefixed parts: no two different (text, effort, examples) hash alike by shifting bytes.
    digest = hashlib.sha256()
    for part in (policy.text.encode(), policy.reasoning_effort.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    path = examples_path(policy)
    if path is not None and path.is_file():
        digest.update(path.read_bytes())
        for example in load_examples(path):
            texts.append(example.content)
            labels.append(int(example.label))
    return TrainingSet(texts, labels, digest.hexdigest()[:32])


