"""How a replay run scales with its workers: one run over a 12-partition topic with 1, 2 and 4
workers (`replay --run`, separate processes), side by side in one run of this script.

    python -m bench.replay_fleet_bench                 # 12,000 records per run
    python -m bench.replay_fleet_bench --records 2400  # a smoke run

The classifier is latency-bound, as a served reasoner is: `tests.plugins:slow` answers after
`--latency-ms` (20 ms) with at most `--concurrency` (4) requests at once per worker, so one
worker tops out near concurrency / latency (200 records/s) and the figures measure how the run
shares that out, not these CPU cores. A real broker (`consumer.kafka.devkafka`, as the
integration tests start it) holds the input topic and each run's output topic.

The broker runs with Kafka's default `group.initial.rebalance.delay.ms` (3 s; the test broker sets
0), so workers started together share the first assignment. Throughput is measured on the outputs'
timestamps between 10% and 90% of the run's outputs (the steady state: every worker has joined and
none has run out of partitions); the whole wall time from start to the last worker's exit, Python
start-up included, is printed beside it. The ratio is each
run's throughput over the one-worker run's. Prints a table and one JSON line; docs/replay.md
holds the last figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
PARTITIONS = 12
WORKERS = (1, 2, 4)


def produce(bootstrap: str, topic: str, records: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for i in range(records):
        value = orjson.dumps({"event_id": f"e{i}", "content": f"message number {i}"})
        while True:
            try:
                producer.produce(topic, value=value, key=b"c%d" % i)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def output_times(bootstrap: str, topic: str, expected: int, timeout: float = 120.0) -> list[int]:
    """The broker timestamps (ms) of a run's outputs, sorted; at least `expected` of them."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                       "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    reader.subscribe([topic])
    times: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while len(times) < expected and time.monotonic() < deadline:
            times += [m.timestamp()[1] for m in reader.consume(1000, timeout=0.5) if m.error() is None]
    finally:
        reader.close()
    if len(times) < expected:
        raise SystemExit(f"{topic}: {len(times)} outputs of {expected} after {timeout:g} s")
    return sorted(times)


def one_run(bootstrap: str, config: Path, topic: str, records: int, workers: int, logs: Path) -> dict:
    name, out = f"bench-{workers}w-{uuid.uuid4().hex[:8]}", f"bench-out-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, out, partitions=PARTITIONS)
    command = [sys.executable, "-m", "consumer", "replay", "--config", str(config), "--topic", topic,
               "--from", "earliest", "--to", "now", "--run", name, "--output-topic", out]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    processes = []
    for i in range(workers):
        with open(logs / f"{name}-{i}.log", "wb") as log:
            processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(1800) for p in processes]
    wall = time.monotonic() - started
    if any(codes):
        raise SystemExit(f"{name}: a worker exited {codes}; logs in {logs}")
    times = output_times(bootstrap, out, records)
    low, high = times[len(times) // 10], times[len(times) * 9 // 10]
    steady = (len(times) * 9 // 10 - len(times) // 10) / max(0.001, (high - low) / 1000)
    return {"workers": workers, "records": records, "outputs": len(times), "steady_per_s": steady, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=12_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=4, help="classifications at once per worker")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="safeguard-replay-fleet-bench-"))
    # The broker's own default, which the test broker sets to 0: a new group's first assignment waits
    # for members joining within 3 s of each other, so workers started together share it from the start.
    broker = KafkaBroker(work / "kafka", extra_properties={"group.initial.rebalance.delay.ms": "3000"})
    broker.start(timeout=120)
    try:
        bootstrap, topic = broker.bootstrap, f"bench-in-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, topic, partitions=PARTITIONS)
        produce(bootstrap, topic, args.records)
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": bootstrap, "input_topics": [topic]},
            "policies": {"directory": str(REPO / "policies"), "default": "chat-harassment"},
            "pipeline": {"commit_interval_s": 0.5, "max_in_flight_events": 400},
            "classifier": {"kind": "plugin", "factory": "tests.plugins:slow",
                           "options": {"delay_s": args.latency_ms / 1000, "max_concurrency": args.concurrency}},
            "log": {"level": "WARNING"},
        }))  # fmt: skip
        figures = [one_run(bootstrap, config, topic, args.records, n, work) for n in WORKERS]
    finally:
        broker.stop()
    base = figures[0]["steady_per_s"]
    for row in figures:
        row["ratio"] = row["steady_per_s"] / base
    print(f"\nreplay run over {PARTITIONS} partitions, {args.records} records, a classifier of "
          f"{args.latency_ms:g} ms x {args.concurrency} per worker (at most "
          f"{args.concurrency / args.latency_ms * 1000:,.0f} records/s a worker); "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'workers':>8} {'records/s (10-90%)':>19} {'x one worker':>13} {'wall s':>8} {'outputs':>8}")
    for row in figures:
        print(f"{row['workers']:>8} {row['steady_per_s']:>19,.0f} {row['ratio']:>12.2f}x {row['wall_s']:>8.1f} "
              f"{row['outputs']:>8}")  # fmt: skip
    print(json.dumps({"records": args.records, "latency_ms": args.latency_ms, "concurrency": args.concurrency,
                      "figures": figures}))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
