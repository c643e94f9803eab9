"""Output budgets: owns "every output fits its topic".

What it guarantees:

- **A budget per output topic.** The bytes one output record (key, value and headers) may
  take: the smaller of the topic's `max.message.bytes` (read with the AdminClient's
  `describe_configs` at start) and the producer's `message.max.bytes`, less a margin for
  the record batch's framing and compression's worst case. It is read again when the broker
  refuses an output for its size (`refresh`), at most every `REFRESH_INTERVAL_S` per topic.
- **Verdicts are trimmed, never dropped.** Over budget, a verdict loses, in this order, the
  model's reasoning, then the rationales (the longest texts first), then, only when many
  policies leave no other way, whole policy results (those without a violation first; the
  overall `violation` and `action` still count them). `truncated` says what was cut and how
  large the verdict was.
- **Dead letters are abbreviated, never dropped.** Over budget, the original value is cut to
  a prefix, then the headers (whole), then the key; `original.truncated` is true and each cut
  field says its size, what was kept and its sha256. With the dead letter's `source`
  coordinates anyone can fetch the full record while the input topic retains it. The model's
  raw output and the error message are shortened last.
- **Keys.** An output's record key larger than an eighth of the budget is replaced by its
  sha256 hex digest: the same input key still maps to the same output partition.
- **A refused output gets smaller, never stuck** (`smaller`): a verdict refused for its size
  is trimmed again under the re-read budget; a verdict refused again, or for another reason
  of its own (an invalid record), becomes an `output_rejected` dead letter; a dead letter
  becomes its minimal form, without any original bytes. Only a minimal dead letter refused
  too is the topic's problem (`OutputRefused`).
- **Start-up check** (`check`): a topic whose budget cannot hold even a minimal dead letter
  or verdict is a configuration error, reported before anything is consumed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
from confluent_kafka import KafkaException, Message

from consumer.errors import Fatal
from consumer.events import Document, ErrorType, Headers
from consumer.kafka.records import dead_letter

log = logging.getLogger(__name__)


KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588  # a topic's max.message.bytes unless the broker or topic says otherwise
LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1000000  # the producer's message.max.bytes unless configured
# Below these, an abbreviated dead letter (coordinates, error, cut fields, trace headers) or a
# verdict without its texts may not fit: refused at start.
MIN_DEAD_LETTER_BYTES = 4096
MIN_VERDICT_BYTES = 2048
REFRESH_INTERVAL_S = 1.0
# Room kept for what cutting adds: the `truncated` object or a cut field's size and sha256.
_CUT_RESERVE = 160
# Error texts of a minimal dead letter are cut to this many characters.
_MINIMAL_TEXT_CHARS = 512


class OutputTooLarge(Exception):
    """Even cut to the bone, the output does not fit its topic's budget."""


class OutputRefused(Fatal):
    """Nothing smaller is left for a record (its minimal dead letter was refused, or no dead
    letter fits the budget at all): the topic itself is the problem."""


class Output(NamedTuple):
    """One record's output on its way to the broker, with what makes a smaller one if refused."""

    topic: str
    value: bytes
    key: bytes | None
    headers: Headers
    # The verdict or dead letter, uncut; None for a verdict sent whole, whose value is its document
    # (`OutputBudget.document`): an output's objects held until its delivery report are freed
    # there, far from where they were made, at 2-3 µs an output more (docs/benchmark.md, issue 31,
    # ninth round).
    document: Document | None
    record: Message  # the input record
    kind: str  # "verdict", "review_item", "dead_letter" or "minimal" (a dead letter without original bytes)
    refits: int = 0  # how often the broker refused this record's outputs for their size


# A NamedTuple's own __new__ is a Python function: a frame per output. The tuple's is not.
_new_output = functools.partial(tuple.__new__, Output)


def margin(limit: int) -> int:
    """Bytes kept free of `limit` for the batch header, record framing and lz4's worst case."""
    return 1024 + limit // 200


def headers_size(headers: Headers | None) -> int:
    if not headers:  # no trace context to carry: no generator to run
        return 0
    if len(headers) == 1:  # the common case with tracing on: the traceparent alone
        name, value = headers[0]
        return len(name) + len(value or b"")
    return sum(len(name) + len(value or b"") for name, value in headers)


