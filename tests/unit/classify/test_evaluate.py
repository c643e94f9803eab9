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


def test_evaluating_on_the_policys_own_examples_is_flagged():
    from consumer.classify.evaluate import training_overlap
    from consumer.policy.examples import Example, section_examples

    policy = parse_policy(POLICY_TEXT.encode())
    own = [Example(f"s{i}", e.content, bool(e.label)) for i, e in enumerate(section_examples(policy.text))]
    assert own and training_overlap(policy, own) == len(own)
    assert training_overlap(policy, load_examples(DATA)) == 0


def test_eval_on_the_terminal_counts_what_it_shows_and_compares_with_against(tmp_path):
    from tests.unit.test_config import run_cli

    edited = tmp_path / "chat-harassment.md"
    edited.write_text(POLICY_TEXT.replace("patterns:", "patterns:\n  - \"everyone hates you\"", 1))
    result = run_cli("policy", "eval", str(edited), "--data", str(DATA),
                     "--against", str(REPO / "policies" / "chat-harassment.md"), "--report", str(tmp_path / "r.md"))
    assert result.returncode == 0, result.stderr
    assert "disagreements:" in result.stdout
    assert "1 examples changed their answer from --against to this version" in result.stdout
    assert "a3 label 1: 0 -> 1 (fixed)" in result.stdout
    assert "\\\\b" not in result.stdout  # rationales quote patterns as written
