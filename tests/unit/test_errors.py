"""Each layer's errors belong to the consumer's family (consumer.errors), on the side of the
recoverable/fatal split that says what a caller must do with them, and keep the older bases
their callers catch."""

from __future__ import annotations

import pytest

from consumer.classify import ClassificationFailed
from consumer.classify.cascade import CascadeUnavailable
from consumer.classify.engine import EngineUnavailable
from consumer.classify.exceptions import EmbeddingUnavailable
from consumer.config import ConfigError
from consumer.console.server import ConsoleError
from consumer.errors import ConsumerError, Fatal, RecordFault, Unavailable
from consumer.events import ErrorType
from consumer.kafka.admin import TopicProblem, Unreachable
from consumer.kafka.budget import OutputRefused
from consumer.kafka.devkafka import DevKafkaError
from consumer.pipeline.http import PortInUse
from consumer.pipeline.telemetry.tracing import TelemetryError
from consumer.policy import PolicyError
from consumer.policy.examples import DataError
from consumer.policy.route import RoutingError
from consumer.replay import ReplayError
from consumer.review.decisions import RejectedInput


@pytest.mark.parametrize(
    ("error", "family", "older"),
    [
        # "not installed" is no outage: no wait repairs it
        (EngineUnavailable, Fatal, RuntimeError),
        (CascadeUnavailable, Fatal, RuntimeError),
        (EmbeddingUnavailable, Fatal, RuntimeError),
        (ConfigError, Fatal, Exception),
        (PolicyError, Fatal, ValueError),
        (RoutingError, Fatal, ValueError),
        (DataError, Fatal, ValueError),
        (Unreachable, Fatal, Exception),
        (TopicProblem, Fatal, Exception),
        (OutputRefused, Fatal, Exception),
        (DevKafkaError, Fatal, RuntimeError),
        (TelemetryError, Fatal, ValueError),
        (PortInUse, Fatal, Exception),
        (ReplayError, Fatal, ValueError),
        (ConsoleError, Fatal, Exception),
    ],
)
def test_a_layers_fatal_error_is_fatal_and_keeps_its_older_base(error: type, family: type, older: type):
    assert issubclass(error, ConsumerError) and issubclass(error, family) and issubclass(error, older)
    assert not issubclass(error, (RecordFault, Unavailable))


@pytest.mark.parametrize(
    "fault",
    [
        ClassificationFailed(ErrorType.CLASSIFIER_ERROR, "no verdict", raw_output="{", attempts=3),
        RejectedInput(ErrorType.INVALID_JSON, "not valid JSON"),
    ],
)
def test_a_records_fault_names_its_dead_letter_type(fault: RecordFault):
    assert isinstance(fault, RecordFault) and not isinstance(fault, (Fatal, Unavailable))
    assert fault.error_type in (ErrorType.CLASSIFIER_ERROR, ErrorType.INVALID_JSON) and str(fault)


def test_a_classification_failure_keeps_what_its_dead_letter_carries():
    failed = ClassificationFailed(ErrorType.CLASSIFIER_ERROR, "no verdict", raw_output="{", attempts=3)
    assert (str(failed), failed.error_type, failed.raw_output, failed.attempts) == (
        "no verdict", ErrorType.CLASSIFIER_ERROR, "{", 3)
