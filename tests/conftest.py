"""Suite-wide fixtures: one real Kafka broker per test session, on 127.0.0.1, and a real Schema Registry
for the tests that ask for one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from consumer.kafka.devkafka import KafkaBroker
from tests.registry import SchemaRegistry

REPO = Path(__file__).resolve().parent.parent

# Lines the fault suite reports (events, kills, duplicates, losses), printed at the end of the run.
FAULT_FIGURES: list[str] = []
# Why the session's schema registry was restarted between tests, printed at the end of the run.
REGISTRY_RESTARTS: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if FAULT_FIGURES:
        terminalreporter.section("fault suite figures")
        for line in FAULT_FIGURES:
            terminalreporter.write_line(line)
    if REGISTRY_RESTARTS:
        terminalreporter.section("schema registry restarts")
        for line in REGISTRY_RESTARTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def kafka_broker():
    """The broker object, for tests that restart it; most tests want `kafka` (the address)."""
    data_dir = Path(tempfile.mkdtemp(prefix="safeguard-kafka-"))
    broker = KafkaBroker(data_dir)
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()
        if not os.environ.get("SAFEGUARD_KEEP_KAFKA_DATA"):
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def registry_process():
    """Apicurio Registry on 127.0.0.1 (tests/registry.py), started once for the session when a test
    asks; tests take it through `schema_registry`, which checks it answers first."""
    log_dir = Path(tempfile.mkdtemp(prefix="safeguard-registry-"))
    registry = SchemaRegistry(log_dir / "registry.log")
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()
        if not REGISTRY_RESTARTS:  # else kept: the log holds the thread dump of the registry that hung
            shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture
def schema_registry(registry_process: SchemaRegistry, request) -> SchemaRegistry:
    """The session's registry, restarted first if it stopped answering (said at the end of the run)."""
    restarted = registry_process.restart_if_silent()
    if restarted:
        REGISTRY_RESTARTS.append(f"before {request.node.nodeid}: {restarted}")
    return registry_process


@pytest.fixture
def policies_dir() -> Path:
    return REPO / "policies"
