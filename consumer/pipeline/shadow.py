"""Shadow runs: a candidate version of a policy (front matter `shadow_of: LIVE_ID`) classifies a
sample of the live traffic beside the live policy, and what it would have changed is recorded.

What this stage guarantees:
- the live verdict never waits for a candidate: the pipeline hands a record's verdict to the sink
  first and then calls `Shadow.compare`; a candidate's answer at hand (a keyword match, a cheap
  stage) is recorded at once, any other waits in a task of its own, at most
  `shadow.max_in_flight` of them (a sampled event beyond that is skipped and counted);
- a candidate's result goes to `shadow.topic` only: never to the verdict topic, an action, the
  offender counts, review (its requests are never remembered for a disagreement review) or the
  live path's cache entries (a cascade keys its cache by policy version, and a candidate has its
  own); a failed or unavailable candidate is counted and skipped, never a dead letter nor an outage;
- the sample is chosen by the record's topic, partition and offset (`sampled`), so a re-read
  after a restart samples the same records and the report counts each once;
- on a shared reasoner fleet (`classifier.reasoner: remote`) candidates run on a twin of the
  classifier at `priority: low` (vLLM's priority scheduling where the fleet has it, else
  `engine.low_priority_share` of each endpoint); an in-process engine has no request priority
  here: it shares the live classifier, bounded by `shadow.max_in_flight` and the sample.

A candidate whose live policy is not in force is logged once (per version) and ignored. The
shadow record (one per sampled event and candidate, keyed like the input) holds the source
coordinates, both answers with the stage that decided each, the flip (`FLIPS`, or null) and the
content; `safeguard-consumer policy shadow report` reads them back (`shadow_report`). Shadow
records are a measurement, outside the delivery guarantees: one the broker or a full producer
queue refuses is counted (`safeguard_shadow_skipped_total{safeguard_reason="undelivered"}`), not
retried; one lost to a crash is not counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry.metrics import CallbackOptions, Meter, Observation

import consumer
from consumer import stages
from consumer.classify import (
    AnswersAtOnce,
    AnswersManyAtOnce,
    Classification,
    Classifier,
    ClassifyRequest,
)
from consumer.classify.factory import build_classifier
from consumer.config import Settings
from consumer.config.shadow import ShadowSettings
from consumer.errors import Unavailable
from consumer.events import ContentEvent, Document
from consumer.kafka import records
from consumer.kafka.client import KafkaError, Message, Producer
from consumer.policy import Policy, PolicyStore

log = logging.getLogger(__name__)

# What a candidate's answer changes against the live one's, in the report's and the metrics' words.
SAFE_TO_VIOLATION = "safe_to_violation"
VIOLATION_TO_SAFE = "violation_to_safe"
CATEGORY_CHANGED = "category_changed"
FLIPS = (SAFE_TO_VIOLATION, VIOLATION_TO_SAFE, CATEGORY_CHANGED)
# The two sides of the report's stage split: a cheap stage (or a classifier without a reasoner) or the reasoner.
CHEAP, REASONER = "cheap", "reasoner"
SKIP_REASONS = ("busy", "failed", "unavailable", "undelivered")
# Enough of the content for a person to read an example; the source coordinates lead to the whole record.
MAX_CONTENT_CHARS = 2000
_SAMPLE_SPACE = 1 << 64
_MASK = _SAMPLE_SPACE - 1


def sampled(topic: str, partition: int, offset: int, fraction: float) -> bool:
    """Whether the record at these coordinates is in the sample: the same answer on every read
    and in every consumer instance, `fraction` of the records on average.

    SplitMix64's finalizer over the coordinates (the topic as its CRC-32): uniform enough for a
    sample, and a third of a hash function's cost, which every record routed to a policy with a
    candidate pays (0.6 against 2-3 µs measured, beside ~45 µs of a keyword record's handling)."""
    z = _topic_seed(topic)
    z = (z * 0x9E3779B97F4A7C15 + partition * 0xBF58476D1CE4E5B9 + offset) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31) < fraction * _SAMPLE_SPACE


@functools.lru_cache(maxsize=4096)
def _topic_seed(topic: str) -> int:
    return zlib.crc32(topic.encode())


