"""Registry-encoded topics (issue 27), against the real broker and a real Schema Registry (Apicurio).

Records are produced with confluent-kafka's own serializers, registering a new schema version
mid-stream as an upgraded producer would; the consumer reads them with `decode.format` per topic.
"""

from __future__ import annotations

import base64
import signal
import time

import orjson
import pytest
from confluent_kafka import OFFSET_INVALID, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from consumer.classify.keyword import KeywordClassifier
from consumer.kafka.devkafka import free_port
from tests.integration.registry_messages import ChatMessage, ChatMessageV1
from tests.kafka_helpers import Collector, committed_offsets, create_topics, end_offsets, http_get, unique, wait_for
from tests.registry import SchemaRegistry
from tests.runner import running_pipeline, settings_for, wait_while_running, write_config
from tests.unit.test_config import run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

AVRO_V1 = {"type": "record", "name": "ChatMessage", "namespace": "chat",
           "fields": [{"name": "id", "type": "string"}, {"name": "text", "type": "string"},
                      {"name": "author", "type": "string"}]}  # fmt: skip
# The upgraded producer's schema: a field added (with a default, so the subject stays compatible).
AVRO_V2 = {**AVRO_V1, "fields": [*AVRO_V1["fields"], {"name": "guild", "type": ["null", "string"], "default": None}]}
MAPPING = {"event_id": "id", "content": "text", "author_id": "author", "community_id": "guild"}
PER_VERSION = 15  # records per schema version and topic
SCAM = "free nitro here, claim your prize"  # spam-scams' patterns flag it


def _text(i: int) -> str:
    return SCAM if i % 5 == 0 else f"ordinary message {i}"


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for value in values:
        producer.produce(topic, value=value, key=b"channel-1")
    assert producer.flush(30) == 0


def _avro_records(client: SchemaRegistryClient, topic: str) -> list[bytes]:
    ctx = SerializationContext(topic, MessageField.VALUE)
    v1, v2 = AvroSerializer(client, orjson.dumps(AVRO_V1).decode()), AvroSerializer(client, orjson.dumps(AVRO_V2).decode())
    values = [v1({"id": f"a{i}", "text": _text(i), "author": "u1"}, ctx) for i in range(PER_VERSION)]
    values += [v2({"id": f"a{i}", "text": _text(i), "author": "u2", "guild": "g7"}, ctx)
               for i in range(PER_VERSION, 2 * PER_VERSION)]  # fmt: skip
    return values


def _protobuf_records(client: SchemaRegistryClient, topic: str) -> list[bytes]:
    ctx = SerializationContext(topic, MessageField.VALUE)
    conf = {"use.deprecated.format": False}
    v1, v2 = ProtobufSerializer(ChatMessageV1, client, conf), ProtobufSerializer(ChatMessage, client, conf)
    values = [v1(ChatMessageV1(id=f"p{i}", text=_text(i), author="u1"), ctx) for i in range(PER_VERSION)]
    values += [v2(ChatMessage(id=f"p{i}", text=_text(i), author="u2", guild="g7"), ctx)
               for i in range(PER_VERSION, 2 * PER_VERSION)]  # fmt: skip
    return values


def _outputs(kafka: str, topic: str, count: int) -> list[dict]:
    collector = Collector(kafka, f"{topic}.verdicts", f"{topic}.dlq")
    try:
        return [orjson.loads(m.value()) for m in collector.until(count, timeout=60)]
    finally:
        collector.close()