class OutputBudget:
    """Budgets of the output topics, and the fitting of verdicts and dead letters into them."""

    def __init__(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        describe: Callable[[list[str]], dict[str, int | None]] | None = None,
    ):
        """`describe`: topic -> max.message.bytes (None where unreadable); by default the
        AdminClient's describe_configs with the producer's connection settings."""
        self._producer_config = producer_config
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self.producer_max = int(producer_config.get("message.max.bytes", LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES))
        self._describe = describe or self._describe_configs
        self.topic_max: dict[str, int | None] = {}
        self._budgets: dict[str, int] = {}
        self._refreshed_at: dict[str, float] = {}

    def load(self, topics: list[str] | None = None) -> None:
        """Read the topics' limits, by default both output topics' (blocking: a broker round trip)."""
        wanted = sorted({t for t in topics or (self.verdict_topic, self.dead_letter_topic) if t})
        if not wanted:
            return
        found = self._describe(wanted)
        for topic in wanted:
            limit = found.get(topic)
            self.topic_max[topic] = limit
            self._budgets[topic] = self._budget_of(limit)

    def refresh(self, topic: str) -> int:
        """Read a topic's limit again after the broker refused an output for its size; a burst of
        refusals reads it once (blocking: the caller's thread waits for the broker)."""
        now = time.monotonic()
        if now - self._refreshed_at.get(topic, float("-inf")) >= REFRESH_INTERVAL_S:
            self._refreshed_at[topic] = now
            self.load([topic])
            log.info("budget of topic %r re-read: %d bytes", topic, self.budget(topic))
        return self.budget(topic)

    def budget(self, topic: str) -> int:
        budget = self._budgets.get(topic)
        return self._budget_of(None) if budget is None else budget

    def _budget_of(self, topic_max: int | None) -> int:
        limit = min(self.producer_max, topic_max or KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
        return limit - margin(limit)

    def batch_size(self) -> int:
        """A producer `batch.size` no larger than either topic's budget: several outputs batched
        together must never exceed what one topic accepts (the broker refuses a whole batch)."""
        return min(self.budget(self.verdict_topic), self.budget(self.dead_letter_topic))

    def check(self, max_payload_bytes: int) -> str | None:
        """The start-up check: None, or why no dead letter (or verdict) could ever be delivered."""
        for topic, key, smallest in (
            (self.dead_letter_topic, "kafka.dead_letter_topic", MIN_DEAD_LETTER_BYTES),
            (self.verdict_topic, "kafka.verdict_topic", MIN_VERDICT_BYTES),
        ):
            if topic and self.budget(topic) < smallest:
                return (
                    f"{key} {topic!r} takes records of at most {self.budget(topic)} bytes (its max.message.bytes "
                    f"{self.topic_max.get(topic)}, the producer's message.max.bytes {self.producer_max}, less "
                    f"framing): not even a minimal output of {smallest} bytes fits. Raise the topic's "
                    f"max.message.bytes (and kafka.producer message.max.bytes if it is the smaller)."
                )
        whole = self.whole_payload_limit()
        if self.dead_letter_topic and whole < max_payload_bytes:
            log.info(
                "dead letters to %r carry payloads of up to %d bytes whole; larger ones (pipeline.max_payload_bytes "
                "is %d) are abbreviated, their sizes and sha256 kept", self.dead_letter_topic, whole, max_payload_bytes,
            )  # fmt: skip
        return None

    def whole_payload_limit(self) -> int:
        """The largest value whose dead letter carries it uncut (base64: 4 bytes per 3)."""
        return max(0, (self.budget(self.dead_letter_topic) - MIN_DEAD_LETTER_BYTES) * 3 // 4)

    # -- fitting --------------------------------------------------------------------------------

    def verdict(self, document: Document, record: Message, headers: Headers) -> Output:
        """The verdict as it will be sent: whole, trimmed to the topic's budget or, when even
        trimmed it cannot fit, an `output_rejected` dead letter."""
        topic = self.verdict_topic
        value = orjson.dumps(document)
        key = record.key()
        if len(value) + len(key or b"") + headers_size(headers) <= self.budget(topic):  # the common case
            return _new_output((topic, value, key, headers, None, record, "verdict", 0))
        try:
            value, key = self._trim_verdict(document, key, headers)
        except OutputTooLarge as exc:
            return self._rejected("verdict", document, record, headers, str(exc), refits=0)
        return Output(topic, value, key, headers, document, record, "verdict")

    def review_item(self, topic: str, document: Document, record: Message, headers: Headers) -> Output:
        """A review item as it will be sent: whole, or with its longest texts cut to `topic`'s
        budget (named in its `truncated`), or, when even that cannot fit, an `output_rejected`
        dead letter, so the record still ends in an output that says why no review opened."""
        value = orjson.dumps(document)
        key = record.key()
        if len(value) + len(key or b"") + headers_size(headers) <= self.budget(topic):  # the common case
            return Output(topic, value, key, headers, document, record, "review_item")
        try:
            value, key = self._trim_review_item(topic, document, key, headers)
        except OutputTooLarge as exc:
            return self._rejected("review_item", document, record, headers, str(exc), refits=0)
        return Output(topic, value, key, headers, document, record, "review_item")

    def dead_letter(self, document: Document, record: Message, headers: Headers) -> Output:
        """The dead letter as it will be sent: whole, or abbreviated to the topic's budget."""
        topic = self.dead_letter_topic
        value = orjson.dumps(document)
        key = record.key()
        if len(value) + len(key or b"") + headers_size(headers) <= self.budget(topic):
            return Output(topic, value, key, headers, document, record, "dead_letter")
        try:
            value, key = self._abbreviate(document, key, headers, minimal=False)
        except OutputTooLarge as exc:
            raise OutputRefused(str(exc)) from None
        return Output(topic, value, key, headers, document, record, "dead_letter")

    def smaller(self, refused: Output, reason: str, size: bool) -> Output:
        """The next, smaller output for a record whose output the broker refused for a reason of
        the record's own: `size` True for a size error, else e.g. an invalid record. Raises
        OutputRefused when nothing smaller is left."""
        refits = refused.refits + size
        if size:
            self.refresh(refused.topic)
        document = self.document(refused)
        if refused.kind == "verdict" and size and refused.refits == 0:
            return self.verdict(document, refused.record, refused.headers)._replace(refits=refits)
        if refused.kind == "review_item" and size and refused.refits == 0:
            return self.review_item(refused.topic, document, refused.record, refused.headers)._replace(refits=refits)
        if refused.kind in ("verdict", "review_item"):
            return self._rejected(refused.kind, document, refused.record, refused.headers,
                                  f"the broker refused it: {reason}", refits)  # fmt: skip
        if refused.kind == "dead_letter":
            try:
                value, key = self._abbreviate(document, refused.record.key(), refused.headers, minimal=True)
            except OutputTooLarge as exc:
                raise OutputRefused(f"{reason}; {exc}") from None
            return refused._replace(value=value, key=key, kind="minimal", refits=refits)
        raise OutputRefused(reason)

    def document(self, output: Output) -> Document:
        """The document `output` was made from: the one it carries, else (a verdict sent whole) its value read back."""
        return output.document if output.document is not None else orjson.loads(output.value)

    def _rejected(
        self, kind: str, document: Document, record: Message, headers: Headers, why: str, refits: int
    ) -> Output:
        what = kind.replace("_", " ")
        letter = dead_letter(
            record, ErrorType.OUTPUT_REJECTED, f"this record's {what} could not be delivered: {why}",
            event_id=document.get("event_id") or (document.get("event") or {}).get("event_id"),
        )  # fmt: skip
        return self.dead_letter(letter, record, headers)._replace(refits=refits)

    def _fit_key(self, topic: str, key: bytes | None) -> bytes | None:
        if key is not None and len(key) > self.budget(topic) // 8:
            return hashlib.sha256(key).hexdigest().encode()
        return key

    def _trim_verdict(self, document: Document, key: bytes | None, headers: Headers) -> tuple[bytes, bytes | None]:
        topic = self.verdict_topic
        original_bytes = len(orjson.dumps(document)) + len(key or b"") + headers_size(headers)
        cut: list[str] = []
        fitted_key = self._fit_key(topic, key)
        if fitted_key != key:
            cut.append("key")
        room = self.budget(topic) - len(fitted_key or b"") - headers_size(headers) - _CUT_RESERVE
        results = [dict(r) for r in document["results"]]
        trimmed = {**document, "results": results}
        size = len(orjson.dumps(trimmed))
        for field in ("reasoning", "rationale"):
            if size <= room:
                break
            if _cut_texts(results, field, size - room):
                cut.append(field)
                size = len(orjson.dumps(trimmed))
        omitted = 0
        if size > room:
            # Many policies: leave out whole results, those without a violation first, from the end.
            order = sorted(range(len(results)), key=lambda i: (results[i]["violation"], -i))
            dropped = set()
            for i in order:
                if size <= room:
                    break
                dropped.add(i)
                size -= len(orjson.dumps(results[i])) + 1
            trimmed["results"] = [r for i, r in enumerate(results) if i not in dropped]
            omitted = len(dropped)
            cut.append("results")
        trimmed["truncated"] = {"cut": cut, "original_bytes": original_bytes, "results_omitted": omitted}
        value = orjson.dumps(trimmed)
        if len(value) > room + _CUT_RESERVE:
            raise OutputTooLarge(f"a verdict of {original_bytes} bytes cannot be cut to {room + _CUT_RESERVE}")
        return value, fitted_key

    def _trim_review_item(
        self, topic: str, document: Document, key: bytes | None, headers: Headers
    ) -> tuple[bytes, bytes | None]:
        """Cut, in order, until the item fits: the machine answers' reasoning and rationales, the
        conversation context (oldest messages first), then the content itself. The item's
        `source` lets a reviewer fetch the whole record while the topic retains it."""
        fitted_key = self._fit_key(topic, key)
        room = self.budget(topic) - len(fitted_key or b"") - headers_size(headers) - _CUT_RESERVE
        event = dict(document["event"])
        context = list(event.get("context") or [])
        event["context"] = context
        answers = [dict(document["machine"])] + [dict(r) for r in document.get("other_results") or []]
        second = dict(document["second_opinion"]) if document.get("second_opinion") else None
        item = {**document, "event": event, "machine": answers[0], "other_results": answers[1:]}
        if second is not None:
            item["second_opinion"] = second
            answers.append(second)
        cut: list[str] = ["key"] if fitted_key != key else []
        size = len(orjson.dumps(item))
        for field in ("reasoning", "rationale"):
            if size > room and _cut_texts(answers, field, size - room):
                cut.append(field)
                size = len(orjson.dumps(item))
        if size > room and context:
            while context and size > room:
                size -= len(orjson.dumps(context.pop(0))) + 1
            cut.append("context")
            size = len(orjson.dumps(item))
        if size > room:
            content = event["content"].encode()
            event["content"] = content[: max(0, len(content) - (size - room))].decode(errors="ignore")
            cut.append("content")
        item["truncated"] = cut
        value = orjson.dumps(item)
        if len(value) > room + _CUT_RESERVE:
            raise OutputTooLarge(f"a review item cannot be cut below {len(value)} bytes; the budget is {room}")
        return value, fitted_key

    def _abbreviate(
        self, document: Document, key: bytes | None, headers: Headers, minimal: bool
    ) -> tuple[bytes, bytes | None]:
        topic = self.dead_letter_topic
        fitted_key = self._fit_key(topic, key)
        room = self.budget(topic) - len(fitted_key or b"") - headers_size(headers)
        original = dict(document["original"])
        error = dict(document["error"])
        letter = {**document, "original": original, "error": error}
        value = orjson.dumps(letter)
        for field in ("value", "headers", "key"):
            if len(value) <= room and not minimal:
                return value, fitted_key
            if _cut_original(original, field, None if minimal else len(value) - room + _CUT_RESERVE):
                value = orjson.dumps(letter)
        for name in ("raw_output", "message"):
            text = error.get(name)
            if text and (minimal or len(value) > room):
                keep = _MINIMAL_TEXT_CHARS if minimal else max(0, len(text) - (len(value) - room))
                error[name] = text[: min(keep, len(text))]
                value = orjson.dumps(letter)
        if len(value) > room:
            raise OutputTooLarge(f"a dead letter cannot be cut below {len(value)} bytes; the budget is {room}")
        return value, fitted_key

    # -- reading the topics' limits ---------------------------------------------------------------

    def _describe_configs(self, topics: list[str]) -> dict[str, int | None]:
        from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

        admin = AdminClient({k: v for k, v in self._producer_config.items() if not callable(v)})
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics], request_timeout=10)
        found: dict[str, int | None] = {}
        for resource, future in futures.items():
            try:
                found[resource.name] = int(future.result(timeout=15)["max.message.bytes"].value)
            except (KafkaException, KeyError, ValueError, TimeoutError) as exc:
                # Missing (perhaps auto-created later) or no DescribeConfigs permission: assume Kafka's default.
                log.warning("cannot read max.message.bytes of topic %r (%s); assuming %d",
                            resource.name, exc, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)  # fmt: skip
                found[resource.name] = None
        return found


