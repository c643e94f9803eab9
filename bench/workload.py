"""What every benchmark case shares: the input events, the instant verdict, the measurement.

Kept free of anything but orjson, pydantic (through consumer.events) and confluent-kafka, so
that the Quix Streams case can import it from its own environment.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
POLICY_ID = "chat-harassment"

_OPENERS = ["lol", "ngl", "honestly", "ok so", "wait", "bro", "yo", "hey @mira", "guys", "tbh", "omg", ""]
_BODIES = [
    "anyone up for ranked tonight? need two more for the squad",
    "that last patch completely broke the healer, they nerfed everything",
    "can someone link the tournament bracket, the pin in #events is outdated",
    "gg everyone, that comeback in the third round was insane",
    "who keeps pinging everyone at 3am, please stop",
    "selling my old keyboard, DM me if you want it, cheap",
    "the raid starts at 8 server time, bring potions and don't be late again",
    "I think the mods should add a channel for art, there is so much good stuff here",
    "you're so trash at this, uninstall",
    "nobody wants you here, leave the server already",
    "does anyone know why the bot stopped posting patch notes?",
    "just hit diamond for the first time 🎉🎉 thanks for all the tips",
    "please read the rules before posting links, last warning",
    "lmao that clip is going straight into the highlights",
    "Ich suche noch Leute für die Gilde, meldet euch",
    "quelqu'un pour jouer ce soir ? je suis dispo après 21h",
    "new video is up! feedback welcome, be honest",
    "why does the matchmaking keep putting me with people twice my level",
]
_TAILS = ["", "", "!", "?", " :)", " 😂", " fr", " smh", " idk", " lol", "..."]


@dataclass(frozen=True)
class Spec:
    """One case's job: where to read, where to write, how many events."""

    bootstrap: str
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    group: str
    events: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))


def chat_events(count: int, seed: int = 7, start_id: int = 0) -> list[tuple[bytes, bytes]]:
    """`count` (key, value) pairs of Discord-style chat JSON, keyed by channel; deterministic."""
    rng = random.Random(seed)
    guilds = [rng.randrange(10**17, 10**18) for _ in range(40)]
    channels = [(rng.choice(guilds), rng.randrange(10**17, 10**18)) for _ in range(400)]
    authors = [rng.randrange(10**17, 10**18) for _ in range(5000)]
    base = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    out = []
    for i in range(count):
        guild, channel = rng.choice(channels)
        text = f"{rng.choice(_OPENERS)} {rng.choice(_BODIES)}{rng.choice(_TAILS)}".strip()
        if rng.random() < 0.2:
            text = f"{text} {rng.choice(_BODIES)}"
        created = base + timedelta(milliseconds=37 * i)
        event: dict[str, Any] = {
            "event_id": 1_300_000_000_000_000_000 + start_id + i,
            "content": text,
            "content_type": "chat_message",
            "author_id": rng.choice(authors),
            "context_id": channel,
            "community_id": guild,
            "created_at": created.isoformat(),
            "metadata": {"client": rng.choice(("desktop", "mobile", "web")), "locale": rng.choice(("en", "de", "fr"))},
        }
        if rng.random() < 0.3:
            event["context"] = [
                {"content": rng.choice(_BODIES), "author_id": rng.choice(authors)} for _ in range(rng.randint(1, 3))
            ]
        out.append((str(channel).encode(), orjson.dumps(event)))
    return out


def produce_events(
    bootstrap: str, topic: str, events: list[tuple[bytes, bytes]], traces: float | None = None, seed: int = 7
) -> None:
    """`traces`: each record carries its producer's W3C `traceparent`, the trace sampled by the
    producer with this probability (a producer tracing at a ratio of its own); None: no headers."""
    from confluent_kafka import Producer

    rng = random.Random(seed)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4", "acks": "all"})
    for key, value in events:
        headers = None
        if traces is not None:
            sampled = 1 if rng.random() < traces else 0
            parent = b"00-%032x-%016x-%02x" % (rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, sampled)
            headers = [("traceparent", parent)]
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"could not produce the input to {topic}")


# -- the job every case does: an instant classifier and a verdict like ours ---------------------


def instant_verdict(event_id: str, topic: str, partition: int, offset: int, timestamp_ms: int | None) -> bytes:
    """The verdict a hand-written consumer builds for an instant classifier: same fields as ours."""
    return orjson.dumps(
        {
            "schema_version": 1,
            "kind": "verdict",
            "event_id": event_id,
            "source": {"topic": topic, "partition": partition, "offset": offset, "timestamp_ms": timestamp_ms},
            "violation": False,
            "action": "allow",
            "results": [
                {
                    "policy_id": POLICY_ID,
                    "policy_version": "instant",
                    "violation": False,
                    "category": None,
                    "rule_ids": [],
                    "confidence": None,
                    "rationale": None,
                    "action": "allow",
                    "reasoning": None,
                    "model": "instant",
                    "latency_ms": 0.0,
                }
            ],
            "latency_ms": 0.0,
            "consumer_version": "bench",
        }
    )


# -- measuring a case, inside its own process ----------------------------------------------------


def mark_window() -> None:
    """Where a case's measured window starts and ends (`Meter`): a system call nothing else in the
    process makes, before which callgrind dumps its counts (`bench.callgrind`); costs nothing else."""
    os.getsid(0)


class Meter:
    """Wall and CPU time from the first record in to the last output acknowledged, and peak RSS;
    the CPU also split by thread: the event loop's (main), the poll thread's, librdkafka's. Both
    ends of the window are marked (`mark_window`) for an instruction count."""

    def __init__(self) -> None:
        self.first_wall: float | None = None
        self.first_cpu = 0.0
        self.end_wall = 0.0
        self.end_cpu = 0.0
        self.first_threads: dict[str, float] = {}
        self.end_threads: dict[str, float] = {}

    def first_record(self) -> None:
        if self.first_wall is None:
            mark_window()
            self.first_cpu = time.process_time()
            self.first_wall = time.perf_counter()
            self.first_threads = threads_cpu()

    def done(self) -> None:
        mark_window()
        self.end_wall = time.perf_counter()
        self.end_cpu = time.process_time()
        self.end_threads = threads_cpu()

    def result(self, events: int, **extra: Any) -> dict[str, Any]:
        assert self.first_wall is not None, "no record was read"
        wall = self.end_wall - self.first_wall
        cpu = self.end_cpu - self.first_cpu
        return {
            "events": events,
            "wall_s": round(wall, 3),
            "events_per_s": round(events / wall, 1),
            "cpu_s": round(cpu, 3),
            "cpu_us_per_event": round(cpu / events * 1e6, 1),
            **{
                f"cpu_us_{group}": round((spent - self.first_threads.get(group, 0.0)) / events * 1e6, 1)
                for group, spent in self.end_threads.items()
            },
            "peak_rss_mb": peak_rss_mb(),
            **extra,
        }


def threads_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads so far, by group: main (the event loop, or a hand
    loop), poll (the source's poll thread), librdkafka (its rdk:* threads), other. Threads that
    ended meanwhile drop out of a group, so read a group's figure as a floor."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = {"main": 0.0, "poll": 0.0, "librdkafka": 0.0, "other": 0.0}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:
            continue  # the thread ended
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        name = names.get(int(tid), comm)
        group = ("main" if name == "MainThread" else "poll" if name.endswith("-poll")
                 else "librdkafka" if comm.startswith("rdk:") else "other")  # fmt: skip
        groups[group] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return groups


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over from the forking parent."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def report(result: dict[str, Any]) -> None:
    """The last line a case prints: its result, read by the orchestrator."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
