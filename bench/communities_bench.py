"""What a thousand communities' own policies cost: one run of this script measures a
single-policy run beside a run with one policy per community, for the keyword classifier and the
cascade (`classifier.reasoner: none`), each case `safeguard-consumer run` in a process of its own
against a real broker (`consumer.kafka.devkafka`, as the integration tests start it).

    python -m bench.communities_bench                                  # 1,000 communities, 20,000 events
    python -m bench.communities_bench --communities 100 --events 2000  # a smoke run

The load: `--events` chat messages on a 6-partition topic, keyed and routed by `community_id`
(spread evenly over the communities), one in ten matching its community's own extra pattern. The
single-policy case runs `policies/chat-harassment.md` alone as the default policy for every event;
the communities case runs `--communities` variants of it (`community: c0000`, ..., each with one
extra pattern of its own and a copy of its labelled examples, which the cascade's heads learn
from; no platform policy, no default), so that both classify one policy per event and what
varies is how many policies are in force. They share the id `chat-harassment`, as communities
adopting one template do; `--own-ids` gives each an id of its own. Per case:

- start-up to first verdict: from the process's start (Python's import included) to the broker
  timestamp of the first verdict; the input is on the topic before the process starts;
- all verdicts: from the process's start to the last verdict's timestamp;
- peak RSS: the process's `ru_maxrss` (`os.wait4`), after it stopped on SIGTERM;
- CPU µs per event: the process's user + system CPU time over the events (start-up included).

A case that has not sent every verdict within `--timeout-s` is stopped and reported with the
verdicts it sent (all verdicts: none); the other cases still run.

Prints a table and writes it as JSON under bench/results/; docs/benchmark.md holds the last figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import yaml
from confluent_kafka import Consumer, Producer

from consumer.kafka.devkafka import KafkaBroker, create_topics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PARTITIONS = 6
VARIANT = (REPO / "policies" / "chat-harassment.md").read_text(encoding="utf-8")
EXAMPLES = REPO / "policies" / "chat-harassment.examples.jsonl"
CLASSIFIERS = {
    "keyword": {"kind": "keyword"},
    "cascade": {"kind": "cascade", "reasoner": "none"},
}


def community_id(n: int) -> str:
    return f"c{n:04d}"


def token(n: int) -> str:
    """The word only community n's policy flags."""
    return f"tok{n:04d}x"


def community_policy(n: int, extra_front_matter: str = "", own_id: bool = False) -> str:
    """chat-harassment as community n's own policy: one extra pattern of its own; `own_id`: under an
    id of its own (`chat-harassment-c0000`) rather than the id every community shares."""
    policy_id = f"chat-harassment-{community_id(n)}" if own_id else "chat-harassment"
    return (
        VARIANT.replace("id: chat-harassment\n", f"id: {policy_id}\ncommunity: {community_id(n)}\n", 1)
        .replace("patterns:\n", f"patterns:\n  - '\\b{token(n)}\\b'\n", 1)
        .replace("output: rich\n", "output: rich\n" + extra_front_matter, 1)
    )


def write_community_policies(folder: Path, communities: int, extra: dict[int, str] | None = None,
                             examples: bool = False, own_ids: bool = False) -> None:  # fmt: skip
    """One policy file per community (`c0000.md`, ...); `extra`: front matter added to community n's;
    `examples`: chat-harassment's labelled examples beside each (what the cascade's heads learn from)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(communities):
        text = community_policy(n, (extra or {}).get(n, ""), own_ids)
        (folder / f"{community_id(n)}.md").write_text(text, encoding="utf-8")
        if examples:
            shutil.copy(EXAMPLES, folder / f"{community_id(n)}.examples.jsonl")


def event(i: int, communities: int) -> tuple[bytes, bytes]:
    """Event i (key, value): community i mod N; one in ten says that community's word."""
    n = i % communities
    content = f"gg {token(n)} you" if i % 10 == 0 else f"message number {i} about the match"
    return community_id(n).encode(), orjson.dumps(
        {"event_id": f"e{i}", "content": content, "community_id": community_id(n), "author_id": f"u{i % 97}"}
    )


