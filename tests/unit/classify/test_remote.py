"""The remote reasoner's chat shape and fleet rules, against a stand-in chat-completions server.

vLLM cannot serve its chat endpoint for the tiny test model (it has no tokenizer files; the
server answers 500), so the chat shape is tested against `StandIn`: a real HTTP server on
127.0.0.1 that follows OpenAI's documented chat-completions API (POST /v1/chat/completions,
bearer auth, `choices[0].message.content`, `usage.prompt_tokens_details.cached_tokens`) plus the
`reasoning` field that vLLM and hosted gpt-oss providers add. It records what it was sent and
answers from a script. The token-id shape runs against real `vllm serve` processes in
tests/engine/test_remote_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from consumer.classify import Classification, ClassificationFailed, ClassifyRequest
from consumer.classify.engine import RemoteSettings, engine_settings, make_remote_classifier
from consumer.classify.engine.remote.classifier import parse_server_load
from consumer.classify.engine.remote.fleet import Endpoint, Fleet, NoEndpoint, ServerLoad
from consumer.errors import Unavailable
from consumer.events import ContentEvent, ContextMessage, ErrorType
from consumer.policy import Policy, load_policy

POLICY_FILE = Path(__file__).resolve().parents[3] / "policies" / "chat-harassment.md"
KEY = "sk-test-not-a-real-key-6d1f"
ANSWER = '{"violation": 1, "policy_category": "harassment", "rule_ids": ["H2"], "confidence": "high"}'


class StandIn:
    """A chat-completions server from a script: each request pops the next (status, body) or answers ANSWER."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.script: list[tuple[int, dict[str, Any]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(body)
                stand_in.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found", "type": "not_found"}})
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, {"error": {"message": "bad key", "type": "invalid_api_key"}})
                status, reply = stand_in.script.pop(0) if stand_in.script else (200, stand_in.reply(body))
                self._send(status, reply)

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, {"object": "list", "data": [{"id": "gpt-oss-safeguard-20b", "object": "model"}]})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def reply(body: dict[str, Any], content: str = ANSWER) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "reasoning": "The user insults a player."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 700,
                "completion_tokens": 40,
                "total_tokens": 740,
                "prompt_tokens_details": {"cached_tokens": 640},
            },
        }


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def policy() -> Policy:
    return load_policy(POLICY_FILE)


def chat_settings(*urls: str, **overrides: Any) -> RemoteSettings:
    values: dict[str, Any] = {
        "model": "gpt-oss-safeguard-20b",
        "endpoints": [
            {"url": url, "api": "chat", "api_key_env": "STANDIN_KEY", "name": f"e{i}", "max_concurrency": 4}
            for i, url in enumerate(urls)
        ],
        "endpoint_backoff_s": 0.05,
        "endpoint_backoff_max_s": 0.2,
    }
    return RemoteSettings(**(values | overrides))


def classify(settings: RemoteSettings, *requests: ClassifyRequest, priority: str | None = None) -> list[Any]:
    async def scenario() -> list[Any]:
        classifier = make_remote_classifier(settings, priority)  # type: ignore[arg-type]
        await classifier.start()
        try:
            return await asyncio.gather(*(classifier.classify(r) for r in requests), return_exceptions=True)
        finally:
            await classifier.close()

    return asyncio.run(scenario())


def req(policy: Policy, content: str = "uninstall the game, you are trash", **event: Any) -> ClassifyRequest:
    return ClassifyRequest(ContentEvent(event_id="e1", content=content, **event), policy, "r1", time.monotonic() + 30)


def test_chat_shape_sends_policy_content_and_effort_and_reads_the_answer(stand_in, policy, monkeypatch, caplog) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    (verdict,) = classify(chat_settings(stand_in.url, keep_reasoning=True), req(policy))
    assert not isinstance(verdict, BaseException), verdict
    assert (verdict.violation, verdict.category, verdict.rule_ids, verdict.confidence) == (
        True, "harassment", ["H2"], "high",
    )  # fmt: skip
    assert verdict.reasoning == "The user insults a player."
    assert (verdict.prompt_tokens, verdict.cached_tokens, verdict.completion_tokens) == (700, 640, 40)
    (body,) = stand_in.requests
    assert body["messages"] == [
        {"role": "system", "content": policy.text},
        {"role": "user", "content": "uninstall the game, you are trash"},
    ]
    assert body["reasoning_effort"] == policy.reasoning_effort
    assert body["model"] == "gpt-oss-safeguard-20b"
    assert "priority" not in body  # not a documented chat-completions field
    # The key travels as a header only, and never into a log line.
    assert stand_in.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert all(KEY not in record.getMessage() for record in caplog.records)


def test_chat_shape_sends_context_as_the_in_process_user_message(stand_in, policy, monkeypatch) -> None:
    from consumer.classify.engine.content import user_text

    monkeypatch.setenv("STANDIN_KEY", KEY)
    request = req(policy, "and you too", author_id="u2", context=[ContextMessage(content="lol noob", author_id="u1")])
    classify(chat_settings(stand_in.url, policy_role="developer"), request)
    (body,) = stand_in.requests
    assert body["messages"][0]["role"] == "developer"
    assert body["messages"][1]["content"] == user_text(request.event)


