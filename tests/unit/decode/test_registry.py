"""The registry formats' own rules, without a registry: configuration refused by key, and a
registry that does not answer is an outage (Unavailable), never the record's fault."""

from __future__ import annotations

import time

import pytest

from consumer.config import ConfigError, SchemaRegistrySettings, Settings
from consumer.decode import DecodesAhead, RawRecord
from consumer.decode.factory import build_decoder
from consumer.decode.registry import RegistryDecoder, check_reachable, registry_client
from consumer.errors import RecordFault, Unavailable
from consumer.kafka.devkafka import free_port
from tests.unit.pipeline.test_preflight import config
from tests.unit.test_config import run_cli

AVRO_FRAMED = b"\x00\x00\x00\x00\x01" + b"\x02a"  # magic byte, schema id 1, a body


def nobody_listens() -> SchemaRegistrySettings:
    return SchemaRegistrySettings(url=f"http://127.0.0.1:{free_port()}", retry_s=0.3, timeout_s=1)


def test_a_registry_format_without_a_registry_url_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match="schema_registry.url"):
        Settings.model_validate({"decode": {"topics": {"orders": {"format": "avro"}}}})


def test_protobuf_without_its_message_class_is_refused():
    with pytest.raises(ValueError, match="message_type"):
        Settings.model_validate({"decode": {"format": "protobuf"}, "schema_registry": {"url": "http://r:8081"}})


def test_a_message_type_that_does_not_load_exits_2_naming_the_key(tmp_path):
    path = config(tmp_path, decode={"format": "protobuf", "message_type": "no_such_module:Chat"},
                  schema_registry={"url": "http://127.0.0.1:1"})  # fmt: skip
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "decode.message_type: cannot load 'no_such_module:Chat'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_client_property_is_a_configuration_error():
    with pytest.raises(ConfigError, match="schema_registry"):
        registry_client(SchemaRegistrySettings(url="http://r:8081", client={"no.such.property": 1}))


def test_an_unreachable_registry_is_unavailable_not_a_record_fault():
    settings = nobody_listens()
    decoder = RegistryDecoder("avro", registry_client(settings), settings, max_payload_bytes=1000)
    with pytest.raises(Unavailable) as caught:
        decoder.decode(RawRecord(AVRO_FRAMED, "orders"))
    assert not isinstance(caught.value, RecordFault)
    assert caught.value.dependency == "schema registry"
    with pytest.raises(Unavailable):
        check_reachable(registry_client(settings), settings)


def test_decoding_ahead_tries_the_registry_once_per_batch_and_keeps_each_outcome():
    settings = nobody_listens()
    decoder = RegistryDecoder("avro", registry_client(settings), settings, max_payload_bytes=1000)
    records = [RawRecord(AVRO_FRAMED, "orders", 0, offset) for offset in range(20)]
    started = time.monotonic()
    decoder.ahead(records)
    assert time.monotonic() - started < 5 * settings.retry_s  # not 20 rounds of retries on the poll thread
    for record in records:
        with pytest.raises(Unavailable):
            decoder.decode(record)


def test_only_decoders_that_may_block_decode_ahead():
    registry = Settings.model_validate({"decode": {"format": "avro"}, "schema_registry": {"url": "http://r:8081"}})
    assert isinstance(build_decoder(registry), DecodesAhead)
    assert not isinstance(build_decoder(Settings()), DecodesAhead)  # JSON decodes on the loop, as before
