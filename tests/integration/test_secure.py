"""SASL_SSL with SCRAM-SHA-512 against the local Kafka, with a test CA the test makes itself."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from consumer.classify.keyword import KeywordClassifier
from consumer.kafka.devkafka import KafkaBroker, SecureListener, free_port
from tests.kafka_helpers import Collector, committed_offsets, create_topics, event_json, produce, unique, wait_for
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka

USER, PASSWORD = "safeguard", "correct-horse-battery-staple"


def make_ca_and_broker_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA, and a broker certificate for 127.0.0.1 signed by it; returns (ca.pem, broker.pem)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=safeguard-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")
    # Kafka's PEM keystore: the unencrypted PKCS#8 key and the certificate chain in one file.
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8")
    keystore = directory / "broker.pem"
    keystore.write_text((directory / "broker.pk8").read_text() + (directory / "broker.crt").read_text()
                        + (directory / "ca.pem").read_text())
    return directory / "ca.pem", keystore


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca, keystore = make_ca_and_broker_cert(directory)
    secure = SecureListener(port=free_port(), keystore_pem=keystore, users={USER: PASSWORD})
    broker = KafkaBroker(directory / "data", secure=secure)
    broker.start(timeout=120)
    try:
        yield broker, f"127.0.0.1:{secure.port}", ca
    finally:
        broker.stop()


def client_options(ca: Path, password: str) -> dict:
    return {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": USER,
        "sasl.password": password,
        "ssl.ca.location": str(ca),
    }


def test_consumer_authenticates_with_scram_over_tls_and_works(secure_kafka, policies_dir):
    broker, secure_bootstrap, ca = secure_kafka
    topic, group = unique("secure"), unique("group")
    create_topics(broker.bootstrap, topic, f"{topic}.verdicts", f"{topic}.dlq")
    produce(broker.bootstrap, topic, (event_json(i) for i in range(50)))
    settings = settings_for(secure_bootstrap, group, topic, policies_dir,
                            kafka={"common": client_options(ca, PASSWORD)})
    outputs = Collector(broker.bootstrap, f"{topic}.verdicts")
    try:
        with running_pipeline(settings, KeywordClassifier()) as running:
            assert len(outputs.until(50, timeout=60)) == 50
            wait_for(lambda: committed_offsets(broker.bootstrap, group, topic, 1) == {0: 50}, timeout=30,
                     message="commits over SASL_SSL")
            assert running.stop().exit_code == 0
    finally:
        outputs.close()


def test_wrong_password_fails_fast_without_showing_the_password(secure_kafka, policies_dir, caplog):
    broker, secure_bootstrap, ca = secure_kafka
    topic, group = unique("denied"), unique("group")
    create_topics(broker.bootstrap, topic, f"{topic}.verdicts", f"{topic}.dlq")
    wrong = "wrong-password-do-not-print"
    settings = settings_for(secure_bootstrap, group, topic, policies_dir, kafka={"common": client_options(ca, wrong)})
    caplog.set_level(logging.DEBUG)
    with running_pipeline(settings, KeywordClassifier()) as running:
        wait_for(lambda: running.result is not None, timeout=30, message="the consumer to give up")
    assert running.result.exit_code == 1
    assert "Authentication failed" in running.result.reason or "authentication" in running.result.reason.lower()
    assert wrong not in running.result.reason
    assert wrong not in caplog.text
