"""The shadow report (`safeguard-consumer policy shadow report`): the shadow topic read back and
one candidate's flips counted, by direction and category, with the stage split and examples.

The read is bounded: every partition from its earliest retained offset to its end when the report
starts, by a reader that joins no group and commits nothing. Each (source record, candidate
version) counts once: a record read again after a restart is sampled again (the sample follows
its coordinates) and its second shadow record is a duplicate. The flips are `shadow.flip_of`
of the two answers, the one rule the consumer's metrics count by too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from consumer.events import Document
from consumer.kafka.client import Consumer, TopicPartition
from consumer.kafka.ranges import OffsetSpan, iter_ranges
from consumer.pipeline.shadow import CHEAP, FLIPS, REASONER, flip_category, flip_of

ANSWER_FIELDS = ("policy_id", "policy_version", "violation", "category", "rule_ids", "confidence", "stage", "model",
                 "decided_by")  # fmt: skip


@dataclass
class ShadowReport:
    """One candidate's comparisons so far; `add` each shadow record of the topic in order."""

    candidate: str  # its id, or community/id
    version: str | None = None  # only this version of it
    max_examples: int = 5  # per direction
    compared: int = 0
    duplicates: int = 0
    unreadable: int = 0
    versions: Counter[str] = field(default_factory=Counter)  # candidate version -> comparisons
    live: Counter[str] = field(default_factory=Counter)  # live policy id@version -> comparisons
    flips: Counter[str] = field(default_factory=Counter)  # direction -> count
    categories: dict[str, Counter[str]] = field(default_factory=dict)  # direction -> category -> count
    # side (live, candidate) -> cheap or reasoner -> (compared, flipped)
    stages: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    examples: list[Document] = field(default_factory=list)
    _seen: set[tuple[Any, ...]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.stages = {side: {kind: Counter(compared=0, flipped=0) for kind in (CHEAP, REASONER)}
                       for side in ("live", "candidate")}  # fmt: skip
        self.categories = {flip: Counter() for flip in FLIPS}
        self.flips = Counter({flip: 0 for flip in FLIPS})

    def add_bytes(self, value: bytes | None) -> None:
        try:
            record = orjson.loads(value or b"")
            live, candidate, source = record["live"], record["candidate"], record["source"]
            key = (source["topic"], source["partition"], source["offset"], candidate["policy_key"],
                   candidate["policy_version"])  # fmt: skip
            readable = all(isinstance(answer["violation"], bool) and answer["decided_by"] in (CHEAP, REASONER)
                           for answer in (live, candidate))  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError):
            readable = False
        if not readable:
            self.unreadable += 1  # not written by the consumer: someone else's record on the topic
            return
        if self.candidate not in (candidate["policy_key"], candidate["policy_id"]):
            return
        if self.version is not None and candidate["policy_version"] != self.version:
            return
        if key in self._seen:
            self.duplicates += 1
            return
        self._seen.add(key)
        self.add(record)

    def add(self, record: Document) -> None:
        live, candidate = record["live"], record["candidate"]
        self.compared += 1
        self.versions[candidate["policy_version"]] += 1
        self.live[f"{live['policy_id']}@{live['policy_version']}"] += 1
        flip = flip_of(live, candidate)
        for side, answer in (("live", live), ("candidate", candidate)):
            split = self.stages[side][answer["decided_by"]]
            split["compared"] += 1
            split["flipped"] += int(flip is not None)
        if flip is None:
            return
        self.flips[flip] += 1
        self.categories[flip][flip_category(flip, live, candidate)] += 1
        if sum(1 for example in self.examples if example["flip"] == flip) < self.max_examples:
            self.examples.append({
                "flip": flip, "event_id": record.get("event_id"), "source": record["source"],
                "live": {k: live.get(k) for k in ANSWER_FIELDS},
                "candidate": {k: candidate.get(k) for k in ANSWER_FIELDS},
                "content": record.get("content"),
            })  # fmt: skip

    def as_document(self, show_content: bool = False) -> Document:
        """The report as JSON; the examples' content only with `show_content`."""
        examples = [example if show_content else {k: v for k, v in example.items() if k != "content"}
                    for example in self.examples]  # fmt: skip
        return {
            "candidate": self.candidate,
            "version": self.version,
            "compared": self.compared,
            "flipped": sum(self.flips.values()),
            "flips": dict(self.flips),
            "categories": {flip: dict(counts) for flip, counts in self.categories.items()},
            "stages": {side: {kind: dict(split) for kind, split in kinds.items()}
                       for side, kinds in self.stages.items()},  # fmt: skip
            "candidate_versions": dict(self.versions),
            "live_versions": dict(self.live),
            "duplicates": self.duplicates,
            "unreadable": self.unreadable,
            "examples": examples,
        }


def whole_topic(config: dict[str, Any], topic: str) -> list[OffsetSpan]:
    """Every partition of `topic`, earliest retained offset to its end now."""
    probe = Consumer({**config, "group.id": "safeguard-shadow-report", "enable.auto.commit": False})
    try:
        metadata = probe.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        return [(topic, p, *probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10))
                for p in metadata.partitions]  # fmt: skip
    finally:
        probe.close()


def read_report(config: dict[str, Any], topic: str, report: ShadowReport) -> ShadowReport:
    """`report` filled from the shadow topic, as it stands when the read starts."""
    for message in iter_ranges(config, whole_topic(config, topic), group_id="safeguard-shadow-report"):
        report.add_bytes(message.value())
    return report