def flip_of(live: Document, candidate: Document) -> str | None:
    """What the candidate's answer changes against the live one's (`FLIPS`), None when nothing.
    A category counts only between two violations: a safe answer's category means nothing."""
    if live["violation"] != candidate["violation"]:
        return SAFE_TO_VIOLATION if candidate["violation"] else VIOLATION_TO_SAFE
    if live["violation"] and live["category"] != candidate["category"]:
        return CATEGORY_CHANGED
    return None


def flip_category(flip: str, live: Document, candidate: Document) -> str:
    """The category a flip is counted under: the violation's side (the live one's when the
    candidate finds none), the candidate's new one for a changed category; "none" without one."""
    side = live if flip == VIOLATION_TO_SAFE else candidate
    return side["category"] or "none"


def shadow_classifier(settings: Settings, live: Classifier, policies: PolicyStore) -> Classifier:
    """What the candidates classify with: on a served fleet a twin of the live classifier at low
    priority (a cascade twin trains heads of its own, the memory of a second cascade), else the
    live classifier itself (an in-process engine cannot be loaded twice)."""
    if settings.classifier.reasoner_place != "remote":
        return live
    return build_classifier(settings, policies, priority="low")


class ShadowWriter:
    """The shadow topic's producer, apart from the sink: its records are never tracked for a commit."""

    def __init__(self, producer_config: dict[str, Any], topic: str, on_undelivered: Callable[[str], None]):
        # Idempotence and acks=all as for the outputs: a shadow record is counted once when it lands.
        self._producer = Producer({**producer_config, "enable.idempotence": True, "acks": "all"})
        self._topic = topic
        self._on_undelivered = on_undelivered
        self._logged: set[str] = set()  # candidates whose first undelivered record was logged; the rest are counted

    def send(self, key: bytes | None, document: Document, candidate_key: str) -> None:
        def report(error: KafkaError | None, _: Message) -> None:
            if error is None:
                return
            if candidate_key not in self._logged:
                self._logged.add(candidate_key)
                log.warning("shadow records of %s undelivered to %s: %s (counted from now on, not logged)",
                            candidate_key, self._topic, error.str())  # fmt: skip
            self._on_undelivered(candidate_key)

        try:
            self._producer.produce(self._topic, orjson.dumps(document), key, on_delivery=report)
        except BufferError:  # the producer's queue is full: a measurement is not worth waiting for
            self._on_undelivered(candidate_key)
        self._producer.poll(0)  # the reports of earlier sends

    def close(self, timeout_s: float) -> int:
        """Flush; returns how many records stayed undelivered."""
        return self._producer.flush(timeout_s)


