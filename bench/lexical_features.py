"""The lexical stage's features alone: µs per message of `ngram_counts` on the bench's chat messages.

No Kafka, one process, the main thread's CPU clock. Where `_ngrams.c` was compiled, its numpy
fallback is measured beside it, and so is a head's product (`stage._Weights.scores`: a
chat-harassment head trained from its examples, on the same batches' rows), compiled and numpy.
And a head's scores as the cascade's decisions make them, from the texts in one pass
(`hashing.ngram_scores`, no rows made), against the counts and the compiled product; and the
lexical cascade's instant answers to the messages as a stream of poll batches
(`classify_now_many`), with the undecided answers and the scores it keeps of repeated texts, with
the scores alone, and without either.
`--baseline CHECKOUT` loads another checkout's `consumer/classify/cascade/hashing.py` too; all
sides alternate round by round and must build the same matrix (checked first), so the ratios are
measured side by side:

    python -m bench.lexical_features
    git worktree add /tmp/base main && python -m bench.lexical_features --baseline /tmp/base --batch 200
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import orjson

from bench.checkouts import compiled_ngrams
from bench.workload import REPO, chat_events
from consumer.classify.cascade import CascadeSettings, hashing, stage
from consumer.classify.cascade.examples import training_set
from consumer.classify.cascade.lexical import N_FEATURES, LexicalFeatures
from consumer.policy import load_policy


def load(checkout: Path) -> ModuleType:
    path = checkout / "consumer" / "classify" / "cascade" / "hashing.py"
    spec = importlib.util.spec_from_file_location("baseline_hashing", path)
    if not path.is_file() or spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {checkout}: no {path.relative_to(checkout)} there (give a checkout of this repo)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Its import of `_ngrams` found this checkout's build: give it its own (or its numpy fallback).
    module._ngrams = compiled_ngrams(checkout)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="chat messages, as the pipeline bench makes them")
    parser.add_argument("--batch", type=int, default=200, help="messages per call, as a poll batch asks")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median and range are printed")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured side by side")
    args = parser.parse_args()

    texts = [orjson.loads(value)["content"] for _, value in chat_events(args.messages)]
    this = "this checkout" + (" (compiled)" if hashing._ngrams is not None else " (numpy: _ngrams.c not compiled)")
    sides: dict[str, Callable[[list[str], int], Any]] = {this: hashing.ngram_counts}
    if hashing._ngrams is not None:
        sides["numpy fallback"] = hashing.numpy_ngram_counts
    if args.baseline:
        baseline = load(args.baseline)
        sides["baseline" + (" (compiled)" if baseline._ngrams is not None else " (numpy)")] = baseline.ngram_counts
    mine = hashing.ngram_counts(texts[:1000], N_FEATURES)
    for name, side in sides.items():
        theirs = side(texts[:1000], N_FEATURES)
        if (mine != theirs).nnz or not (mine.indices == theirs.indices).all():
            raise SystemExit(f"{name} builds different features from this checkout's: nothing to compare")
    print(f"{len(texts)} chat messages, {sum(map(len, texts)) / len(texts):.0f} characters on average, "
          f"{args.batch} a call, {args.rounds} rounds")  # fmt: skip
    figures: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            started = time.thread_time()
            for i in range(0, len(texts), args.batch):
                side(texts[i : i + args.batch], N_FEATURES)
            figures[name].append((time.thread_time() - started) / len(texts) * 1e6)
    width = max(map(len, sides))
    for name, rounds in figures.items():
        print(f"{name:{width}s} {statistics.median(rounds):6.2f} µs a message "
              f"(rounds {min(rounds):.2f}-{max(rounds):.2f})")  # fmt: skip
    for name in list(sides)[1:]:
        ratios = [a / b for a, b in zip(figures[this], figures[name])]
        print(f"this checkout / {name}, round by round: {statistics.median(ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    if stage._ngrams is not None:
        products(texts, args.batch, args.rounds)


def products(texts: list[str], batch: int, rounds: int) -> None:
    """A trained head's scores of each batch's rows: the compiled product against numpy's."""
    policy = load_policy(REPO / "policies" / "chat-harassment.md")
    data = training_set(policy)
    learned = stage.LearnedStage(LexicalFeatures(), stage.StageRules.of(CascadeSettings()), data.version)
    asyncio.run(learned.train(data.texts, data.labels))
    weights = learned._fitted.weights  # type: ignore[union-attr]
    batches = [hashing.ngram_counts(texts[i : i + batch], N_FEATURES) for i in range(0, len(texts), batch)]
    compiled = stage._ngrams
    times: dict[str, list[float]] = {"compiled": [], "numpy": []}
    for _ in range(rounds):
        for name in times:
            stage._ngrams = compiled if name == "compiled" else None
            started = time.thread_time()
            for rows in batches:
                weights.scores(rows)
            times[name].append((time.thread_time() - started) / len(texts) * 1e6)
    stage._ngrams = compiled
    print_side_by_side(f"a head's product ({len(weights.columns)} of {weights.size} columns):", times)
    from_texts(texts, batch, rounds, weights)


