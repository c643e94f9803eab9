"""Reading gpt-oss-safeguard completions: harmony channels, then the final answer's three tiers.

The completions are written by hand in the harmony format the model produces after the
prompt's closing `<|start|>assistant`, and encoded to token ids with the real harmony
encoding, so the reader sees exactly what the engine streams.
"""

from __future__ import annotations

import pytest

pytest.importorskip("openai_harmony", reason="the answer reader needs openai_harmony (oss-harmony)")

from consumer.classify.engine.answer import Answer, CompletionReader, UnparseableAnswer, parse_answer
from consumer.classify.engine.vocab import harmony_encoding

ANALYSIS = (
    '<|channel|>analysis<|message|>The user tells another player to uninstall and "kys". '
    "That is a wish of self-harm aimed at a person: H1. Not banter; no quoting for help.<|end|>"
    "<|start|>assistant"
)


def read(completion: str, truncated: bool = False):
    """Stream the completion's tokens through the reader in small chunks, as DELTA outputs arrive."""
    encoding = harmony_encoding()
    tokens = encoding.encode(completion, allowed_special="all")
    reader = CompletionReader(encoding)
    for i in range(0, len(tokens), 3):
        if not reader.feed(tokens[i : i + 3]):
            break
    return reader.channels(truncated=truncated)


def answer_of(completion: str) -> Answer:
    channels = read(completion)
    assert channels.problem is None, channels.problem
    assert channels.final is not None
    return parse_answer(channels.final)


@pytest.mark.parametrize(("final", "violation"), [("1", True), ("0", False)])
def test_tier1_bare_digit(final: str, violation: bool) -> None:
    answer = answer_of(f"{ANALYSIS}<|channel|>final<|message|>{final}<|return|>")
    assert answer == Answer(violation=violation)


def test_tier2_violation_and_category() -> None:
    answer = answer_of(
        ANALYSIS + '<|channel|>final<|message|>{"violation": 1, "policy_category": "harassment"}<|return|>'
    )
    assert answer == Answer(violation=True, category="harassment")


def test_tier3_rules_confidence_rationale() -> None:
    final = (
        '{"violation":1,"policy_category":"harassment","rule_ids":["H1","H2"],'
        '"confidence":"high","rationale":"Tells a player to kill themselves."}'
    )
    answer = answer_of(f"{ANALYSIS}<|channel|>final<|message|>{final}<|return|>")
    assert answer == Answer(
        violation=True,
        category="harassment",
        rule_ids=["H1", "H2"],
        confidence="high",
        rationale="Tells a player to kill themselves.",
    )


def test_safe_verdict_with_null_fields() -> None:
    final = '{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "medium", "rationale": null}'
    answer = answer_of(f"{ANALYSIS}<|channel|>final<|message|>{final}<|return|>")
    assert answer == Answer(violation=False, confidence="medium")


def test_json_in_code_fence_with_stray_whitespace() -> None:
    final = '\n  ```json\n{\n  "violation": 0,\n  "policy_category": "safe",\n  "rule_ids": ["S2"]\n}\n```  \n'
    answer = answer_of(f"{ANALYSIS}<|channel|>final<|message|>{final}<|return|>")
    assert answer == Answer(violation=False, category="safe", rule_ids=["S2"])


def test_final_with_constrain_json_header() -> None:
    answer = answer_of(
        ANALYSIS + '<|channel|>final <|constrain|>json<|message|>{"violation":1,"policy_category":"hate"}<|return|>'
    )
    assert answer == Answer(violation=True, category="hate")


def test_final_without_analysis() -> None:
    assert answer_of("<|channel|>final<|message|>0<|return|>") == Answer(violation=False)


def test_analysis_kept_apart_from_final() -> None:
    channels = read(ANALYSIS + "<|channel|>final<|message|>1<|return|>")
    assert channels.final == "1"
    assert channels.analysis.startswith("The user tells another player")
    assert "<|" not in channels.analysis


def test_truncated_output_has_no_answer() -> None:
    channels = read(ANALYSIS + '<|channel|>final<|message|>{"violation": 1, "policy_cat', truncated=True)
    assert channels.final is None
    assert channels.problem == "completion reached the token cap before its final answer"


def test_analysis_without_final_has_no_answer() -> None:
    channels = read("<|channel|>analysis<|message|>Thinking about whether H2 applies...<|end|>")
    assert channels.final is None
    assert channels.analysis == "Thinking about whether H2 applies..."
    assert channels.problem == "completion has no final channel"


def test_tool_call_instead_of_answer_is_a_problem() -> None:
    channels = read('<|channel|>commentary to=functions.lookup_user <|constrain|>json<|message|>{"id": 4}<|call|>')
    assert channels.problem == "model addressed a tool call to 'functions.lookup_user'"


def test_stream_that_is_not_harmony_stops_the_reader() -> None:
    encoding = harmony_encoding()
    reader = CompletionReader(encoding)
    # After a message ends, harmony allows only <|start|>: stray text is malformed.
    tokens = encoding.encode("<|channel|>analysis<|message|>hmm<|end|>stray text", allowed_special="all")
    assert reader.feed(tokens) is False
    assert reader.feed(encoding.encode("<|start|>", allowed_special="all")) is False
    assert reader.channels().problem.startswith("completion is not valid harmony")


@pytest.mark.parametrize(
    "final",
    [
        "",
        "Yes, this violates the policy.",
        'The answer is {"violation": 1}',
        '{"violation": 1, "policy_category": "harassment"',  # cut JSON that still closed the message
        '{"policy_category": "harassment"}',
        '{"violation": 2}',
        '{"violation": "yes"}',
        '{"violation": 1.0}',
        '{"violation": 1, "rule_ids": {"H1": true}}',
        '{"violation": 1, "confidence": 3}',
        "[1]",
        "```\n1\n``` and more",
    ],
)
def test_anything_else_is_rejected_with_the_raw_text(final: str) -> None:
    with pytest.raises(UnparseableAnswer) as caught:
        parse_answer(final)
    assert caught.value.raw == final


def test_lenient_on_equivalent_values() -> None:
    assert parse_answer('{"violation": true}') == Answer(violation=True)
    assert parse_answer('{"violation": "0"}') == Answer(violation=False)
    assert parse_answer("`1`") == Answer(violation=True)
    assert parse_answer('{"violation": 1, "rule_ids": "H3", "policy_category": " harassment "}') == Answer(
        violation=True, category="harassment", rule_ids=["H3"]
    )
