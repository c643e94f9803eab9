"""The keyword classifier: a policy's patterns, one search for content that matches none."""

from consumer.classify import ClassifyRequest
from consumer.classify.keyword import KeywordClassifier
from consumer.events import ContentEvent
from consumer.policy import Policy


def policy(patterns: list[str]) -> Policy:
    # The classifier compiles per policy version: each set of patterns is a version of its own.
    return Policy(id="p", version="|".join(patterns), text="", patterns=tuple(patterns), categories={"harassment": "x"})


def ask(classifier: KeywordClassifier, p: Policy, texts: list[str]) -> list[tuple[bool, str | None]]:
    requests = [ClassifyRequest(ContentEvent(event_id=str(i), content=t), p, str(i)) for i, t in enumerate(texts)]
    return [(c.violation, c.rationale) for c in classifier.classify_now_many(requests)]


def test_the_first_matching_pattern_is_named_whether_or_not_the_patterns_can_be_joined():
    texts = ["you should KYS", "nobody wants you here", "hello there", "abcabc", "kys kys"]
    joined = policy([r"\bkys\b", r"nobody wants you"])
    grouped = policy([r"\bkys\b", r"nobody wants you", r"(abc)\1"])  # a back-reference: not joined
    flagged = policy([r"(?i)\bkys\b"])  # global flags: joining would fail
    k = KeywordClassifier()
    assert ask(k, joined, texts) == [
        (True, "matched pattern /\\bkys\\b/"), (True, "matched pattern /nobody wants you/"),
        (False, "no pattern matched"), (False, "no pattern matched"), (True, "matched pattern /\\bkys\\b/"),
    ]  # fmt: skip
    assert [v for v, _ in ask(k, grouped, texts)] == [True, True, False, True, True]
    assert [v for v, _ in ask(k, flagged, texts)] == [True, False, False, False, True]
    assert ask(k, policy([]), ["kys"]) == [(False, "no pattern matched")]