def test_unparseable_chat_answer_is_retried_then_dead_lettered_with_the_raw_text(stand_in, policy, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    prose = "I think this is harassment."
    stand_in.script = [(200, StandIn.reply({"model": "m"}, prose))] * 2
    (failed,) = classify(chat_settings(stand_in.url), req(policy))
    assert isinstance(failed, ClassificationFailed)
    assert failed.error_type is ErrorType.UNPARSEABLE_OUTPUT
    assert failed.raw_output == prose and failed.attempts == 2


def test_a_failing_endpoint_is_paused_and_the_request_answered_elsewhere(stand_in, policy, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    other = StandIn()
    other.thread.start()
    try:
        # e0 is a port nothing listens on; e1 answers 503 once, then works.
        other.script = [(503, {"error": {"message": "overloaded", "type": "server_error"}})]
        dead = "http://127.0.0.1:9/v1"
        outcomes = classify(chat_settings(dead, other.url, max_attempts=4), req(policy), req(policy))
    finally:
        other.server.shutdown()
        other.server.server_close()
    assert all(not isinstance(o, BaseException) and o.violation for o in outcomes), outcomes
    assert len(other.requests) == 3  # one 503, then both answered


def test_a_request_that_met_only_failing_endpoints_goes_round_again_on_the_one_that_answers(
    stand_in, policy, monkeypatch
) -> None:
    # A rolling restart's backlog: e0 is down, e1 answers but has room for one request at a time,
    # so most requests spend their single attempt on e0. None of them is charged with it.
    monkeypatch.setenv("STANDIN_KEY", KEY)
    settings = chat_settings("http://127.0.0.1:9/v1", stand_in.url, max_attempts=1)
    settings.endpoints[1].max_concurrency = 1
    requests = [ClassifyRequest(ContentEvent(event_id=f"e{i}", content="you are trash"), policy, f"r{i}",
                                time.monotonic() + 30) for i in range(6)]  # fmt: skip
    outcomes = classify(settings, *requests)
    assert all(isinstance(o, Classification) and o.violation for o in outcomes), outcomes
    assert len(stand_in.requests) == 6


def test_a_request_past_its_deadline_is_a_classifier_error_naming_the_endpoints_tried(
    stand_in, policy, monkeypatch
) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    late = ClassifyRequest(ContentEvent(event_id="e1", content="hi"), policy, "r1", time.monotonic() - 1)
    (failed,) = classify(chat_settings("http://127.0.0.1:9/v1", stand_in.url, max_attempts=1), late)
    assert isinstance(failed, ClassificationFailed) and failed.error_type is ErrorType.CLASSIFIER_ERROR
    assert failed.attempts == 1 and "endpoints tried: e" in str(failed)


def test_a_fleet_with_no_endpoint_answering_is_an_outage_not_the_records_fault(policy, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    dead = "http://127.0.0.1:9/v1"
    (down,) = classify(chat_settings(dead, dead.replace(":9/", ":11/"), max_attempts=2), req(policy))
    assert isinstance(down, Unavailable) and down.dependency == "reasoner", down
    assert "e0" in down.reason and "e1" in down.reason
    assert down.retry_after_s is not None and 0 <= down.retry_after_s <= 0.2  # endpoint_backoff_max_s


def test_the_probe_finds_an_endpoint_answering_again_and_puts_it_back(stand_in, policy, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)

    async def scenario() -> tuple[object, bool | None, bool | None, object]:
        classifier = make_remote_classifier(chat_settings(stand_in.url, max_attempts=1))
        await classifier.start()
        try:
            stand_in.script = [(503, {"error": {"message": "restarting"}})]
            down = await asyncio.gather(classifier.classify(req(policy)), return_exceptions=True)
            unknown = await classifier.probe("schema registry")
            back = await classifier.probe("reasoner")
            return down[0], unknown, back, await classifier.classify(req(policy))
        finally:
            await classifier.close()

    down, unknown, back, verdict = asyncio.run(scenario())
    assert isinstance(down, Unavailable)
    assert unknown is None and back is True
    assert isinstance(verdict, Classification) and verdict.violation


def test_a_request_the_server_refuses_is_not_retried(stand_in, policy, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_KEY", KEY)
    stand_in.script = [(400, {"error": {"message": "This model's maximum context length is 8192 tokens"}})]
    (failed,) = classify(chat_settings(stand_in.url), req(policy))
    assert isinstance(failed, ClassificationFailed) and failed.error_type is ErrorType.PAYLOAD_TOO_LARGE
    assert len(stand_in.requests) == 1


def test_a_missing_key_variable_stops_the_start_naming_the_variable_not_a_value(stand_in, monkeypatch) -> None:
    monkeypatch.delenv("STANDIN_KEY", raising=False)
    with pytest.raises(ValueError, match="STANDIN_KEY"):
        asyncio.run(make_remote_classifier(chat_settings(stand_in.url)).start())


def test_engine_section_picks_in_process_or_remote() -> None:
    assert type(engine_settings({}, "in_process")).__name__ == "EngineSettings"
    remote = engine_settings({"endpoints": [{"url": "http://vllm:8000/v1"}]}, "remote")
    assert isinstance(remote, RemoteSettings)
    assert remote.endpoints[0].resolved_metrics_url == "http://vllm:8000/metrics"
    with pytest.raises(ValueError):
        engine_settings({"endpoints": [{"url": "vllm:8000"}]}, "remote")


# -- the fleet's rules ---------------------------------------------------------------------


def fleet(**overrides: Any) -> Fleet:
    endpoints = [{"url": "http://a/v1", "name": "a", "max_concurrency": 8}, {"url": "http://b/v1", "name": "b"}]
    return Fleet(RemoteSettings(**({"endpoints": endpoints} | overrides)))


def test_least_outstanding_endpoint_first_and_failed_ones_last() -> None:
    async def scenario() -> list[str]:
        f = fleet(endpoints=[{"url": f"http://{n}/v1", "name": n, "max_concurrency": 8} for n in "ab"])
        picks = [(await f.acquire(set(), None)).name for _ in range(4)]
        picks.append((await f.acquire({"a"}, None)).name)  # ties broken away from where it failed
        return picks

    assert asyncio.run(scenario()) == ["a", "b", "a", "b", "b"]


def test_among_equally_busy_endpoints_the_emptier_for_its_limit_first() -> None:
    async def scenario() -> list[str]:
        f = fleet()  # a: 8, b: 64
        return [(await f.acquire(set(), None)).name for _ in range(3)]

    assert asyncio.run(scenario()) == ["a", "b", "b"]


def test_a_full_fleet_makes_requests_wait_until_room_or_their_deadline() -> None:
    async def scenario() -> None:
        f = fleet(endpoints=[{"url": "http://a/v1", "name": "a", "max_concurrency": 1}])
        held = await f.acquire(set(), None)
        with pytest.raises(NoEndpoint, match="deadline"):
            await f.acquire(set(), time.monotonic() + 0.05)
        waiter = asyncio.create_task(f.acquire(set(), time.monotonic() + 5))
        await asyncio.sleep(0.01)
        f.release(held)
        assert (await waiter).name == "a"

    asyncio.run(scenario())


def test_server_queue_cuts_the_limit_and_an_idle_server_raises_it() -> None:
    endpoint = fleet().endpoints[0]
    endpoint.outstanding = 8
    endpoint.observe(ServerLoad(running=8, waiting=3, kv_cache_usage=0.4))
    assert endpoint.limit == 6  # 8 x 0.75
    endpoint.observe(ServerLoad(running=8, waiting=0, kv_cache_usage=0.95))
    assert endpoint.limit == 4.5  # KV cache above kv_cache_high counts as full
    endpoint.outstanding = 4
    endpoint.observe(ServerLoad(running=4, waiting=0, kv_cache_usage=0.3))
    assert endpoint.limit == 5.5  # at its limit with room on the server: +max(1, limit/8)
    for _ in range(20):
        endpoint.outstanding = int(endpoint.limit)
        endpoint.observe(ServerLoad(running=4, waiting=0, kv_cache_usage=0.3))
    assert endpoint.limit == endpoint.ceiling == 8


def test_failures_pause_an_endpoint_longer_each_time_until_it_succeeds() -> None:
    endpoint: Endpoint = fleet(endpoint_backoff_s=1.0, endpoint_backoff_max_s=60).endpoints[0]
    pauses = [endpoint.fail(100.0, "HTTP 503") for _ in range(5)]
    assert not endpoint.up(100.0) and all(0 <= p <= 60 for p in pauses)
    assert max(pauses) > 1.0
    endpoint.succeeded(0.1)
    assert endpoint.up(100.0) and endpoint.failures_in_a_row == 0


def test_low_priority_takes_a_share_where_the_server_has_no_priorities() -> None:
    endpoints = [
        {"url": "http://a/v1", "name": "a", "max_concurrency": 8, "priority_scheduling": True},
        {"url": "http://b/v1", "name": "b", "max_concurrency": 8},
    ]
    assert fleet(endpoints=endpoints).capacity() == 16
    assert fleet(endpoints=endpoints, priority="low", low_priority_share=0.25).capacity() == 8 + 2


def test_vllm_metrics_are_read_and_summed_over_engines() -> None:
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0',
        'vllm:num_requests_waiting{engine="1",model_name="m"} 0.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7',
        "# TYPE vllm:prefix_cache_hits_total counter",
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0',
        'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9',
    ])  # fmt: skip
    assert parse_server_load(text) == ServerLoad(
        running=5, waiting=1, kv_cache_usage=0.7, prefix_cache_queries=None, prefix_cache_hits=512
    )
    assert parse_server_load("# a server without vLLM's metrics\nup 1\n") is None
