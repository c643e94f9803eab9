"""Every output fits its topic (consumer.kafka.budget): verdicts trimmed, dead letters abbreviated.

The topics' limits come from a stand-in for describe_configs here; the integration tests
(tests/integration/test_oversized_records.py) read them from the real broker.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone

import orjson
import pytest

from consumer.classify import Classification
from consumer.events import (
    DeadLetter,
    ErrorType,
    MachineResult,
    ReviewContextMessage,
    ReviewEvent,
    ReviewItem,
    SourceRecord,
    Verdict,
)
from consumer.kafka import records
from consumer.kafka.budget import (
    MIN_DEAD_LETTER_BYTES,
    OutputBudget,
    OutputRefused,
    headers_size,
    margin,
)
from consumer.pipeline import outputs as verdict
from consumer.policy import Policy
from consumer.schemas import render_schemas
from tests.unit.pipeline.test_outputs import FakeMessage

TRACE = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
POLICY = Policy(id="chat-harassment", version="abc123", text="...", actions={"violation": "delete"})


def budget(verdict_max: int | None = None, letter_max: int | None = None, producer: dict | None = None) -> OutputBudget:
    limits = {"out.verdicts": verdict_max, "out.dlq": letter_max}
    loaded = OutputBudget(producer or {}, "out.verdicts", "out.dlq", describe=lambda topics: {t: limits[t] for t in topics})
    loaded.load()
    return loaded


def a_verdict(*outcomes: Classification) -> dict:
    results = [verdict.policy_result(POLICY, outcome, 1.0) for outcome in outcomes]
    return verdict.verdict("e1", records.source_of(FakeMessage()), any(r["violation"] for r in results), "delete",
                           results, "u1", None, "c1", None, None, 2.0)  # fmt: skip


def size_of(output) -> int:
    return len(output.value) + len(output.key or b"") + headers_size(output.headers)


def valid_against_schema(name: str, value: bytes) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(orjson.loads(value), json.loads(render_schemas()[f"{name}.schema.json"]))


def test_the_budget_is_the_smaller_of_the_topic_and_producer_limits_less_framing():
    default = budget()  # nothing readable: Kafka's and librdkafka's defaults
    assert default.budget("out.verdicts") == 1_000_000 - margin(1_000_000)
    small_topic = budget(verdict_max=50_000, producer={"message.max.bytes": 2_000_000})
    assert small_topic.budget("out.verdicts") == 50_000 - margin(50_000)
    assert small_topic.batch_size() == 50_000 - margin(50_000)  # a batch never outgrows the smaller topic


def test_a_verdict_that_fits_is_sent_byte_for_byte():
    document = a_verdict(Classification(violation=True, rationale="short", model="m"))
    output = budget().verdict(document, FakeMessage(), TRACE)
    assert output.value == orjson.dumps(document) and output.key == b"k" and output.kind == "verdict"


def test_a_long_reasoning_is_cut_first_and_the_rationale_kept():
    document = a_verdict(Classification(violation=True, rationale="because " * 100, reasoning="think " * 20_000,
                                        model="m"))  # fmt: skip
    fitting = budget(verdict_max=60_000)
    output = fitting.verdict(document, FakeMessage(), TRACE)
    assert size_of(output) <= fitting.budget("out.verdicts")
    sent = Verdict.model_validate_json(output.value)
    assert sent.truncated is not None and sent.truncated.cut == ["reasoning"]
    assert sent.truncated.original_bytes > 120_000 and sent.truncated.results_omitted == 0
    assert sent.results[0].rationale == "because " * 100  # untouched: the reasoning was enough
    assert sent.results[0].reasoning and ("think " * 20_000).startswith(sent.results[0].reasoning)
    valid_against_schema("verdict", output.value)


def test_then_the_rationales_longest_first():
    document = a_verdict(
        Classification(violation=True, rationale="r" * 200_000, reasoning="x" * 10_000, model="m"),
        Classification(violation=False, rationale="kept whole", model="m"),
    )
    fitting = budget(verdict_max=100_000)
    output = fitting.verdict(document, FakeMessage(), TRACE)
    sent = Verdict.model_validate_json(output.value)
    assert size_of(output) <= fitting.budget("out.verdicts")
    assert sent.truncated.cut == ["reasoning", "rationale"]
    assert sent.results[0].reasoning is None and 0 < len(sent.results[0].rationale) < 200_000
    assert sent.results[1].rationale == "kept whole"


def test_many_policies_leave_out_results_without_a_violation_first():
    outcomes = [Classification(violation=i % 10 == 0, rule_ids=[f"R{j}" for j in range(50)], model="m")
                for i in range(400)]  # fmt: skip
    document = a_verdict(*outcomes)
    fitting = budget(verdict_max=120_000)
    output = fitting.verdict(document, FakeMessage(), TRACE)
    sent = Verdict.model_validate_json(output.value)
    assert size_of(output) <= fitting.budget("out.verdicts")
    assert sent.truncated.cut == ["results"] and sent.truncated.results_omitted == 400 - len(sent.results)
    assert sum(r.violation for r in sent.results) == 40  # every violation kept
    assert sent.violation is True and sent.action == "delete"  # the overall call counts all results


def test_a_dead_letter_of_two_megabytes_is_abbreviated_with_sizes_hashes_and_coordinates():
    value = bytes(range(256)) * 8192  # 2 MiB
    message = FakeMessage(key=b"user-7", value=value, headers=[("origin", b"\x00\x01")])
    letter = records.dead_letter(message, ErrorType.PAYLOAD_TOO_LARGE, "too large")
    fitting = budget()
    output = fitting.dead_letter(letter, message, TRACE)
    assert size_of(output) <= fitting.budget("out.dlq")
    sent = DeadLetter.model_validate_json(output.value)
    original = sent.original
    assert original.truncated and original.value_cut is not None
    assert original.value_cut.size == len(value) and original.value_cut.sha256 == hashlib.sha256(value).hexdigest()
    assert original.value_cut.kept == len(original.value_bytes()) > 700_000  # as much as fits
    assert value.startswith(original.value_bytes())
    assert original.key_bytes() == b"user-7" and original.headers == [("origin", base64.b64encode(b"\x00\x01").decode())]
    assert original.key_cut is None and original.headers_cut is None
    assert (sent.source.topic, sent.source.partition, sent.source.offset) == ("chat", 3, 42)
    valid_against_schema("dead-letter", output.value)


def test_a_small_dead_letter_is_sent_whole():
    message = FakeMessage(value=b"{not json")
    letter = records.dead_letter(message, ErrorType.INVALID_JSON, "not JSON")
    output = budget().dead_letter(letter, message, TRACE)
    assert output.value == orjson.dumps(letter)
    assert DeadLetter.model_validate_json(output.value).original.truncated is False


def test_a_key_too_large_for_the_budget_is_replaced_by_its_sha256_and_cut_in_the_dead_letter():
    key = b"k" * 900_000  # its base64 alone is over budget: value, headers and key are all cut
    message = FakeMessage(key=key, value=b"x" * 600_000, headers=[("h", b"v" * 100_000)])
    letter = records.dead_letter(message, ErrorType.INVALID_JSON, "not JSON")
    fitting = budget()
    output = fitting.dead_letter(letter, message, TRACE)
    assert output.key == hashlib.sha256(key).hexdigest().encode()
    assert size_of(output) <= fitting.budget("out.dlq")
    original = DeadLetter.model_validate_json(output.value).original
    assert original.value_cut.kept == 0 and original.headers == [] and original.headers_cut.kept == 0
    assert original.key_cut.size == len(key) and key.startswith(original.key_bytes())


def test_a_refused_output_gets_smaller_step_by_step_until_nothing_smaller_is_left():
    message = FakeMessage(value=b'{"event_id": "e1", "content": "hi"}')
    document = a_verdict(Classification(violation=False, rationale="fine", model="m"))
    fitting = budget()
    sent = fitting.verdict(document, message, TRACE)
    again = fitting.smaller(sent, "Broker: Message size too large", size=True)  # re-read, trimmed again
    assert again.kind == "verdict" and again.refits == 1
    letter = fitting.smaller(again, "Broker: Message size too large", size=True)
    assert letter.kind == "dead_letter" and letter.topic == "out.dlq"
    body = DeadLetter.model_validate_json(letter.value)
    assert body.error.type == ErrorType.OUTPUT_REJECTED and "Message size too large" in body.error.message
    assert body.event_id == "e1" and body.original.value_bytes() == message.value()
    minimal = fitting.smaller(letter, "Broker: Invalid record", size=False)
    body = DeadLetter.model_validate_json(minimal.value)
    assert minimal.kind == "minimal" and body.original.truncated and body.original.value_cut.kept == 0
    assert len(minimal.value) < MIN_DEAD_LETTER_BYTES
    with pytest.raises(OutputRefused):
        fitting.smaller(minimal, "Broker: Invalid record", size=False)


def test_an_invalid_record_verdict_becomes_a_dead_letter_at_once():
    document = a_verdict(Classification(violation=False, model="m"))
    fitting = budget()
    letter = fitting.smaller(fitting.verdict(document, FakeMessage(), TRACE), "Broker: Invalid record", size=False)
    assert letter.kind == "dead_letter"


def test_a_dead_letter_topic_too_small_for_any_dead_letter_is_a_start_up_error():
    problem = budget(letter_max=3000).check(max_payload_bytes=1 << 20)
    assert problem and "kafka.dead_letter_topic 'out.dlq'" in problem and "max.message.bytes" in problem
    assert budget(verdict_max=1500).check(max_payload_bytes=1 << 20).startswith("kafka.verdict_topic")
    assert budget().check(max_payload_bytes=1 << 20) is None  # the defaults agree: abbreviation covers the rest


def a_review_item(content: str, context: int = 0, rationale: str = "why") -> dict:
    item = ReviewItem(
        review_id="r1", reason="undecided", created_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
        policy_id=POLICY.id, policy_version=POLICY.version,
        event=ReviewEvent(event_id="e1", content=content,
                          context=[ReviewContextMessage(author="user-2", content="x" * 2000) for _ in range(context)]),
        machine=MachineResult(violation=True, rationale=rationale, stage="undecided", model="lexical", action="hold"),
        source=SourceRecord.model_validate(records.source_of(FakeMessage())),
    )  # fmt: skip
    return item.model_dump(mode="json")


def review_budget(review_max: int) -> OutputBudget:
    loaded = OutputBudget({}, "out.verdicts", "out.dlq", describe=lambda topics: {t: review_max for t in topics})
    loaded.load(["out.review"])
    return loaded


def test_a_review_item_that_fits_is_sent_whole():
    item = a_review_item("you are awful")
    output = review_budget(100_000).review_item("out.review", item, FakeMessage(), TRACE)
    assert output.kind == "review_item" and orjson.loads(output.value) == item


def test_a_review_item_too_large_is_cut_rationale_then_context_then_content_and_stays_valid():
    item = a_review_item("y" * 300_000, context=20, rationale="r" * 50_000)
    fitted = review_budget(100_000)
    output = fitted.review_item("out.review", item, FakeMessage(), TRACE)
    document = orjson.loads(output.value)
    assert output.kind == "review_item" and size_of(output) <= fitted.budget("out.review")
    assert document["truncated"] == ["rationale", "context", "content"]
    assert document["review_id"] == "r1" and document["source"] == item["source"]  # the whole record's address
    assert document["event"]["content"] == "y" * len(document["event"]["content"])  # a prefix of the content
    valid_against_schema("review-item", output.value)


def test_a_refused_review_item_is_refitted_once_then_becomes_an_output_rejected_dead_letter():
    fitted = review_budget(100_000)
    output = fitted.review_item("out.review", a_review_item("hello"), FakeMessage(), TRACE)
    again = fitted.smaller(output, "Broker: Message size too large", size=True)
    assert again.kind == "review_item" and again.refits == 1
    rejected = fitted.smaller(again, "Broker: Message size too large", size=True)
    letter = orjson.loads(rejected.value)
    assert rejected.kind == "dead_letter" and rejected.topic == "out.dlq"
    assert letter["error"]["type"] == "output_rejected" and "review item" in letter["error"]["message"]


def test_a_verdict_sent_whole_holds_no_document_and_reads_it_back_from_its_value():
    """Until its delivery report an output's objects stay alive; a verdict sent whole keeps its value
    only, and a refit reads the document back from it: the same document, floats and all."""
    document = a_verdict(Classification(violation=True, category="harassment", confidence="high", rationale="é ✓"))
    document["latency_ms"] = 0.1 + 0.2  # no float's shortest form may lose a digit on the way back
    fitted = budget().verdict(document, FakeMessage(), TRACE)
    assert fitted.document is None
    assert budget().document(fitted) == document
    long = a_verdict(Classification(violation=True, reasoning="think " * 20_000, model="m"))
    trimmed = budget(verdict_max=60_000).verdict(long, FakeMessage(), TRACE)
    assert trimmed.kind == "verdict" and trimmed.document is long  # the original, to trim it again
