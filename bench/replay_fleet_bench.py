"""How a replay run scales with its workers: one run over a 12-partition topic with 1, 2 and 4
workers (`replay --run`, separate processes), side by side in one run of this script.

    python -m bench.replay_fleet_bench                 # 12,000 records per run
    python -m bench.replay_fleet_bench --records 2400  # a smoke run

The classifier is latency-bound, as a served reasoner is. By default (`--classifier served`) the
workers run the served reasoner's own client (`classifier.reasoner: remote`, `api: chat`) against
a stand-in fleet this script serves on 127.0.0.1: an OpenAI chat-completions endpoint that
answers "not a violation" after `--latency-ms` (20 ms), each worker keeping at most
`--concurrency` (4) requests in flight on it (the endpoint's `max_concurrency`). So one worker
tops out near concurrency / latency (200 records/s) and the figures measure how the run shares
that out, not these CPU cores. `--classifier plugin` takes `tests.plugins:slow` instead (the
same latency and concurrency in process, no HTTP). A real broker (`consumer.kafka.devkafka`, as the
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
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import yaml
from confluent_kafka import Consumer, Producer

from consumer.kafka.devkafka import KafkaBroker, create_topics

REPO = Path(__file__).resolve().parent.parent
PARTITIONS = 12
WORKERS = (1, 2, 4)


class StandInFleet:
    """An OpenAI chat-completions endpoint on 127.0.0.1 that answers every request after a fixed
    latency: a reasoner fleet whose capacity is never the limit, only its latency."""

    ANSWER = '{"violation": 0, "policy_category": "safe"}'

    def __init__(self, latency_s: float) -> None:
        fleet = self
        self.requests = 0  # answered, for the summary line; counted under a lock (handler threads)
        counting = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server's clients use it
            # Headers and body in one write, sent at once: written apart, the body waited for the
            # client's delayed ACK (40 ms) and the stand-in answered in 60 ms, not 20.
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(latency_s)
                with counting:
                    fleet.requests += 1
                self._send({"id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
                            "model": body.get("model"),
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": StandInFleet.ANSWER}}],
                            "usage": {"prompt_tokens": 600, "completion_tokens": 20, "total_tokens": 620}})  # fmt: skip

            def do_GET(self) -> None:  # noqa: N802 - /v1/models, the client's probe
                self._send({"object": "list", "data": [{"id": "gpt-oss-safeguard-20b", "object": "model"}]})

            def _send(self, body: dict) -> None:
                data = orjson.dumps(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # listen backlog: every worker's connections may open at once (default 5)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def classifier_sections(kind: str, latency_ms: float, concurrency: int, fleet: StandInFleet | None) -> dict:
    """The workers' classifier: the served reasoner's client against the stand-in, or the plugin."""
    if kind == "plugin":
        return {"classifier": {"kind": "plugin", "factory": "tests.plugins:slow",
                               "options": {"delay_s": latency_ms / 1000, "max_concurrency": concurrency}}}  # fmt: skip
    assert fleet is not None
    # A replay sends at low priority. On an endpoint without priority scheduling it would take only
    # engine.low_priority_share (a quarter) of max_concurrency, to leave room for live traffic. The
    # bench has no live traffic, so the endpoint is declared to schedule by priority: each worker
    # keeps `concurrency` requests in flight.
    endpoint = {"url": fleet.url, "api": "chat", "max_concurrency": concurrency, "priority_scheduling": True}
    return {"classifier": {"kind": "reasoner", "reasoner": "remote"},
            "engine": {"model": "gpt-oss-safeguard-20b", "endpoints": [endpoint]}}


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
    parser.add_argument("--classifier", choices=("served", "plugin"), default="served",
                        help="served: the remote reasoner client against a stand-in fleet; plugin: in process")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="safeguard-replay-fleet-bench-"))
    # The broker's own default, which the test broker sets to 0: a new group's first assignment waits
    # for members joining within 3 s of each other, so workers started together share it from the start.
    broker = KafkaBroker(work / "kafka", extra_properties={"group.initial.rebalance.delay.ms": "3000"})
    broker.start(timeout=120)
    fleet = StandInFleet(args.latency_ms / 1000) if args.classifier == "served" else None
    try:
        bootstrap, topic = broker.bootstrap, f"bench-in-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, topic, partitions=PARTITIONS)
        produce(bootstrap, topic, args.records)
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": bootstrap, "input_topics": [topic]},
            "policies": {"directory": str(REPO / "policies"), "default": "chat-harassment"},
            "pipeline": {"commit_interval_s": 0.5, "max_in_flight_events": 400},
            **classifier_sections(args.classifier, args.latency_ms, args.concurrency, fleet),
            "log": {"level": "WARNING"},
        }))  # fmt: skip
        figures = [one_run(bootstrap, config, topic, args.records, n, work) for n in WORKERS]
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
    base = figures[0]["steady_per_s"]
    for row in figures:
        row["ratio"] = row["steady_per_s"] / base
    print(f"\nreplay run over {PARTITIONS} partitions, {args.records} records, a {args.classifier} classifier of "
          f"{args.latency_ms:g} ms x {args.concurrency} per worker (at most "
          f"{args.concurrency / args.latency_ms * 1000:,.0f} records/s a worker); "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'workers':>8} {'records/s (10-90%)':>19} {'x one worker':>13} {'wall s':>8} {'outputs':>8}")
    for row in figures:
        print(f"{row['workers']:>8} {row['steady_per_s']:>19,.0f} {row['ratio']:>12.2f}x {row['wall_s']:>8.1f} "
              f"{row['outputs']:>8}")  # fmt: skip
    print(json.dumps({"records": args.records, "classifier": args.classifier, "latency_ms": args.latency_ms,
                      "concurrency": args.concurrency, "figures": figures,
                      "fleet_requests": fleet.requests if fleet else None}))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
