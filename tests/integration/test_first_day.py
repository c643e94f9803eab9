"""An operator's first day, against the real broker: clear start-up, real pre-flight,
conventional metrics and logs. Each test is one promise of the README."""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider

from consumer.classify.keyword import KeywordClassifier
from consumer.kafka.devkafka import free_port
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.pipeline.telemetry.logs import JsonLogFormatter
from consumer.policy import PolicyStore
from tests.kafka_helpers import (
    Collector,
    committed_offsets,
    create_topics,
    decoded,
    event_json,
    http_get,
    produce,
    unique,
    wait_for,
)
from tests.runner import settings_for, write_config

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "consumer", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip
    return result, time.monotonic() - started


def test_the_readme_run_section_on_a_fresh_broker_produces_verdicts(kafka, tmp_path):
    """`topics create` then `run`, both on deploy/config.example.yaml as the README says."""
    example = str(REPO / "deploy" / "config.example.yaml")
    group = unique("readme")
    env = {"SAFEGUARD_KAFKA__GROUP_ID": group, "SAFEGUARD_TELEMETRY__HTTP_PORT": "0"}
    created, _ = cli("topics", "create", "--config", example, "--bootstrap-servers", kafka, env=env)
    assert created.returncode == 0, created.stderr
    assert "verdicts (verdicts): created" in created.stdout or "verdicts (verdicts): exists" in created.stdout
    again, _ = cli("topics", "create", "--config", example, "--bootstrap-servers", kafka, env=env)
    assert again.returncode == 0 and "created" not in again.stdout  # idempotent

    produce(kafka, "chat-messages", [event_json(i, "kys" if i == 0 else None) for i in range(5)])
    outputs = Collector(kafka, "verdicts")
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", "--config", example, "--bootstrap-servers", kafka],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        verdicts = decoded(outputs.until(5, timeout=90))
    finally:
        process.terminate()
        assert process.wait(60) == 0
        outputs.close()
    assert sorted(v["event_id"] for v in verdicts if v["source"]["topic"] == "chat-messages")[-5:] == [
        f"e{i}" for i in range(5)
    ]
    start = next(orjson.loads(line) for line in log.read_text().splitlines() if "starting: classifier" in line)
    assert "chat-harassment@" in start["message"] and "delivery at_least_once" in start["message"]


def test_a_missing_output_topic_exits_2_naming_it_before_anything_is_consumed(kafka, policies_dir, tmp_path):
    topic, group = unique("no-output"), unique("group")
    create_topics(kafka, topic, f"{topic}.dlq")  # no verdict topic
    produce(kafka, topic, (event_json(i) for i in range(10)))
    config = write_config(tmp_path / "c.yaml", kafka, group, topic, policies_dir)
    result, seconds = cli("run", "--config", str(config))
    assert result.returncode == 2
    assert f"kafka.verdict_topic: topic '{topic}.verdicts' does not exist" in result.stderr
    assert f"safeguard-consumer topics create --config {config}" in result.stderr
    assert committed_offsets(kafka, group, topic, 1) == {0: -1001}  # OFFSET_INVALID: nothing committed
    assert seconds < 30


@pytest.mark.parametrize("address", ["127.0.0.1:{free}", "kafak-misspelled.invalid:9092"])
def test_unreachable_brokers_at_start_exit_1_with_one_error_line(policies_dir, tmp_path, address):
    address = address.format(free=free_port())
    config = write_config(tmp_path / "c.yaml", address, "g", "t", policies_dir)
    data = yaml.safe_load(config.read_text())
    data["kafka"]["startup_timeout_s"] = 5
    config.write_text(yaml.safe_dump(data))
    result, seconds = cli("run", "--config", str(config))
    lines = result.stderr.splitlines()
    errors = [orjson.loads(line) for line in lines if line.startswith("{") and '"ERROR"' in line]
    assert result.returncode == 1
    assert seconds < 5 + 10
    assert len(lines) < 20, result.stderr
    assert len(errors) == 1 and address in errors[0]["message"] and "unreachable" in errors[0]["message"]


def test_check_config_connect_checks_brokers_topics_and_permissions(kafka, policies_dir, tmp_path):
    topic = unique("connect")
    config = write_config(tmp_path / "c.yaml", kafka, "g", topic, policies_dir)
    missing, _ = cli("check-config", "--quiet", "--connect", "--config", str(config))
    assert missing.returncode == 2 and f"topic '{topic}' does not exist" in missing.stderr
    created, _ = cli("topics", "create", "--config", str(config), "--partitions", "2")
    assert created.returncode == 0, created.stderr
    assert created.stdout.count("created (2 partitions, replication 1)") == 3
    present, _ = cli("check-config", "--quiet", "--connect", "--config", str(config))
    assert present.returncode == 0, present.stderr
    assert "reachable; topics present and permitted" in present.stderr