def from_texts(texts: list[str], batch: int, rounds: int, weights: stage._Weights) -> None:
    """The head's scores of each batch of texts as the cascade's decisions make them: in one pass
    over the texts (`ngram_scores`) against the compiled counts and product."""
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    ways = {
        "from the texts": lambda chunk: hashing.ngram_scores(
            chunk, N_FEATURES, weights.present, weights.before, weights.padded
        ),
        "counts and product": lambda chunk: weights.scores(hashing.ngram_counts(chunk, N_FEATURES)),
    }
    apart = max(float(abs(ways["from the texts"](c) - ways["counts and product"](c)).max()) for c in chunks[:20])
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            started = time.thread_time()
            for chunk in chunks:
                way(chunk)
            times[name].append((time.thread_time() - started) / len(texts) * 1e6)
    print_side_by_side(f"the head's scores of the texts (the most they differ: {apart:.1e}):", times)
    decisions(texts, batch, rounds)


def decisions(texts: list[str], batch: int, rounds: int) -> None:
    """The lexical cascade as the pipeline bench's case makes it (no reasoner), answering the
    messages under chat-harassment a poll batch at a time (`classify_now_many`): with the undecided
    answers it keeps (`cache.UndecidedAnswers`) and its score memo (`stage.ScoreMemo`), with the
    score memo alone, and without either; each round a fresh cascade, the stream's first fifth
    not timed (the verdict cache and the memos fill as in a running stream). All must give the
    same answers."""
    from bench.cases import cpu_classifier
    from consumer.classify import ClassifyRequest
    from consumer.events import ContentEvent
    from consumer.policy import PolicyStore

    policy = PolicyStore(REPO / "policies").get()["chat-harassment"]
    events = [ContentEvent(event_id=f"e{i}", content=text) for i, text in enumerate(texts)]
    requests = [ClassifyRequest(event, policy, event.event_id) for event in events]
    batches = [requests[i : i + batch] for i in range(0, len(requests), batch)]
    warm = len(batches) // 5

    async def answered(kept_answers: bool, kept_scores: bool) -> tuple[float, list[Any]]:
        cascade = cpu_classifier("cascade-lexical")
        await cascade.start()
        if not kept_answers:
            cascade._undecided_answers = None
        if not kept_scores:
            cascade._scored = None
        answers = [a for b in batches[:warm] for a in cascade.classify_now_many(b)]
        started = time.thread_time()
        for b in batches[warm:]:
            answers.extend(cascade.classify_now_many(b))
        return (time.thread_time() - started) / sum(map(len, batches[warm:])) * 1e6, answers

    ways = {"answers and scores kept": (True, True), "scores kept": (False, True), "neither": (False, False)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    found: dict[str, list[Any]] = {}
    for _ in range(rounds):
        for name, kept in ways.items():
            took, found[name] = asyncio.run(answered(*kept))
            times[name].append(took)
        if any(answers != found["neither"] for answers in found.values()):
            raise SystemExit("the cascade answers differently with what it keeps: nothing to compare")
    print_side_by_side(f"the lexical cascade's instant answers, a stream of {len(texts)} requests "
                       f"(the first {warm * batch} not timed):", times)  # fmt: skip


def print_side_by_side(title: str, times: dict[str, list[float]]) -> None:
    """Each way's median and range, and each way's time over the last one's, round by round."""
    print(title)
    width = max(map(len, times))
    for name, figures in times.items():
        print(f"  {name:{width}s} {statistics.median(figures):6.3f} µs a message "
              f"(rounds {min(figures):.3f}-{max(figures):.3f})")  # fmt: skip
    *others, last = times
    for name in others:
        ratios = [a / b for a, b in zip(times[name], times[last])]
        print(f"  {name} / {last}, round by round: {statistics.median(ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
