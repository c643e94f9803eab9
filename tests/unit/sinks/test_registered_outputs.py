"""`sinks.registered_outputs`: the settings it is refused with, which topics it frames, and how the
start looks their schema ids up from a registry that is slow or lacks them."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from consumer.config import Settings
from consumer.decode import RawRecord
from consumer.errors import Fatal
from consumer.events import ErrorType
from consumer.kafka.records import dead_letter
from consumer.sinks.registry import RegisteredBudget, output_schema, register_output_schemas, registered_topics

REGISTRY = {"url": "http://registry:8081"}


def test_registered_outputs_without_a_registry_url_are_refused_naming_both_keys():
    with pytest.raises(ValueError, match="sinks.registered_outputs needs schema_registry.url"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdict"]}})


def test_verdicts_and_dead_letters_registered_on_one_topic_are_refused():
    with pytest.raises(ValueError, match="verdict and dead_letter need two topics"):
        Settings.model_validate({"kafka": {"verdict_topic": "out", "dead_letter_topic": "out"},
                                 "sinks": {"registered_outputs": ["verdict", "dead_letter"]},
                                 "schema_registry": REGISTRY})  # fmt: skip


def test_an_output_kind_listed_twice_or_unknown_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdict", "verdict"]}, "schema_registry": REGISTRY})
    with pytest.raises(ValueError, match="registered_outputs"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdicts"]}, "schema_registry": REGISTRY})


def test_review_items_and_our_plain_json_readers_of_the_topics_are_refused_not_yet_supported():
    with pytest.raises(ValueError, match="registered_outputs"):  # the review desk reads them as plain JSON
        Settings.model_validate({"sinks": {"registered_outputs": ["review_item"]}, "schema_registry": REGISTRY})
    with pytest.raises(ValueError, match="not supported with review.enabled yet"):
        Settings.model_validate({"sinks": {"registered_outputs": ["dead_letter"]}, "review": {"enabled": True},
                                 "schema_registry": REGISTRY})  # fmt: skip
    with pytest.raises(ValueError, match="chat.offender_thresholds and chat.rebuild_records"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdict"]}, "schema_registry": REGISTRY,
                                 "chat": {"offender_thresholds": [{"violations": 3, "action": "ban"}]}})  # fmt: skip


def test_only_the_registered_outputs_topics_are_framed_each_with_its_kinds_schema():
    settings = Settings.model_validate({
        "kafka": {"verdict_topic": "v", "dead_letter_topic": "d"},
        "sinks": {"registered_outputs": ["verdict"]}, "schema_registry": REGISTRY,
    })  # fmt: skip
    assert registered_topics(settings) == {"v": "verdict"}
    assert '"title": "Verdict"' in output_schema("verdict").schema_str
    assert registered_topics(Settings.model_validate({})) == {}  # the default: every output plain JSON


class _SlowRegistry:
    """A registry on 127.0.0.1 that holds no subject, whose first `answers_late` requests are
    answered only after the client gave up (the CI registry once took longer than timeout_s).
    A lookup is answered `lookup_status` (200: the schema's id), a registration with the id."""

    def __init__(self, answers_late: int, lookup_status: int = 200, late_s: float = 1.0):
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self, status: int, body: object) -> None:
                outer.requests.append(f"{self.command} {self.path.split('?')[0]}")
                if len(outer.requests) <= answers_late:
                    time.sleep(late_s)
                payload = orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:  # the client that gave up has closed its connection
                    pass

            def do_POST(self) -> None:  # noqa: N802 - the library's name
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.split("?")[0].endswith("/versions"):  # a registration
                    self.answer(200, {"id": 7})
                elif lookup_status == 200:
                    self.answer(200, {"subject": "d-value", "id": 7, "version": 1})
                else:
                    self.answer(lookup_status, {"error_code": 40401, "message": "Subject 'd-value' not found."})

            def do_GET(self) -> None:  # noqa: N802 - the subject name strategy asks for associations first
                if self.path.split("?")[0] == "/subjects":
                    self.answer(200, [])
                else:
                    self.answer(404, {"error_code": 40401, "message": "not found"})

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> _SlowRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Record(RawRecord):  # a dead letter also records the input's timestamp
    def timestamp(self) -> tuple[int, int]:
        return (0, 0)  # TIMESTAMP_NOT_AVAILABLE


def _settings(url: str, retry_s: float) -> Settings:
    return Settings.model_validate({
        "kafka": {"verdict_topic": "v", "dead_letter_topic": "d"}, "sinks": {"registered_outputs": ["dead_letter"]},
        "schema_registry": {"url": url, "timeout_s": 0.3, "retry_s": retry_s},
    })  # fmt: skip


def _budget(url: str, retry_s: float) -> RegisteredBudget:
    return RegisteredBudget({}, _settings(url, retry_s), describe=lambda topics: {t: 1_000_000 for t in topics})


def test_a_registry_slower_than_timeout_s_at_start_is_asked_again_within_retry_s():
    with _SlowRegistry(answers_late=1) as registry:
        budget = _budget(registry.url, retry_s=5.0)
        budget.load(["v", "d"])  # the first lookup timed out; the second one found the id
    record = _Record(b"not json", "orders", 0, 7)
    framed = budget.dead_letter(dead_letter(record, ErrorType.INVALID_JSON, "not JSON"), record, [])
    assert framed.value[:5] == b"\x00\x00\x00\x00\x07"  # the magic byte and the id the registry gave


def test_a_registry_that_stays_silent_or_lacks_the_subject_stops_the_start_saying_which():
    with _SlowRegistry(answers_late=1000) as registry:
        started = time.monotonic()
        with pytest.raises(Fatal, match=r"ReadTimeout.*\(asked for 0.5s, schema_registry.retry_s\)"):
            _budget(registry.url, retry_s=0.5).load(["v", "d"])
        assert time.monotonic() - started < 5  # retry_s bounds it: a few timed-out tries, not more
    with _SlowRegistry(answers_late=0, lookup_status=404) as registry:
        with pytest.raises(Fatal, match="subject d-value does not hold this version's schema"):
            _budget(registry.url, retry_s=5.0).load(["v", "d"])  # the registry's answer: not asked again


def test_topics_create_asks_a_slow_registry_again_and_registers_each_schema_once():
    with _SlowRegistry(answers_late=1) as registry:
        outcomes = register_output_schemas(_settings(registry.url, retry_s=5.0))
    assert outcomes == [("d-value", "dead_letter schema registered, id 7")]
    # The subjects asked twice (the first answer came too late), then one registration.
    assert registry.requests == ["GET /subjects", "GET /subjects", "POST /subjects/d-value/versions"]
