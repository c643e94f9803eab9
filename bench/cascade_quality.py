"""Decision quality of the cascade's cheap stages on the project's labelled held-out sets.

    python -m bench.cascade_quality                     # lexical, static embedding, MiniLM
    python -m bench.cascade_quality --stages lexical    # only what needs no embedding model

For each policy with a held-out set (tests/data/cascade-*-heldout.jsonl), each stage is
trained from the policy's examples as the cascade trains it, then asked about every held-out
message in one batch: F1 of its answers (decided or not), the share it decides at the
target precision and the precision of that share; then the cascade without a reasoner
(lexical, then embedding for what lexical leaves open). docs/cascade.md holds the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from consumer.classify.cascade.examples import training_set
from consumer.classify.cascade.stage import Decision, LearnedStage, StageRules
from consumer.policy import load_policy
from consumer.policy.examples import load_examples

REPO = Path(__file__).resolve().parent.parent
SETS = {"chat-harassment": "cascade-harassment-heldout.jsonl", "spam-scams": "cascade-spam-heldout.jsonl"}
TARGET = 0.95
RULES = StageRules(min_examples=40, min_per_class=10, calibration="auto", refit_every=25, max_learned=5000)


def featurizer(name: str) -> Any:
    if name == "lexical":
        from consumer.classify.cascade.lexical import LexicalFeatures

        return LexicalFeatures()
    if name == "static":
        from consumer.classify.cascade.static import StaticEmbeddingFeatures

        return StaticEmbeddingFeatures()
    from consumer.classify.cascade.embedding import EmbeddingFeatures

    return EmbeddingFeatures()


def figures(decisions: list[Decision], labels: list[int]) -> dict[str, Any]:
    tp = sum(d.violation and y == 1 for d, y in zip(decisions, labels))
    fp = sum(d.violation and y == 0 for d, y in zip(decisions, labels))
    fn = sum(not d.violation and y == 1 for d, y in zip(decisions, labels))
    decided = [d.violation == bool(y) for d, y in zip(decisions, labels) if d.decided]
    return {
        "f1": round(2 * tp / (2 * tp + fp + fn), 3) if tp else 0.0,
        "decided": f"{len(decided)}/{len(labels)}",
        "decided_share": round(len(decided) / len(labels), 3),
        "precision_of_decided": round(sum(decided) / len(decided), 3) if decided else None,
    }


async def evaluate(stages: list[str]) -> None:
    for policy_id, held_out in SETS.items():
        policy = load_policy(REPO / "policies" / f"{policy_id}.md")
        data = training_set(policy)
        examples = load_examples(REPO / "tests" / "data" / held_out)
        texts, labels = [e.content for e in examples], [int(e.label) for e in examples]
        answers: dict[str, list[Decision]] = {}
        for name in stages:
            stage = LearnedStage(featurizer(name), RULES, data.version)
            await stage.train(data.texts, data.labels)
            started = time.perf_counter()
            decisions = stage.decide_many(texts, TARGET)  # one batch, off any event loop here
            elapsed = time.perf_counter() - started
            assert decisions is not None, f"{name} is not calibrated for {policy_id}"
            answers[name] = decisions
            print(f"{policy_id:16} {name:8} {figures(decisions, labels)}  "
                  f"{len(texts) / elapsed:.0f} texts/s (one batch of {len(texts)})")
        for embedding in [s for s in stages if s != "lexical"]:
            if "lexical" not in answers:
                continue
            combined = [lex if lex.decided else emb for lex, emb in zip(answers["lexical"], answers[embedding])]
            print(f"{policy_id:16} lexical+{embedding:<8} {figures(combined, labels)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cascade_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="lexical,static,minilm", help="of lexical, static, minilm")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(evaluate([s for s in args.stages.split(",") if s]))


if __name__ == "__main__":
    main()
