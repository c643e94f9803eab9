"""Cascade benchmark: a chat stream with 30% repeated spam, with and without the cascade.

The reasoner is SIMULATED: a classifier that answers each message's known label after a
fixed latency, with a fixed number of concurrent requests (default 80 ms and 8 slots, about
100 events/s, the order of one GPU running gpt-oss-safeguard with reasoning). The figures
show how much traffic the cascade keeps away from the reasoner and what that does to
throughput; they say nothing about the reasoner's own accuracy. Runs on CPU:

    python bench/cascade_bench.py                    # lexical stage
    python bench/cascade_bench.py --embedding        # plus the embedding stage (needs cascade-embedding.txt)
    python bench/cascade_bench.py --events 5000 --latency-ms 40 --slots 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from consumer.classify import Capacity, Classification, Classifier, ClassifyRequest
from consumer.classify.cascade import CascadeSettings, make_cascade
from consumer.events import ContentEvent
from consumer.policy import PolicyStore

REPO = Path(__file__).resolve().parent.parent
POLICY = "spam-scams"

# A spam campaign: a few messages, posted again and again with cosmetic changes.
SPAM = [
    "FREE NITRO for everyone who joins -> discord-gift.xyz/claim",
    "@everyone steam is giving away $50 gift cards, log in at steamcommunlty.ru/gift",
    "claim your prize now!!! you were selected: prize-claim.top/win",
    "dm me to double your bitcoin in 24h, guaranteed profit",
    "free robux generator no verification >> robux-free.win",
    "your discord account will be disabled, verify at dlscord-verify.app",
]
OPENERS = ["anyone up for", "just finished", "what do you think about", "gg, that was", "can someone explain",
           "i really liked", "who wants to try", "the mods said something about", "good morning, ready for",
           "lol, remember", "does anyone have tips for", "i'm so tired of", "finally beat", "is it just me or is",
           "hot take:", "who else is hyped for", "need two more for", "my favourite part of"]
TOPICS = ["the raid tonight", "ranked games", "the new patch", "the boss in chapter 3", "the speedrun route",
          "the art contest", "the server rules", "the lore video", "a chill duo session", "the weekly quest",
          "the tournament bracket", "the crafting update", "the soundtrack", "the new map", "the battle pass",
          "the event skins", "the healer meta", "the community night"]
ENDINGS = ["", " lol", " 😂", "?", "!", " tbh", " honestly", " haha", " ngl", " :)"]


def stream(n: int, spam_share: float, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        if rng.random() < spam_share:
            text = rng.choice(SPAM)
            if rng.random() < 0.5:  # the copies a cache must still recognise
                text = text.upper() if rng.random() < 0.5 else text.replace(" ", "  ", 1)
            events.append((text, 1))
        else:
            events.append((f"{rng.choice(OPENERS)} {rng.choice(TOPICS)}{rng.choice(ENDINGS)} #{i}", 0))
    return events


class SimulatedReasoner:
    """Answers the known label after `latency_s`, at most `slots` requests at once."""

    name = "simulated-reasoner"

    def __init__(self, labels: dict[str, int], latency_s: float, slots: int):
        self._labels = labels
        self._latency_s = latency_s
        self._slots = slots
        self.calls = 0

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self._slots)

    async def classify(self, request: ClassifyRequest) -> Classification:
        self.calls += 1
        await asyncio.sleep(self._latency_s)
        return Classification(violation=bool(self._labels[request.event.content]), model=self.name)

    async def close(self) -> None:
        return None


async def drive(classifier: Classifier, store: PolicyStore, events: list[tuple[str, int]]) -> tuple[float, int]:
    """Classify every event with as many in flight as the classifier admits, as the batcher does."""
    policy = store.get()[POLICY]
    slots = asyncio.Semaphore(classifier.capacity().max_sequences)

    async def one(i: int, text: str) -> bool:
        async with slots:
            event = ContentEvent(event_id=f"e{i}", content=text)
            verdict = await classifier.classify(ClassifyRequest(event, policy, request_id=f"e{i}"))
            return verdict.violation

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(i, text) for i, (text, _) in enumerate(events)))
    elapsed = time.perf_counter() - started
    wrong = sum(answer != bool(label) for answer, (_, label) in zip(answers, events))
    return elapsed, wrong


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--spam-share", type=float, default=0.3)
    parser.add_argument("--latency-ms", type=float, default=80.0)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--embedding", action="store_true", help="add the embedding stage")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    events = stream(args.events, args.spam_share)
    labels = dict(events)
    folder = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    for name in (f"{POLICY}.md", f"{POLICY}.examples.jsonl"):
        shutil.copy(REPO / "policies" / name, folder / name)
    store = PolicyStore(folder)
    latency_s = args.latency_ms / 1000
    print(f"{len(events)} chat events, {args.spam_share:.0%} repeated spam ({len(SPAM)} messages and copies), "
          f"policy {POLICY}")
    print(f"reasoner: SIMULATED, fixed {args.latency_ms:g} ms per request, {args.slots} at once "
          f"(at most {args.slots / latency_s:.0f} events/s)")

    alone = SimulatedReasoner(labels, latency_s, args.slots)
    elapsed, wrong = await drive(alone, store, events)
    print(f"\nreasoner alone:  {len(events) / elapsed:8.0f} events/s, 100.0% reach the reasoner")

    reasoner = SimulatedReasoner(labels, latency_s, args.slots)
    settings = CascadeSettings(embedding=args.embedding, shadow_fraction=0.02)
    cascade = make_cascade(settings, reasoner, store)
    await cascade.start()
    elapsed, wrong = await drive(cascade, store, events)
    await cascade.close()
    c = cascade.counters[POLICY]
    cheap = c.decided["lexical"] + c.decided["embedding"]
    print(f"with the cascade:{len(events) / elapsed:8.0f} events/s, {c.escalations / len(events):5.1%} reach the "
          f"reasoner (+{c.shadow_sent} shadow requests)")
    print(f"  decided by: cache {c.decided['cache']}, lexical {c.decided['lexical']}, "
          f"embedding {c.decided['embedding']}, reasoner {c.decided['reasoner']}")
    print(f"  cache hit rate {c.cache_hit_rate:.1%}; cheap-stage verdicts that differ from the label: "
          f"{wrong} of {cheap + c.decided['cache']}; shadow disagreement {c.shadow_disagreed}/{c.shadow_sent}")
    print("  calibration error (ECE, held-out folds): "
          + ", ".join(f"{k} {v:.3f}" for k, v in c.calibration_error.items() if v is not None))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