def test_avro_and_protobuf_topics_with_a_field_added_mid_stream_are_all_classified(kafka, schema_registry,
                                                                                   policies_dir):  # fmt: skip
    client = schema_registry.client()
    avro, proto, group = unique("reg-avro"), unique("reg-proto"), unique("group")
    create_topics(kafka, avro, proto, f"{avro}.verdicts", f"{avro}.dlq")
    _produce(kafka, avro, _avro_records(client, avro))
    _produce(kafka, proto, _protobuf_records(client, proto))
    assert client.get_versions(f"{avro}-value") == [1, 2] and client.get_versions(f"{proto}-value") == [1, 2]
    settings = settings_for(
        kafka, group, avro, policies_dir,
        kafka={"input_topics": [avro, proto]},
        policies={"default": "spam-scams"},
        schema_registry={"url": schema_registry.url},
        decode={"topics": {
            avro: {"format": "avro", "field_mapping": MAPPING},
            proto: {"format": "protobuf", "message_type": "tests.integration.registry_messages:ChatMessage",
                    "field_mapping": MAPPING},
        }},
    )  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        ends = {avro: end_offsets(kafka, avro, 1), proto: end_offsets(kafka, proto, 1)}
        wait_while_running(running, lambda: all(committed_offsets(kafka, group, t, 1) == e for t, e in ends.items()),
                           timeout=120, message="commits at the end of both topics")  # fmt: skip
        result = running.stop()
    assert result.exit_code == 0 and result.dead_letters == 0
    outputs = _outputs(kafka, avro, 4 * PER_VERSION)
    assert len(outputs) == 4 * PER_VERSION and all(o["kind"] == "verdict" for o in outputs)
    by_id = {o["event_id"]: o for o in outputs}
    for prefix, topic in (("a", avro), ("p", proto)):
        for i in range(2 * PER_VERSION):
            verdict = by_id[f"{prefix}{i}"]
            assert verdict["source"]["topic"] == topic
            assert verdict["violation"] is (i % 5 == 0), verdict  # the keyword verdict of the decoded text
            assert verdict.get("community_id") == ("g7" if i >= PER_VERSION else None)  # the added field, mapped