def test_a_busy_metrics_port_is_one_line_naming_telemetry_http_port(kafka, policies_dir, tmp_path):
    topic = unique("busy")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.yaml", kafka, unique("group"), topic, policies_dir,
                              telemetry={"http_port": port})  # fmt: skip
        result, _ = cli("run", "--config", str(config))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "telemetry.http_port" in errors[0] and str(port) in errors[0]
    assert "Traceback" not in result.stderr


def test_metrics_follow_prometheus_conventions_and_every_counter_starts_at_0(kafka, policies_dir, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/bootstrap installs Debian's prometheus package"
    topic = unique("conventions")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    settings = settings_for(kafka, unique("group"), topic, policies_dir)
    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory))
    with BackgroundPipeline(pipeline) as running:
        wait_for(lambda: pipeline.http is not None and http_get(pipeline.http.port, "/readyz")[0] == 200, timeout=60,
                 message="ready")  # fmt: skip
        before = http_get(pipeline.http.port, "/metrics")[1]  # nothing consumed yet
        produce(kafka, topic, [event_json(0, "kys"), b"{bad"])
        wait_for(lambda: pipeline.consumed == 2 and pipeline.tracker.in_flight() == 0, timeout=30, message="2 records")
        after = http_get(pipeline.http.port, "/metrics")[1]
        running.stop()
    for name in ("safeguard_dead_letters_total", "safeguard_events_consumed_total", "safeguard_verdicts_total",
                 "safeguard_tokens_total", "safeguard_event_duration_seconds_count"):  # fmt: skip
        assert f"\n{name}{{" in before, f"{name} absent before its first increment"
    assert 'safeguard_dead_letters_total{error_type="classifier_error"} 0.0' in after
    assert "otel_scope" not in after and "milliseconds" not in after and "safeguard_figure" not in after
    for text in (before, after):
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_a_per_record_error_log_carries_the_record_trace_id(kafka, policies_dir):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    topic = unique("traced-log")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(kafka, topic, [event_json(0)])
    settings = settings_for(kafka, unique("group"), topic, policies_dir,
                            classifier={"kind": "plugin", "factory": "tests.plugins:unserialisable"})  # fmt: skip
    from consumer.classify.factory import build_classifier

    store = PolicyStore(settings.policies.directory)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("consumer.pipeline.pipeline")
    logger.addHandler(handler)
    try:
        pipeline = Pipeline(settings, build_classifier(settings, store), store, tracer_provider=provider)
        with BackgroundPipeline(pipeline) as running:
            wait_for(lambda: hasattr(pipeline, "sink") and pipeline.sink.dead_letters_delivered == 1, timeout=60,
                     message="the dead letter")
            running.stop()
    finally:
        logger.removeHandler(handler)
    errors = [orjson.loads(line) for line in stream.getvalue().splitlines() if '"ERROR"' in line]
    spans = [s for s in exporter.get_finished_spans() if s.name == f"process {topic}"]
    assert len(errors) == 1 and len(spans) == 1
    assert errors[0]["trace_id"] == f"{spans[0].context.trace_id:032x}"
    assert errors[0]["span_id"] == f"{spans[0].context.span_id:016x}"


@pytest.mark.parametrize("statistics_interval_ms", [500, 0], ids=["statistics", "no-statistics"])
def test_an_outage_after_start_is_one_warning_each_way_and_readyz_follows(
    kafka_broker, policies_dir, caplog, statistics_interval_ms
):
    """With statistics the clients tell when the brokers are back; without, the health beat asks them."""
    kafka = kafka_broker.bootstrap
    topic = unique("outage")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    settings = settings_for(kafka, unique("group"), topic, policies_dir,
                            telemetry={"http_port": 0, "statistics_interval_ms": statistics_interval_ms})  # fmt: skip
    pipeline = Pipeline(settings, KeywordClassifier(), PolicyStore(settings.policies.directory))
    caplog.set_level(logging.INFO)
    with BackgroundPipeline(pipeline) as running:
        wait_for(lambda: pipeline.http is not None and http_get(pipeline.http.port, "/readyz")[0] == 200, timeout=60,
                 message="ready")  # fmt: skip
        kafka_broker.stop()
        try:
            wait_for(lambda: http_get(pipeline.http.port, "/readyz")[0] == 503, timeout=60, message="/readyz to fail")
            time.sleep(5)  # librdkafka retries many times meanwhile
            assert "brokers unreachable" in http_get(pipeline.http.port, "/readyz")[1]
        finally:
            kafka_broker.start(timeout=120)
        wait_for(lambda: http_get(pipeline.http.port, "/readyz")[0] == 200, timeout=90, message="/readyz to recover")
        assert running.stop().exit_code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if w.startswith("brokers unreachable")]) == 1, warnings
    assert len([w for w in warnings if w.startswith("brokers reachable again")]) == 1, warnings
    librdkafka = [r for r in caplog.records if r.name == "consumer.kafka.librdkafka"]
    assert len(librdkafka) < 40, [r.getMessage() for r in librdkafka]


