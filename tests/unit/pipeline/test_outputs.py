"""The output documents are the pydantic contracts' JSON, exactly (consumer.pipeline.outputs)."""

from __future__ import annotations

import orjson
import pytest

from consumer.classify import Classification
from consumer.events import DeadLetter, ErrorType, Verdict
from consumer.kafka import records
from consumer.pipeline import outputs as verdict
from consumer.policy import Policy


class FakeMessage:
    """The part of a confluent_kafka.Message the documents read."""

    def __init__(self, key=b"k", value=b'{"x": 1}', headers=None, timestamp=(1, 1_764_000_000_000)):
        self._key, self._value, self._headers, self._timestamp = key, value, headers, timestamp

    def topic(self):
        return "chat"

    def partition(self):
        return 3

    def offset(self):
        return 42

    def key(self):
        return self._key

    def value(self):
        return self._value

    def headers(self):
        return self._headers

    def timestamp(self):
        return self._timestamp


POLICY = Policy(
    id="chat-harassment", version="abc123", text="...", actions={"violation": "delete", "threats": "timeout"}
)

OUTCOMES = [
    Classification(violation=False, model="keyword"),
    Classification(
        violation=True,
        category="threats",
        rule_ids=["H2", "H3"],
        confidence="high",
        rationale="a threat",
        reasoning="because",
        model="gpt-oss-safeguard-20b",
        stage="reasoner",
        prompt_tokens=700,
        cached_tokens=600,
        completion_tokens=40,
    ),
    Classification(violation=True, model="lexical", stage="lexical"),
]


def roundtrip(model, document):
    """What a consumer of the topic sees: the bytes parsed, validated and dumped back."""
    return model.model_validate(orjson.loads(orjson.dumps(document))).model_dump(mode="json")


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("timestamp", [(1, 1_764_000_000_000), (0, -1)])
def test_a_verdict_document_is_exactly_the_verdict_models_json(outcome, timestamp):
    result = verdict.policy_result(POLICY, outcome, latency_ms=1.5)
    document = verdict.verdict(
        "e1",
        records.source_of(FakeMessage(timestamp=timestamp)),
        outcome.violation,
        result["action"],
        [result],
        author_id="u1",
        community_id=None,
        context_id="c1",
        offender_violations=2 if outcome.violation else None,
        note=None,
        latency_ms=2.25,
    )
    assert roundtrip(Verdict, document) == document
    assert document["severity"] == {"allow": "none", "delete": "medium", "timeout": "high"}[result["action"]]
    assert document["source"]["timestamp_ms"] == (timestamp[1] if timestamp[0] else None)


def test_a_verdict_without_results_and_a_note_keeps_to_the_model():
    document = verdict.verdict(
        "e2",
        records.source_of(FakeMessage()),
        False,
        "allow",
        [],
        None,
        None,
        None,
        None,
        "deleted: left the conversation",
        0.1,
    )
    assert roundtrip(Verdict, document) == document


def test_a_policy_result_takes_its_action_from_the_policy():
    assert verdict.policy_result(POLICY, OUTCOMES[1], 1.0)["action"] == "timeout"  # by category
    assert verdict.policy_result(POLICY, OUTCOMES[2], 1.0)["action"] == "delete"  # by violation
    assert verdict.policy_result(POLICY, OUTCOMES[0], 1.0)["action"] == "allow"


def test_a_result_names_its_policys_community_and_a_communitys_actions_lie_over_the_platforms():
    own = Policy(id="chat-harassment", version="c1v", text="...", community="gamers")
    result = verdict.policy_result(own, OUTCOMES[1], 1.0)
    assert (result["policy_id"], result["policy_version"], result["policy_community"]) == ("chat-harassment", "c1v",
                                                                                         "gamers")  # fmt: skip
    assert verdict.policy_result(POLICY, OUTCOMES[1], 1.0)["policy_community"] is None  # a platform policy
    document = verdict.verdict("e1", records.source_of(FakeMessage()), True, "allow", [result], "u1", "gamers", None,
                               None, None, 1.0)  # fmt: skip
    assert roundtrip(Verdict, document) == document
    # `actions`: the platform policy's map with the event's community's baseline_actions laid over it.
    laid = {**POLICY.actions, "threats": "allow", "review": "escalate"}
    assert verdict.policy_result(POLICY, OUTCOMES[1], 1.0, laid)["action"] == "allow"
    assert verdict.policy_result(POLICY, OUTCOMES[2], 1.0, laid)["action"] == "delete"  # not overridden
    guess = Classification(violation=True, model="cascade:lexical:undecided", stage="undecided")
    assert verdict.policy_result(POLICY, guess, 1.0, laid)["action"] == "escalate"


def test_an_undecided_result_takes_the_policys_review_action_not_the_verdicts():
    # The guess says "violation" (delete under this policy); nothing downstream should punish on it.
    guess = Classification(violation=True, category="harassment", confidence="0.504",
                           model="cascade:lexical:undecided", stage="undecided")  # fmt: skip
    assert POLICY.action_for(True, "harassment") != POLICY.review_action
    assert verdict.policy_result(POLICY, guess, 1.0)["action"] == POLICY.review_action
    held = Policy(id="p", version="v1", text="", actions={"review": "escalate"})
    assert verdict.policy_result(held, guess, 1.0)["action"] == "escalate"


@pytest.mark.parametrize(
    ("key", "value", "headers", "raw_output", "event_id"),
    [
        (b"k", b'{"content": 1}', None, None, None),
        (None, None, [], "the model said: maybe", "e1"),
        (b"\x00", b"x" * 3000, [("a", b""), ("b", None), ("\u00e9", b"\xff")], None, "e2"),
    ],
)
def test_a_dead_letter_document_is_exactly_the_dead_letter_models_json(key, value, headers, raw_output, event_id):
    message = FakeMessage(key=key, value=value, headers=headers)
    document = records.dead_letter(message, ErrorType.UNPARSEABLE_OUTPUT, "no answer", event_id, raw_output, 3)
    assert roundtrip(DeadLetter, document) == document
    assert DeadLetter.model_validate(document).model_dump(mode="json") == document


def test_a_dead_letter_document_keeps_the_original_bytes():
    message = FakeMessage(key=None, value=b"\xff\x00", headers=[("traceparent", b"00-x"), ("empty", None)])
    document = records.dead_letter(message, ErrorType.INVALID_ENCODING, "not UTF-8", raw_output=None)
    letter = DeadLetter.model_validate(orjson.loads(orjson.dumps(document)))
    assert letter.original.value_bytes() == b"\xff\x00" and letter.original.key_bytes() is None
    assert letter.original.headers[1] == ("empty", None)
    assert roundtrip(DeadLetter, document) == document