def test_an_unknown_schema_id_and_corrupt_avro_are_one_dead_letter_each_and_the_records_after_go_on(
    kafka, schema_registry, policies_dir
):
    client = schema_registry.client()
    topic, group = unique("reg-bad"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    good = _avro_records(client, topic)[:6]
    unknown_id = b"\x00" + (987654).to_bytes(4, "big") + good[0][5:]  # a valid body, an id nobody registered
    corrupt = good[1][:5] + b"\xff\xff\xff"  # a registered id, bytes its schema cannot read
    values = [*good[:3], unknown_id, corrupt, *good[3:]]
    _produce(kafka, topic, values)
    settings = settings_for(kafka, group, topic, policies_dir, policies={"default": "spam-scams"},
                            schema_registry={"url": schema_registry.url},
                            decode={"format": "avro", "field_mapping": MAPPING})  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        ends = end_offsets(kafka, topic, 1)
        wait_while_running(running, lambda: committed_offsets(kafka, group, topic, 1) == ends,
                           timeout=120, message="commits at the end")  # fmt: skip
        result = running.stop()
    assert result.exit_code == 0
    outputs = _outputs(kafka, topic, len(values))
    dead = sorted((o for o in outputs if o["kind"] == "dead_letter"), key=lambda o: o["source"]["offset"])
    verdicts = [o for o in outputs if o["kind"] == "verdict"]
    assert (len(dead), len(verdicts)) == (2, 6)
    assert [d["source"]["offset"] for d in dead] == [3, 4]
    assert sorted(v["source"]["offset"] for v in verdicts) == [0, 1, 2, 5, 6, 7]  # the records after them too
    assert all(d["error"]["type"] == "deserialization_failed" for d in dead)
    assert "schema id 987654" in dead[0]["error"]["message"] and f"{topic}-value" in dead[0]["error"]["message"]
    assert "do not match the schema" in dead[1]["error"]["message"] and f"{topic}-value" in dead[1]["error"]["message"]
    assert [base64.b64decode(d["original"]["value_b64"]) for d in dead] == [unknown_id, corrupt]  # bytes kept


def test_an_unreachable_registry_dead_letters_nothing_and_commits_nothing(kafka, policies_dir):
    topic, group = unique("reg-down"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    _produce(kafka, topic, [b"\x00\x00\x00\x00\x01" + b"\x02a"] * 5)  # framed for schema id 1
    registry = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"  # nothing listens there
    settings = settings_for(kafka, group, topic, policies_dir, schema_registry={"url": registry, "retry_s": 0.5},
                            decode={"format": "avro"}, pipeline={"shutdown_deadline_s": 2})  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_for(lambda: running.pipeline.consumed == 5, timeout=60, message="all 5 records consumed")
        time.sleep(2)  # time enough for an output and a commit, were there any
        result = running.stop()
    assert (result.verdicts, result.dead_letters) == (0, 0)
    assert committed_offsets(kafka, group, topic, 1) == {0: OFFSET_INVALID}  # nothing committed


def test_a_registry_stopped_mid_stream_past_its_back_off_then_restarted_loses_nothing_and_commits_to_the_end(
    kafka, policies_dir, tmp_path
):
    # A registry of this test's own, its storage in files: a restart keeps the schemas and their ids.
    registry = SchemaRegistry(tmp_path / "registry.log", data_dir=tmp_path / "registry-data")
    registry.start()
    topic, group, total = unique("reg-restart"), unique("group"), 2 * PER_VERSION
    try:
        create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
        values = _avro_records(registry.client(), topic)  # registers v1 and v2
        _produce(kafka, topic, values[:PER_VERSION])  # v1 only: the consumer fetches and caches v1, never v2
        settings = settings_for(kafka, group, topic, policies_dir, policies={"default": "spam-scams"},
                                schema_registry={"url": registry.url, "retry_s": 0.5},
                                decode={"format": "avro", "field_mapping": MAPPING})  # fmt: skip
        with running_pipeline(settings, KeywordClassifier()) as running:
            wait_while_running(running, lambda: committed_offsets(kafka, group, topic, 1) == {0: PER_VERSION},
                               timeout=120, message="the v1 records committed")  # fmt: skip
            port = running.pipeline.http.port
            assert http_get(port, "/readyz")[0] == 200
            registry.stop()
            _produce(kafka, topic, values[PER_VERSION:])  # v2: a schema id the consumer must fetch
            wait_for(lambda: http_get(port, "/readyz")[0] == 503, timeout=30, message="/readyz failing")
            assert "schema registry" in http_get(port, "/readyz")[1]
            time.sleep(4.0)  # well past retry_s and the outage's retry hint: retried, and waiting again
            assert committed_offsets(kafka, group, topic, 1) == {0: PER_VERSION}  # the v2 records kept, uncommitted
            assert running.pipeline.consumed == total
            registry.start()
            wait_while_running(running, lambda: committed_offsets(kafka, group, topic, 1) == {0: total},
                               timeout=120, message="commits at the end after the restart")  # fmt: skip
            wait_for(lambda: http_get(port, "/readyz")[0] == 200, timeout=30, message="/readyz ready again")
            result = running.stop()
    finally:
        registry.stop()
    assert result.exit_code == 0 and (result.verdicts, result.dead_letters) == (total, 0)
    outputs = _outputs(kafka, topic, total)
    assert [o for o in outputs if o["kind"] == "dead_letter"] == []  # 0 dead-lettered because of the outage
    by_id = {o["event_id"]: o for o in outputs}
    assert sorted(by_id) == sorted(f"a{i}" for i in range(total))  # 0 lost
    assert all(by_id[f"a{i}"]["violation"] is (i % 5 == 0) for i in range(total))


def test_the_preflight_stops_with_exit_1_when_the_registry_does_not_answer(kafka, policies_dir, tmp_path):
    topic = unique("reg-preflight")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    registry = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"
    path = write_config(tmp_path / "config.yaml", kafka, unique("group"), topic, policies_dir,
                        schema_registry={"url": registry, "retry_s": 0.5}, decode={"format": "avro"})  # fmt: skip
    result = run_cli("check-config", "--connect", "--quiet", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"schema registry {registry}" in result.stderr and "Traceback" not in result.stderr


def test_the_conversation_rebuild_stops_early_rather_than_wait_on_an_unreachable_registry(kafka):
    from confluent_kafka import Consumer, TopicPartition

    from consumer.config import ChatSettings, SchemaRegistrySettings
    from consumer.decode.registry import RegistryDecoder, registry_client
    from consumer.pipeline.chat import Conversations, Offenders, rebuild

    topic, group = unique("reg-rebuild"), unique("group")
    create_topics(kafka, topic)
    _produce(kafka, topic, [b"\x00\x00\x00\x00\x01" + b"\x02a"] * 10)
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
        registry = SchemaRegistrySettings(url=f"http://127.0.0.1:{free_port()}", retry_s=1.0, timeout_s=1)
        decoder = RegistryDecoder("avro", registry_client(registry), registry, max_payload_bytes=1000)
        chat = ChatSettings(context_messages=10, rebuild_records=50)
        conversations = Conversations(chat)
        started = time.monotonic()
        rebuild(consumer, [TopicPartition(topic, 0)], conversations, Offenders(chat), decode=decoder.decode,
                client={"bootstrap.servers": kafka}, verdict_topic=f"{topic}.verdicts", tail=50,
                count_offenders=False)  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        consumer.close()
    assert len(conversations) == 0
    assert elapsed < 10 * registry.retry_s  # one record's retries, not ten


def test_a_json_schema_topic_is_classified_and_a_record_that_fails_its_schema_is_a_dead_letter(
    kafka, schema_registry, policies_dir
):
    from confluent_kafka.schema_registry.json_schema import JSONSerializer

    client = schema_registry.client()
    topic, group = unique("reg-json"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    schema = {"type": "object", "properties": {"id": {"type": "string"}, "text": {"type": "string"}},
              "required": ["id", "text"]}  # fmt: skip
    serialize = JSONSerializer(orjson.dumps(schema).decode(), client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    good = [serialize({"id": f"j{i}", "text": _text(i)}, ctx) for i in range(4)]
    failing = good[0][:5] + orjson.dumps({"id": "j-bad"})  # framed with the schema's id, but no text
    _produce(kafka, topic, [*good[:2], failing, *good[2:]])
    settings = settings_for(kafka, group, topic, policies_dir, policies={"default": "spam-scams"},
                            schema_registry={"url": schema_registry.url},
                            decode={"format": "json_schema", "field_mapping": MAPPING})  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        ends = end_offsets(kafka, topic, 1)
        wait_while_running(running, lambda: committed_offsets(kafka, group, topic, 1) == ends,
                           timeout=120, message="commits at the end")  # fmt: skip
        running.stop()
    outputs = _outputs(kafka, topic, 5)
    verdicts = {o["event_id"]: o["violation"] for o in outputs if o["kind"] == "verdict"}
    dead = [o for o in outputs if o["kind"] == "dead_letter"]
    assert verdicts == {"j0": True, "j1": False, "j2": False, "j3": False}
    assert len(dead) == 1 and dead[0]["source"]["offset"] == 2
    assert dead[0]["error"]["type"] == "deserialization_failed" and f"{topic}-value" in dead[0]["error"]["message"]


def _replay_config(path, kafka: str, group: str, topic: str, policies_dir, registry_url: str, **registry) -> str:
    import yaml

    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka, "group_id": group, "input_topics": [topic]},
        "policies": {"directory": str(policies_dir), "default": "spam-scams"},
        "schema_registry": {"url": registry_url, **registry},
        "decode": {"format": "avro", "field_mapping": MAPPING},
        "pipeline": {"commit_interval_s": 0.2},
        "log": {"level": "WARNING"},
    }))  # fmt: skip
    return str(path)


def _replay_cli(*args: str):
    import typer
    from typer.testing import CliRunner

    from consumer.cli import replay

    app = typer.Typer()
    app.command()(replay)
    return CliRunner().invoke(app, list(args))


def test_a_replay_of_an_avro_topic_gives_the_verdicts_and_dead_letters_of_the_live_run(
    kafka, schema_registry, policies_dir, tmp_path
):
    client = schema_registry.client()
    topic, group = unique("reg-replay"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    values = _avro_records(client, topic)  # two schema versions
    corrupt = values[1][:5] + b"\xff\xff\xff"
    values.insert(7, corrupt)
    _produce(kafka, topic, values)
    settings = settings_for(kafka, group, topic, policies_dir, policies={"default": "spam-scams"},
                            schema_registry={"url": schema_registry.url},
                            decode={"format": "avro", "field_mapping": MAPPING})  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_while_running(running, lambda: committed_offsets(kafka, group, topic, 1) == end_offsets(kafka, topic, 1),
                           timeout=120, message="the live run's commits at the end")  # fmt: skip
        assert running.stop().exit_code == 0
    live = _outputs(kafka, topic, len(values))

    config = _replay_config(tmp_path / "config.yaml", kafka, group, topic, policies_dir, schema_registry.url)
    output, report = tmp_path / "replayed.jsonl", tmp_path / "report.md"
    result = _replay_cli("--config", config, "--topic", topic, "--from", "earliest", "--to", "now",
                         "--output", str(output), "--compare", f"{topic}.verdicts", "--report", str(report),
                         "--checkpoint", str(tmp_path / "replay.checkpoint.json"))  # fmt: skip
    assert result.exit_code == 0, result.output
    replayed = [orjson.loads(line) for line in output.read_bytes().splitlines()]

    def outcome(o: dict) -> tuple:
        if o["kind"] == "dead_letter":
            return (o["source"]["offset"], "dead_letter", o["error"]["type"], o["original"]["value_b64"])
        return (o["source"]["offset"], o["event_id"], o["violation"], o.get("community_id"))

    assert len(replayed) == len(live) == 2 * PER_VERSION + 1
    assert sorted(map(outcome, replayed)) == sorted(map(outcome, live))
    assert sum(o["kind"] == "dead_letter" for o in replayed) == 1
    assert f"{2 * PER_VERSION} (record, policy) decisions compared; 0 flipped" in report.read_text()  # the backtest


def test_a_replay_of_an_avro_topic_stops_at_its_preflight_when_the_registry_does_not_answer(
    kafka, policies_dir, tmp_path
):
    topic = unique("reg-replay-down")
    create_topics(kafka, topic)
    registry = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"
    config = _replay_config(tmp_path / "config.yaml", kafka, unique("group"), topic, policies_dir, registry,
                            retry_s=0.5)  # fmt: skip
    output = tmp_path / "replayed.jsonl"
    result = _replay_cli("--config", config, "--topic", topic, "--from", "earliest", "--to", "now",
                         "--output", str(output), "--checkpoint", str(tmp_path / "replay.checkpoint.json"))  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"schema registry {registry}" in result.output
    assert not output.exists() and not (tmp_path / "replay.checkpoint.json").exists()  # stopped before planning


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_registered_verdicts_and_dead_letters_read_back_through_a_plain_json_deserializer(
    kafka, schema_registry, policies_dir, tmp_path, delivery
):
    from confluent_kafka import Consumer
    from confluent_kafka.schema_registry.json_schema import JSONDeserializer

    topic, group, total = unique("reg-out"), unique("group"), 10
    sections = {"policies": {"directory": str(policies_dir), "default": "spam-scams"},
                "schema_registry": {"url": schema_registry.url},
                "sinks": {"registered_outputs": ["verdict", "dead_letter"]}}  # fmt: skip
    config = write_config(tmp_path / "config.yaml", kafka, group, topic, policies_dir, **sections)
    created = run_cli("topics", "create", "--config", str(config), "--partitions", "1")
    assert created.returncode == 0, created.stdout + created.stderr
    assert f"{topic}.verdicts-value (schema): verdict schema registered, id" in created.stdout
    assert f"{topic}.dlq-value (schema): dead_letter schema registered, id" in created.stdout
    again = run_cli("topics", "create", "--config", str(config), "--partitions", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    ids = [line.rsplit(" id ", 1)[1] for line in created.stdout.splitlines() if "(schema)" in line]
    assert [line.rsplit(" id ", 1)[1] for line in again.stdout.splitlines() if "already registered" in line] == ids
    _produce(kafka, topic, [*(orjson.dumps({"event_id": f"e{i}", "content": _text(i)}) for i in range(total)),
                            b"not json"])  # fmt: skip
    settings = settings_for(kafka, group, topic, policies_dir, **{k: v for k, v in sections.items() if k != "policies"},
                            policies={"default": "spam-scams"}, pipeline={"delivery": delivery})  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_while_running(running, lambda: committed_offsets(kafka, group, topic, 1) == {0: total + 1},
                           timeout=120, message="commits at the end")  # fmt: skip
        result = running.stop()
    assert result.exit_code == 0 and (result.verdicts, result.dead_letters) == (total, 1)

    # A reader that knows nothing of ours: the library's consumer and JSONDeserializer, which
    # fetches each record's schema by its id and validates the record against it.
    deserialize = JSONDeserializer(None, schema_registry_client=schema_registry.client())
    reader = Consumer({"bootstrap.servers": kafka, "group.id": unique("reader"), "auto.offset.reset": "earliest",
                       "isolation.level": "read_committed"})  # fmt: skip
    reader.subscribe([f"{topic}.verdicts", f"{topic}.dlq"])
    found: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + 60
    try:
        while len(found) < total + 1 and time.monotonic() < deadline:
            message = reader.poll(0.5)
            if message is not None and message.error() is None:
                ctx = SerializationContext(message.topic(), MessageField.VALUE)
                found.append((message.value()[:1], deserialize(message.value(), ctx)))
    finally:
        reader.close()
    assert len(found) == total + 1 and {magic for magic, _ in found} == {b"\x00"}  # every one framed
    verdicts = {d["event_id"]: d["violation"] for _, d in found if d["kind"] == "verdict"}
    assert verdicts == {f"e{i}": i % 5 == 0 for i in range(total)}
    (letter,) = [d for _, d in found if d["kind"] == "dead_letter"]
    assert letter["error"]["type"] == "invalid_json"
    assert base64.b64decode(letter["original"]["value_b64"]) == b"not json"


def test_a_registered_dead_letter_abbreviated_for_a_small_topic_fits_it_with_its_framing(
    kafka, schema_registry, policies_dir
):
    from consumer.decode import RawRecord
    from consumer.events import ErrorType
    from consumer.kafka.budget import OutputBudget
    from consumer.kafka.records import dead_letter
    from consumer.sinks.registry import FRAME_BYTES, RegisteredBudget, register_output_schemas

    topic = unique("reg-fit")
    settings = settings_for(kafka, unique("group"), topic, policies_dir, schema_registry={"url": schema_registry.url},
                            sinks={"registered_outputs": ["dead_letter"]})  # fmt: skip
    assert [o.split(",")[0] for _, o in register_output_schemas(settings)] == ["dead_letter schema registered"]
    small = lambda topics: {t: 12_000 for t in topics}  # noqa: E731 - every topic's max.message.bytes
    plain, framed = OutputBudget({}, f"{topic}.verdicts", f"{topic}.dlq", small), RegisteredBudget({}, settings, small)
    plain.load()
    framed.load()

    class Record(RawRecord):  # a dead letter also records the input's timestamp
        def timestamp(self) -> tuple[int, int]:
            return (0, 0)  # TIMESTAMP_NOT_AVAILABLE

    record = Record(b"x" * 50_000, topic, 0, 7, key_bytes=b"channel-1")
    letter = dead_letter(record, ErrorType.INVALID_JSON, "not JSON")
    unframed_output, framed_output = plain.dead_letter(letter, record, []), framed.dead_letter(letter, record, [])
    assert framed_output.value[:1] == b"\x00"
    assert len(framed_output.value) + len(b"channel-1") <= plain.budget(f"{topic}.dlq")  # the framing counted
    assert len(framed_output.value) - FRAME_BYTES < len(unframed_output.value)  # its JSON cut shorter, for the framing
    body = orjson.loads(framed_output.value[FRAME_BYTES:])
    assert body["original"]["truncated"] is True and body["event_id"] == letter["event_id"]
    # A record the topic takes whole is framed as it is: 5 bytes longer than the plain output.
    short = Record(b"y" * 100, topic, 0, 8)
    small_letter = dead_letter(short, ErrorType.INVALID_JSON, "not JSON")
    whole = framed.dead_letter(small_letter, short, []).value
    assert whole[FRAME_BYTES:] == plain.dead_letter(small_letter, short, []).value


def test_a_run_whose_registered_outputs_schemas_are_not_registered_stops_at_start_with_exit_1(
    kafka, schema_registry, policies_dir
):
    topic, group = unique("reg-unregistered"), unique("group")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq")
    _produce(kafka, topic, [orjson.dumps({"event_id": "e0", "content": SCAM})])
    settings = settings_for(kafka, group, topic, policies_dir, schema_registry={"url": schema_registry.url},
                            sinks={"registered_outputs": ["verdict"]})  # fmt: skip
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_for(lambda: running.result is not None, timeout=60, message="the run to stop on its own")
        result = running.result
    assert result.exit_code == 1 and result.verdicts == 0
    assert f"subject {topic}.verdicts-value does not hold this version's schema" in result.reason
    assert "safeguard-consumer topics create" in result.reason
    assert committed_offsets(kafka, group, topic, 1) == {0: OFFSET_INVALID}  # nothing consumed


def test_a_registry_that_accepts_connections_but_never_answers_is_restarted_before_the_next_test(tmp_path):
    # What the `schema_registry` fixture does between tests: once on CI the session's registry took a
    # connection and never answered. A stopped process is that registry: the kernel still accepts.
    registry = SchemaRegistry(tmp_path / "registry.log")
    registry.start()
    try:
        assert registry.restart_if_silent(timeout=2) is None
        registry._process.send_signal(signal.SIGSTOP)
        assert not registry.answers(timeout=1)
        why = registry.restart_if_silent(timeout=2)
        assert why is not None and f"port {registry.port} did not answer within 2 s; restarted" in why
        assert registry.answers()
        assert "Full thread dump" in (tmp_path / "registry.log").read_text(errors="replace")
    finally:
        registry.stop()
