"""Evaluate a policy on labelled examples: precision, recall, F1, and every disagreement.

"Analyse the rationale to improve the policy": each disagreement is listed with the
classifier's rationale, and two versions of a policy run over the same data show which
examples changed their answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from consumer.classify import ClassificationFailed, Classifier, ClassifyRequest
from consumer.events import ContentEvent
from consumer.policy import Policy
from consumer.policy.examples import Example


@dataclass(frozen=True)
class Outcome:
    example: Example
    predicted: bool | None  # None: the classifier could not decide (dead letter)
    category: str | None = None
    rationale: str | None = None
    error: str | None = None


@dataclass
class Evaluation:
    policy: Policy
    outcomes: list[Outcome] = field(default_factory=list)

    def _count(self, label: bool, predicted: bool) -> int:
        return sum(1 for o in self.outcomes if o.example.label is label and o.predicted is predicted)

    @property
    def tp(self) -> int:
        return self._count(True, True)

    @property
    def fp(self) -> int:
        return self._count(False, True)

    @property
    def fn(self) -> int:
        return self._count(True, False)

    @property
    def tn(self) -> int:
        return self._count(False, False)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.predicted is None)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def disagreements(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.predicted is not o.example.label]


async def evaluate(classifier: Classifier, policy: Policy, examples: list[Example], concurrency: int = 32) -> Evaluation:
    slots = asyncio.Semaphore(min(concurrency, classifier.capacity().max_sequences))

    async def one(example: Example) -> Outcome:
        event = ContentEvent(event_id=example.id, content=example.content)
        async with slots:
            try:
                result = await classifier.classify(ClassifyRequest(event, policy, request_id=f"eval/{example.id}"))
            except ClassificationFailed as exc:
                return Outcome(example, None, error=f"{exc.error_type.value}: {exc}")
        return Outcome(example, result.violation, result.category, result.rationale)

    return Evaluation(policy, list(await asyncio.gather(*(one(e) for e in examples))))


def training_overlap(policy: Policy, examples: list[Example]) -> int:
    """How many evaluation examples the classifier may have learned from: the policy's own
    EXAMPLES section and its `<name>.examples.jsonl` (the cascade trains on both), compared by
    normalised content. A score on them measures memory, not the policy."""
    from consumer.policy.examples import examples_path, load_examples, section_examples

    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    seen = {norm(e.content) for e in section_examples(policy.text)}
    path = examples_path(policy)
    if path is not None:
        try:
            seen.update(norm(e.content) for e in load_examples(path))
        except (OSError, ValueError):
            pass  # an unreadable training file is the cascade's problem, not the evaluation's
    return sum(norm(e.content) in seen for e in examples)


def changed(before: Evaluation, after: Evaluation) -> list[tuple[Outcome, Outcome]]:
    """Examples whose prediction differs between two evaluations of the same data."""
    return [(b, a) for b, a in zip(before.outcomes, after.outcomes) if b.predicted is not a.predicted]


def markdown_report(evaluation: Evaluation, baseline: Evaluation | None = None) -> str:
    e = evaluation
    lines = [
        f"# Evaluation of policy `{e.policy.id}` version `{e.policy.version}`",
        "",
        f"{len(e.outcomes)} examples; {e.failed} could not be classified.",
        "",
        "| precision | recall | F1 |",
        "|---|---|---|",
        f"| {e.precision:.3f} | {e.recall:.3f} | {e.f1:.3f} |",
        "",
        "## Confusion matrix",
        "",
        "| | predicted violation | predicted safe |",
        "|---|---|---|",
        f"| labelled violation | {e.tp} | {e.fn} |",
        f"| labelled safe | {e.fp} | {e.tn} |",
        "",
        "## Disagreements",
        "",
    ]
    if not e.disagreements:
        lines.append("None.")
    for o in e.disagreements:
        predicted = "error" if o.predicted is None else int(o.predicted)
        lines.append(f"- `{o.example.id}` label {int(o.example.label)}, predicted {predicted}: {_quote(o.example.content)}")
        lines.append(f"  - rationale: {o.rationale or o.error or '(none)'}")
    if baseline is not None:
        lines += ["", f"## Changed since version `{baseline.policy.version}`", ""]
        b = baseline
        lines.append(f"F1 {b.f1:.3f} -> {e.f1:.3f}, precision {b.precision:.3f} -> {e.precision:.3f}, "
                     f"recall {b.recall:.3f} -> {e.recall:.3f}.")
        lines.append("")
        diffs = changed(baseline, evaluation)
        if not diffs:
            lines.append("No example changed its answer.")
        for before, after in diffs:
            lines.append(
                f"- `{after.example.id}` label {int(after.example.label)}: {_answer(before)} -> {_answer(after)}: "
                f"{_quote(after.example.content)}"
            )
            lines.append(f"  - before: {before.rationale or before.error or '(none)'}")
            lines.append(f"  - after: {after.rationale or after.error or '(none)'}")
    return "\n".join(lines) + "\n"


def _answer(outcome: Outcome) -> str:
    return "error" if outcome.predicted is None else str(int(outcome.predicted))


def _quote(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return f"\"{text[:limit]}{'…' if len(text) > limit else ''}\""
