"""Case 7 (`remote`): the remote reasoner against the in-process engine, same tiny model, same requests.

    python -m bench.remote_bench --events 128      # alone
    python -m bench.remote_bench SPEC_JSON         # from bench.pipeline_bench (uses spec.events)

No Kafka: the classifiers alone, each fed the same (event, policy) requests with at most
max_num_seqs (8) in flight, as the batcher would. First the in-process `VllmClassifier`
(tests/engine/conftest.py's settings), then a `vllm serve` process with the same engine
settings (tests/engine/servers.py) through `RemoteClassifier` on 127.0.0.1, one after the
other so that they never share the CPU. Each first classifies a few warm-up requests, so both
find the policy prefix cached. The random weights never answer, so `max_unparseable_retries`
is 0 and every request is one completion of `max_tokens` 16 ending as `unparseable_output`:
the measured path is prompt rendering, transport, generation and reading the completion.

Prints the throughput of each, their ratio (remote / in-process) and the latency the remote
path adds (p50, p99), and `RESULT {json}` as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import REPO, Spec, chat_events, report
from consumer.classify import ClassificationFailed, ClassifyRequest
from consumer.classify.engine import RemoteSettings, make_remote_classifier, make_vllm_classifier
from consumer.events import ContentEvent, ErrorType
from consumer.policy import load_policy
from tests.engine.conftest import TINY_MODEL_VERSION, _cache_root, build_tiny_gpt_oss, tiny_engine_settings
from tests.engine.servers import SERVED_MODEL, VllmServer

WARM_UP = 8
IN_FLIGHT = 8  # the engines' max_num_seqs
ROUNDS = 2  # each path measured twice, the better round kept: the machine is shared and drifts


async def measure(classifier: Any, requests: list[ClassifyRequest]) -> dict[str, Any]:
    """Classify `requests` at most IN_FLIGHT at a time; events/s and latency percentiles."""
    slots = asyncio.Semaphore(IN_FLIGHT)
    latencies: list[float] = []
    completed = 0

    async def one(request: ClassifyRequest) -> None:
        nonlocal completed
        async with slots:
            began = time.perf_counter()
            try:
                await classifier.classify(request)
            except ClassificationFailed as failed:
                if failed.error_type is not ErrorType.UNPARSEABLE_OUTPUT:
                    raise
            latencies.append(time.perf_counter() - began)
            completed += 1

    began = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "events": completed,
        "events_per_s": round(completed / elapsed, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
    }


async def best_of(classifier: Any, count: int, prefix: str) -> dict[str, Any]:
    rounds = [await measure(classifier, requests_for(count, f"{prefix}{r}")) for r in range(ROUNDS)]
    best = max(rounds, key=lambda m: m["events_per_s"])
    return {**best, "rounds_per_s": [m["events_per_s"] for m in rounds]}


def requests_for(count: int, prefix: str) -> list[ClassifyRequest]:
    policy = load_policy(REPO / "policies" / "chat-harassment.md")
    events = [ContentEvent.model_validate_json(value) for _, value in chat_events(count, seed=5)]
    return [ClassifyRequest(event, policy, f"{prefix}-{i}") for i, event in enumerate(events)]


async def in_process(model: Path, count: int) -> dict[str, Any]:
    settings = tiny_engine_settings(model, request_timeout_s=600, max_unparseable_retries=0, max_engine_retries=0)
    classifier = make_vllm_classifier(settings)
    await classifier.start()
    try:
        await measure(classifier, requests_for(WARM_UP, "warm"))
        return await best_of(classifier, count, "local")
    finally:
        await classifier.close()


async def remote(server: VllmServer, count: int) -> dict[str, Any]:
    settings = RemoteSettings(
        kind="remote",
        model=SERVED_MODEL,
        endpoints=[{"url": server.url, "max_concurrency": IN_FLIGHT}],
        max_tokens=16,
        max_unparseable_retries=0,
        request_timeout_s=600,
    )
    classifier = make_remote_classifier(settings)
    await classifier.start()
    try:
        await measure(classifier, requests_for(WARM_UP, "warm"))
        return await best_of(classifier, count, "remote")
    finally:
        await classifier.close()


def run(count: int) -> dict[str, Any]:
    model = build_tiny_gpt_oss(_cache_root() / "models" / TINY_MODEL_VERSION)
    local = asyncio.run(in_process(model, count))
    with tempfile.TemporaryDirectory(prefix="bench-vllm-serve-") as logs:
        server = VllmServer(model, Path(logs) / "serve.log", priority_scheduling=False, max_num_seqs=IN_FLIGHT)
        try:
            server.start().wait_ready()
            served = asyncio.run(remote(server, count))
        finally:
            server.stop()
    return {
        "events": count,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "in_process_rounds_per_s": local["rounds_per_s"],
        "remote_rounds_per_s": served["rounds_per_s"],
        "events_per_s": served["events_per_s"],
        "in_process_per_s": local["events_per_s"],
        "remote_per_s": served["events_per_s"],
        "remote/in_process": round(served["events_per_s"] / local["events_per_s"], 3),
        "in_process_p50_ms": local["p50_ms"],
        "in_process_p99_ms": local["p99_ms"],
        "remote_p50_ms": served["p50_ms"],
        "remote_p99_ms": served["p99_ms"],
        "added_p50_ms": round(served["p50_ms"] - local["p50_ms"], 1),
        "added_p99_ms": round(served["p99_ms"] - local["p99_ms"], 1),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.remote_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", help="a bench.workload.Spec as JSON (from bench.pipeline_bench)")
    parser.add_argument("--events", type=int, default=128)
    args = parser.parse_args(argv)
    count = Spec.from_json(args.spec).events if args.spec else args.events
    result = run(count)
    print(
        f"in-process {result['in_process_per_s']}/s (p50 {result['in_process_p50_ms']} ms, "
        f"p99 {result['in_process_p99_ms']} ms); remote {result['remote_per_s']}/s (p50 {result['remote_p50_ms']} "
        f"ms, p99 {result['remote_p99_ms']} ms); ratio {result['remote/in_process']}; added p50 "
        f"{result['added_p50_ms']} ms, p99 {result['added_p99_ms']} ms",
        file=sys.stderr,
    )
    report(result)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main(sys.argv[1:])