class Shadow:
    """The shadow stage of one pipeline: `compare` after each record's verdict, `close` at shutdown."""

    def __init__(
        self,
        settings: ShadowSettings,
        classifier: Classifier,
        live_classifier: Classifier,
        policies: Callable[[], Mapping[str, Policy]],
        producer_config: dict[str, Any],
        meter: Meter,
        timeout_s: float,
        has_reasoner: bool,
    ):
        """`classifier`: what candidates classify with (`shadow_classifier`), started and closed
        here when it is not `live_classifier`; `has_reasoner`: whether an answer without a stage
        is the reasoner's (classifier kind reasoner) rather than a cheap classifier's."""
        self._fraction = settings.sample_fraction
        self._max_in_flight = settings.max_in_flight
        self._classifier = classifier
        self._own_classifier = classifier is not live_classifier
        self._now_many = classifier.classify_now_many if isinstance(classifier, AnswersManyAtOnce) else None
        self._now = classifier.classify_now if isinstance(classifier, AnswersAtOnce) else None
        self._policies = policies
        self._timeout_s = timeout_s
        self._stageless = REASONER if has_reasoner else CHEAP
        self._writer = ShadowWriter(producer_config, settings.topic, lambda key: self._skip(key, "undelivered"))
        self._seen: Mapping[str, Policy] | None = None  # the policies dict `_by_live` was paired from
        self._by_live: dict[str, list[Policy]] = {}  # live policy key -> its candidates in force
        self._ignored: set[str] = set()  # candidate refs whose live policy was missing, logged once
        self._tasks: set[asyncio.Task[None]] = set()
        self.compared: Counter[tuple[str, str]] = Counter()  # by (candidate key, version)
        self.flips: Counter[tuple[str, str, str, str]] = Counter()  # by (candidate key, version, flip, category)
        self.skipped: Counter[tuple[str, str]] = Counter()  # by (candidate key, reason)
        meter.create_observable_counter(
            "safeguard.shadow.compared", [self._observe_compared],
            description="sampled events a candidate classified beside its live policy",
        )  # fmt: skip
        meter.create_observable_counter(
            "safeguard.shadow.flips", [self._observe_flips],
            description="candidate answers that differ from the live one, by direction and category",
        )  # fmt: skip
        meter.create_observable_counter(
            "safeguard.shadow.skipped", [self._observe_skipped],
            description="sampled events a candidate did not answer or record: busy, failed, unavailable, undelivered",
        )  # fmt: skip

    async def start(self) -> None:
        self._candidates()  # paired now, so that their metrics show from the start
        if self._own_classifier:
            await self._classifier.start()

    async def close(self, timeout_s: float) -> None:
        """Candidates still waiting are dropped (a measurement, not an output); what was sent is flushed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        undelivered = await asyncio.to_thread(self._writer.close, timeout_s)
        if undelivered:
            log.warning("%d shadow records undelivered at shutdown", undelivered)
        if self._own_classifier:
            await self._classifier.close()

    # -- one record ------------------------------------------------------------------------------

    def compare(
        self, message: Message, event: ContentEvent, requests: list[ClassifyRequest], results: list[Document]
    ) -> None:
        """After the record's verdict was sent: each candidate of a policy that answered it
        classifies the same event, when the record is in the sample. `results[i]` answers `requests[i]`.
        Never raises: the record's verdict is out, and a measurement must not cost it a dead letter."""
        try:
            self._compare(message, event, requests, results)
        except Exception:  # a bug here shows in the log; the record is done (see above)
            log.exception("shadow comparison failed on %s[%d]@%d", message.topic(), message.partition(),
                          message.offset())  # fmt: skip

    def _compare(
        self, message: Message, event: ContentEvent, requests: list[ClassifyRequest], results: list[Document]
    ) -> None:
        by_live = self._candidates()
        if not by_live:
            return
        in_sample = None  # asked once per record, and only of a record that has a candidate
        for request, live in zip(requests, results):
            candidates = by_live.get(request.policy.key)
            if candidates is None:
                continue
            if in_sample is None:
                in_sample = sampled(message.topic(), message.partition(), message.offset(), self._fraction)
            if not in_sample:
                return
            for candidate in candidates:
                # A community's candidate of a platform policy sees that community's events only.
                if candidate.community is None or candidate.community == event.community_id:
                    self._ask(message, event, request, live, candidate)

    def _ask(self, message: Message, event: ContentEvent, request: ClassifyRequest, live: Document,
             candidate: Policy) -> None:  # fmt: skip
        # A request id of its own: review remembers the live requests' ids, never this one.
        asked = ClassifyRequest(request.event, candidate, f"{request.request_id}/shadow/{candidate.key}",
                                time.monotonic() + self._timeout_s)  # fmt: skip
        try:
            if self._now_many is not None:
                answer: object = self._now_many([asked])[0]
            else:
                answer = self._now(asked) if self._now is not None else None
        except Exception as exc:  # noqa: BLE001 - a candidate's failure costs its measurement only
            answer = exc
        if answer is None:
            if len(self._tasks) >= self._max_in_flight:
                self._skip(candidate.key, "busy")
                return
            task = asyncio.get_running_loop().create_task(self._later(message, event, live, asked))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(answer, Classification):
            self._record(message, event, live, candidate, answer)
        else:
            self._skip(candidate.key, "unavailable" if isinstance(answer, Unavailable) else "failed")

    async def _later(self, message: Message, event: ContentEvent, live: Document, asked: ClassifyRequest) -> None:
        candidate = asked.policy
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._classifier.classify(asked)
        except Unavailable:  # the live path has its own outage handling: a candidate never pauses intake
            self._skip(candidate.key, "unavailable")
            return
        except Exception:  # noqa: BLE001 - a failure, a timeout: the candidate's measurement only
            self._skip(candidate.key, "failed")
            return
        if not isinstance(answer, Classification):
            self._skip(candidate.key, "failed")
            return
        self._record(message, event, live, candidate, answer)

    def _record(self, message: Message, event: ContentEvent, live: Document, candidate: Policy,
                answer: Classification) -> None:  # fmt: skip
        live_answer = self._answer(live["policy_id"], live["policy_version"], live["violation"], live["category"],
                                   live["rule_ids"], live["confidence"], live["stage"], live["model"])  # fmt: skip
        candidate_answer = self._answer(candidate.id, candidate.version, answer.violation, answer.category,
                                        list(answer.rule_ids), answer.confidence, answer.stage, answer.model)
        candidate_answer["policy_key"] = candidate.key
        candidate_answer["shadow_of"] = candidate.shadow_of
        flip = flip_of(live_answer, candidate_answer)
        self.compared[(candidate.key, candidate.version)] += 1
        if flip is not None:
            category = flip_category(flip, live_answer, candidate_answer)
            self.flips[(candidate.key, candidate.version, flip, category)] += 1
        document = {
            "schema_version": 1,
            "kind": "shadow_result",
            "event_id": event.event_id,
            "source": records.source_of(message),
            "community_id": event.community_id,
            "live": live_answer,
            "candidate": candidate_answer,
            "flip": flip,
            "content": event.content[:MAX_CONTENT_CHARS],
            "compared_at": datetime.now(UTC).isoformat(),
            "consumer_version": consumer.__version__,
        }
        self._writer.send(message.key(), document, candidate.key)

    def _answer(self, policy_id: str, version: str, violation: bool, category: str | None, rule_ids: list[str],
                confidence: str | None, stage: str | None, model: str | None) -> Document:  # fmt: skip
        if stage is None:
            decided_by = self._stageless
        else:
            decided_by = REASONER if stage == stages.REASONER else CHEAP
        return {"policy_id": policy_id, "policy_version": version, "violation": violation, "category": category,
                "rule_ids": rule_ids, "confidence": confidence, "stage": stage, "model": model,
                "decided_by": decided_by}  # fmt: skip

    def _skip(self, candidate_key: str, reason: str) -> None:
        self.skipped[(candidate_key, reason)] += 1

    # -- the candidates in force -------------------------------------------------------------------

    def _candidates(self) -> dict[str, list[Policy]]:
        """Live policy key -> its candidates, paired again whenever the policies in force change
        (a reload replaces the whole dict)."""
        policies = self._policies()
        if policies is not self._seen:
            self._seen = policies
            self._by_live = self._pair(policies)
        return self._by_live

    def _pair(self, policies: Mapping[str, Policy]) -> dict[str, list[Policy]]:
        by_live: dict[str, list[Policy]] = {}
        for candidate in policies.values():
            if candidate.shadow_of is None:
                continue
            # The live policy of its own community first, else the platform's of that id.
            live = policies.get(f"{candidate.community}/{candidate.shadow_of}") if candidate.community else None
            live = live or policies.get(candidate.shadow_of)
            if live is None or live.shadow_of is not None:
                if candidate.ref not in self._ignored:
                    self._ignored.add(candidate.ref)
                    log.warning("shadow candidate %s: its live policy %s is not in force; the candidate is ignored",
                                candidate.key, candidate.shadow_of)  # fmt: skip
                continue
            by_live.setdefault(live.key, []).append(candidate)
        return by_live

    # -- metrics, read at scrape time ------------------------------------------------------------

    def _in_force(self) -> Iterable[Policy]:
        # As last paired on the event loop: the scrape runs on the HTTP server's thread.
        return (candidate for candidates in list(self._by_live.values()) for candidate in candidates)

    def _observe_compared(self, _: CallbackOptions) -> Iterable[Observation]:
        # Every candidate in force from 0, so that a rate() sees its series before its first comparison.
        counts = Counter({(c.key, c.version): 0 for c in self._in_force()})
        counts.update(dict(self.compared))
        for (key, version), count in counts.items():
            yield Observation(count, {"safeguard.candidate": key, "safeguard.candidate_version": version})

    def _observe_flips(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = Counter({(c.key, c.version, flip, category): 0 for c in self._in_force()
                          for flip in FLIPS for category in c.categories})  # fmt: skip
        counts.update(dict(self.flips))
        for (key, version, flip, category), count in counts.items():
            yield Observation(count, {"safeguard.candidate": key, "safeguard.candidate_version": version,
                                      "safeguard.flip": flip, "safeguard.category": category})  # fmt: skip

    def _observe_skipped(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = Counter({(c.key, reason): 0 for c in self._in_force() for reason in SKIP_REASONS})
        counts.update(dict(self.skipped))
        for (key, reason), count in counts.items():
            yield Observation(count, {"safeguard.candidate": key, "safeguard.reason": reason})