# -- every command that talks to Kafka: the same pre-flight as `run` -----------------------------

_REVIEW = {"enabled": True, "console": {"port": 0, "reviewers": [{"id": "ann", "token": "t0ken-ann"}]}}


def _commands(config: Path, tmp_path: Path, topic: str) -> dict[str, list[str]]:
    """Each command as a first-day user types it, on `config`."""
    return {
        "replay": ["replay", "--config", str(config), "--topic", topic, "--from", "earliest", "--to", "now",
                   "--output", str(tmp_path / "replay.jsonl")],
        "review pending": ["review", "pending", "--config", str(config)],
        "review export": ["review", "export", "--config", str(config), "--policy", "chat-harassment",
                          "--out", str(tmp_path / "labels.jsonl")],
        "review console": ["review", "console", "--config", str(config)],
        "topics create": ["topics", "create", "--config", str(config)],
        "check-config --connect": ["check-config", "--quiet", "--connect", "--config", str(config)],
    }  # fmt: skip


def _one_error_line(result: subprocess.CompletedProcess, problems: int = 1) -> str:
    """What a refused start prints: one `error:` line, one line more for each further problem
    (each naming its key), and nothing of librdkafka's or Python's own."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and "FAIL" not in result.stderr, result.stderr
    assert len(lines) == problems and lines[0].startswith("error:"), result.stderr
    return "\n".join(lines)


@pytest.mark.parametrize("command", ["replay", "review pending", "review export", "review console", "topics create",
                                     "check-config --connect"])  # fmt: skip
def test_a_wrong_broker_address_is_one_line_and_exit_1_for_every_command(policies_dir, tmp_path, command):
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "c.yaml", address, "g", "chat", policies_dir, review=_REVIEW)
    data = yaml.safe_load(config.read_text())
    data["kafka"]["startup_timeout_s"] = 3
    config.write_text(yaml.safe_dump(data))
    result, seconds = cli(*_commands(config, tmp_path, "chat")[command])
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result)
    assert address in line and "unreachable" in line and "kafka.startup_timeout_s" in line
    assert seconds < 3 + 15


@pytest.mark.parametrize("command", ["replay", "review pending", "review export", "review console",
                                     "check-config --connect"])  # fmt: skip
def test_a_missing_topic_is_one_line_naming_it_and_exit_2_for_every_command(kafka, policies_dir, tmp_path, command):
    topic = unique("first-day")
    create_topics(kafka, f"{topic}.verdicts", f"{topic}.dlq")  # no input topic, no review topics
    review = {**_REVIEW, "topic": f"{topic}.review", "decisions_topic": f"{topic}.decisions"}
    config = write_config(tmp_path / "c.yaml", kafka, unique("group"), topic, policies_dir, review=review)
    result, seconds = cli(*_commands(config, tmp_path, topic)[command])
    assert result.returncode == 2, result.stderr
    # run's needs: its input and the three review topics; a replay's: its --topic; a review command's: two.
    problems = {"replay": 1, "check-config --connect": 4}.get(command, 2)
    line = _one_error_line(result, problems)
    named = {"replay": f"--topic: topic '{topic}' does not exist",
             "check-config --connect": f"kafka.input_topics: topic '{topic}' does not exist"}  # fmt: skip
    assert named.get(command, f"review.topic: topic '{topic}.review' does not exist") in line
    assert seconds < 30


@pytest.mark.parametrize("command", ["replay", "review pending", "review export", "review console", "topics create",
                                     "check-config --connect"])  # fmt: skip
def test_a_bad_configuration_is_one_line_naming_the_key_and_exit_2_for_every_command(policies_dir, tmp_path, command):
    config = write_config(tmp_path / "c.yaml", "127.0.0.1:1", "g", "chat", policies_dir,
                          review={**_REVIEW, "max_item": 5})  # a misspelled key: nothing is contacted  # fmt: skip
    result, seconds = cli(*_commands(config, tmp_path, "chat")[command])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "FAIL" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-2:] == ["error: invalid configuration:",
                                               f"  {config}: review.max_item: unknown key"]  # fmt: skip
    assert seconds < 15


def test_topics_create_makes_and_sizes_every_topic_the_configuration_names_and_run_checks_them(
    kafka, policies_dir, tmp_path
):
    topic = unique("with-review")
    review = {**_REVIEW, "topic": f"{topic}.review", "decisions_topic": f"{topic}.decisions",
              "appeals_topic": f"{topic}.appeals"}  # fmt: skip
    config = write_config(tmp_path / "c.yaml", kafka, unique("group"), topic, policies_dir, review=review)
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")  # the main four, as before review was on
    missing, _ = cli("check-config", "--quiet", "--connect", "--config", str(config), "--bootstrap-servers", kafka)
    assert missing.returncode == 2
    line = _one_error_line(missing, problems=3)
    assert f"review.topic: topic '{topic}.review' does not exist" in line
    assert f"topics create --config {config} --bootstrap-servers {kafka}" in line  # the hint keeps what was passed
    created, _ = cli("topics", "create", "--config", str(config), "--partitions", "2")
    assert created.returncode == 0, created.stderr
    assert created.stdout.count("created (2 partitions, replication 1)") == 3, created.stdout
    assert created.stdout.count(": exists") == 3, created.stdout
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": kafka})
    resource = ConfigResource(ConfigResource.Type.TOPIC, f"{topic}.review")
    size = admin.describe_configs([resource])[resource].result(30)["max.message.bytes"].value
    assert int(size) > 1 << 20  # sized like the dead letters: a review item carries the event
    present, _ = cli("check-config", "--quiet", "--connect", "--config", str(config))
    assert present.returncode == 0 and "topics present and permitted" in present.stderr, present.stderr


def test_check_config_connect_fails_on_a_busy_metrics_port_as_run_does(kafka, policies_dir, tmp_path):
    topic = unique("busy-check")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.yaml", kafka, "g", topic, policies_dir, telemetry={"http_port": port})
        result, _ = cli("check-config", "--quiet", "--connect", "--config", str(config))
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "telemetry.http_port" in line and str(port) in line


def test_replay_to_a_missing_output_topic_fails_at_once_speaking_of_replay_options(kafka, policies_dir, tmp_path):
    topic = unique("replay-out")
    create_topics(kafka, topic)
    produce(kafka, topic, [event_json(i) for i in range(4)])
    config = write_config(tmp_path / "c.yaml", kafka, "g", topic, policies_dir)
    result, seconds = cli("replay", "--config", str(config), "--topic", topic, "--from", "earliest", "--to", "now",
                          "--output-topic", f"{topic}.missing")  # fmt: skip
    assert result.returncode == 2
    line = _one_error_line(result)
    assert f"--output-topic: topic '{topic}.missing' does not exist" in line and "--output" in line
    assert "kafka.verdict_topic" not in result.stderr + result.stdout
    assert seconds < 20


def test_review_pending_names_the_classifier_of_a_verdict_without_a_cascade_stage(kafka, policies_dir, tmp_path):
    topic = unique("pending")
    review = {**_REVIEW, "topic": f"{topic}.review", "decisions_topic": f"{topic}.decisions"}
    create_topics(kafka, f"{topic}.review", f"{topic}.decisions")
    keyword_item = {
        "review_id": "rv-1", "reason": "undecided", "created_at": "2026-12-01T00:00:00Z",
        "policy_id": "chat-harassment", "policy_version": "v1", "event": {"event_id": "e1", "content": "kys"},
        "source": {"topic": topic, "partition": 0, "offset": 0},
        "machine": {"violation": True, "confidence": "high", "stage": None, "model": "keyword", "action": "delete"},
    }  # fmt: skip
    produce(kafka, f"{topic}.review", [orjson.dumps(keyword_item)])
    config = write_config(tmp_path / "c.yaml", kafka, "g", topic, policies_dir, review=review)
    result, _ = cli("review", "pending", "--config", str(config))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert "machine: violation (keyword, high)" in line and "None" not in line
    assert "1 reviews await a person" in result.stderr


def test_review_console_names_its_busy_port_and_logs_json_when_told(kafka, policies_dir, tmp_path):
    topic = unique("console")
    review = {**_REVIEW, "topic": f"{topic}.review", "decisions_topic": f"{topic}.decisions"}
    create_topics(kafka, f"{topic}.review", f"{topic}.decisions")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.yaml", kafka, "g", topic, policies_dir,
                              review={**review, "console": {**review["console"], "port": port}})  # fmt: skip
        busy, _ = cli("review", "console", "--config", str(config))
    assert busy.returncode == 2
    line = _one_error_line(busy)
    assert "review.console.port" in line and str(port) in line

    config = write_config(tmp_path / "c.yaml", kafka, "g", topic, policies_dir, review=review,
                          log={"format": "json", "level": "INFO"})  # fmt: skip
    log = tmp_path / "console.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "consumer", "review", "console", "--config", str(config)],
                                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: "review console on" in log.read_text(), timeout=60, message="the console to start")
    finally:
        process.terminate()
        process.wait(30)
    logged = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(orjson.loads(line)["message"].startswith("review console on") for line in logged), log.read_text()