def _cut_texts(results: list[Document], field: str, over: int) -> bool:
    """Shorten `field` of the results, longest first, by at least `over` bytes in all (each
    character cut saves at least one byte of JSON); True if anything was cut."""
    cut = False
    for result in sorted((r for r in results if r.get(field)), key=lambda r: -len(r[field])):
        if over <= 0:
            break
        text = result[field]
        keep = max(0, len(text) - over)
        result[field] = text[:keep] or None
        over -= len(text) - keep
        cut = True
    return cut


def _cut_original(original: Document, field: str, over: int | None) -> bool:
    """Cut one field of a dead letter's `original` by at least `over` bytes of JSON (None: all
    of it), recording its size and sha256; True if anything was cut."""
    if field == "headers":
        if not original["headers"]:
            return False
        whole = orjson.dumps(original["headers"])
        original["headers"] = []
        original["headers_cut"] = {"size": len(whole), "kept": 0, "sha256": hashlib.sha256(whole).hexdigest()}
        original["truncated"] = True
        return True
    encoded = original[f"{field}_b64"]
    if not encoded or original.get(f"{field}_cut"):
        return False
    raw = base64.b64decode(encoded)
    kept = 0 if over is None else max(0, len(encoded) - over) // 4 * 3
    original[f"{field}_b64"] = base64.b64encode(raw[:kept]).decode("ascii")
    original[f"{field}_cut"] = {"size": len(raw), "kept": kept, "sha256": hashlib.sha256(raw).hexdigest()}
    original["truncated"] = True
    return True