def produce(bootstrap: str, topic: str, events: int, communities: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for i in range(events):
        key, value = event(i, communities)
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def verdict_times(bootstrap: str, topic: str, expected: int, deadline: float) -> list[int]:
    """The broker timestamps (ms) of `expected` verdicts, sorted, read until `deadline` (monotonic)."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                       "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    reader.subscribe([topic])
    times: list[int] = []
    try:
        while len(times) < expected and time.monotonic() < deadline:
            times += [m.timestamp()[1] for m in reader.consume(1000, timeout=0.5) if m.error() is None]
    finally:
        reader.close()
    return sorted(times)


def one_case(bootstrap: str, work: Path, name: str, policies: Path, classifier: dict, topic: str, events: int,
             timeout_s: float) -> dict:  # fmt: skip
    out = f"{name}-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, f"{out}.verdicts", f"{out}.dlq", partitions=PARTITIONS)
    policies_section: dict = {"directory": str(policies)}
    if name.startswith("single"):
        policies_section["default"] = "chat-harassment"
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": out, "input_topics": [topic],
                  "verdict_topic": f"{out}.verdicts", "dead_letter_topic": f"{out}.dlq"},
        "policies": policies_section,
        "classifier": classifier,
        "telemetry": {"http_port": None},
        "log": {"level": "WARNING"},
    }))  # fmt: skip
    log = work / f"{name}.log"
    started_ms = time.time() * 1000
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--config", str(config)],
                                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        times = verdict_times(bootstrap, f"{out}.verdicts", events, time.monotonic() + timeout_s)
    finally:
        status, usage = stop(process)
    if len(times) < events:  # said in the row, and the other cases still run
        print(f"{name}: {len(times)} verdicts of {events} after {timeout_s:g} s; see {log}", file=sys.stderr)
    return {
        "case": name,
        "classifier": classifier["kind"],
        "verdicts": len(times),
        "first_verdict_s": round((times[0] - started_ms) / 1000, 2) if times else None,
        "all_verdicts_s": round((times[-1] - started_ms) / 1000, 2) if len(times) == events else None,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "cpu_us_per_event": round((usage.ru_utime + usage.ru_stime) * 1e6 / max(len(times), 1), 1),
        "exit_status": os.waitstatus_to_exitcode(status),  # 0: drained and stopped on SIGTERM
    }


def stop(process: subprocess.Popen, grace_s: float = 60.0) -> tuple[int, object]:
    """SIGTERM (the consumer drains and exits), SIGKILL after `grace_s`; its exit status and rusage."""
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            return status, usage
        if time.monotonic() > deadline:
            process.kill()
            deadline = float("inf")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--communities", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--classifiers", default="keyword,cascade", help="of: " + ", ".join(CLASSIFIERS))
    parser.add_argument("--own-ids", action="store_true",
                        help="each community's policy under an id of its own (default: all share chat-harassment)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per case, for all its verdicts")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="communities-bench-"))
    single, communities = work / "single", work / "communities"
    single.mkdir()
    shutil.copy(REPO / "policies" / "chat-harassment.md", single)
    shutil.copy(EXAMPLES, single)
    write_community_policies(communities, args.communities, examples=True, own_ids=args.own_ids)
    broker = KafkaBroker(work / "kafka")
    broker.start(timeout=120)
    rows = []
    try:
        topic = f"communities-{uuid.uuid4().hex[:8]}"
        create_topics(broker.bootstrap, topic, partitions=PARTITIONS)
        produce(broker.bootstrap, topic, args.events, args.communities)
        for kind in args.classifiers.split(","):
            for name, folder in ((f"single-{kind}", single), (f"communities-{kind}", communities)):
                rows.append(one_case(broker.bootstrap, work, name, folder, CLASSIFIERS[kind], topic, args.events,
                                     args.timeout_s))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    finally:
        broker.stop()
    shutil.rmtree(work, ignore_errors=True)
    header = ("case", "policies", "verdicts", "first verdict s", "all verdicts s", "peak RSS MB", "CPU µs/event")
    print(" | ".join(header))
    for row in rows:
        policies = 1 if row["case"].startswith("single") else args.communities
        shown = (row["case"], policies, row["verdicts"], row["first_verdict_s"], row["all_verdicts_s"],
                 row["peak_rss_mb"], row["cpu_us_per_event"])
        print(" | ".join(str(v) for v in shown))
    RESULTS.mkdir(exist_ok=True)
    result = {"bench": "communities", "communities": args.communities, "events": args.events, "own_ids": args.own_ids,
              "partitions": PARTITIONS, "python": platform.python_version(), "cpus": os.cpu_count(),
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}  # fmt: skip
    path = RESULTS / f"communities-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
