"""Policy evaluation: figures computed from a known confusion matrix, and version comparison."""

import asyncio

from consumer.classify.evaluate import changed, evaluate, markdown_report
from consumer.classify.keyword import KeywordClassifier
from consumer.policy import parse_policy
from consumer.policy.examples import load_examples
from tests.conftest import REPO

POLICY_TEXT = (REPO / "policies" / "chat-harassment.md").read_text()
DATA = REPO / "tests" / "data" / "harassment-labelled.jsonl"


def run(policy_text: str):
    return asyncio.run(evaluate(KeywordClassifier(), parse_policy(policy_text.encode()), load_examples(DATA)))


def test_figures_match_the_confusion_matrix():
    # Patterns: kys, kill yourself, nobody wants you here. Flags a1, a2 (true), b2 (false); misses a3, a4.
    result = run(POLICY_TEXT)
    assert (result.tp, result.fp, result.fn, result.tn) == (2, 1, 2, 4)
    assert abs(result.precision - 2 / 3) < 1e-9
    assert abs(result.recall - 2 / 4) < 1e-9
    assert abs(result.f1 - 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)) < 1e-9
    assert sorted(o.example.id for o in result.disagreements) == ["a3", "a4", "b2"]
    report = markdown_report(result)
    assert "| labelled violation | 2 | 2 |" in report and "| labelled safe | 1 | 4 |" in report
    assert "`b2` label 0, predicted 1" in report and "matched pattern" in report


def test_comparing_two_versions_lists_the_examples_that_changed():
    before = run(POLICY_TEXT)
    after = run(POLICY_TEXT.replace("patterns:\n", "patterns:\n  - 'everyone hates you'\n"))
    assert after.policy.version != before.policy.version
    assert [(b.example.id, b.predicted, a.predicted) for b, a in changed(before, after)] == [("a3", False, True)]
    report = markdown_report(after, before)
    assert "- `a3` label 1: 0 -> 1" in report
    assert "recall 0.500 -> 0.750" in report
