"""The sink: owns "every output is delivered, or the consumer stops".

Verdicts and dead letters go through one idempotent producer (`acks=all`), keyed like the
input record so they land in the matching partition order downstream. A delivery report is
served on the sink's own thread; on success the record's ticket is handed to `on_delivered`
(the offset tracker then lets its offset be committed). A retriable delivery error re-sends
the record up to `delivery_retries` times; anything else is fatal: `on_fatal` is called and
the record is never marked delivered, so its offset is never committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from consumer.offsets import Ticket

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes | None]]

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
}


class Sink:
    def __init__(
        self,
        producer_config: dict[str, Any],
        verdict_topic: str,
        dead_letter_topic: str,
        on_delivered: Callable[[Ticket], None],
        on_fatal: Callable[[str], None],
        delivery_retries: int = 3,
    ):
        config = {**PRODUCER_DEFAULTS, **producer_config, "error_cb": self._on_client_error}
        # Idempotence and acks=all are what "delivered" means here; they cannot be turned off.
        config["enable.idempotence"] = True
        config["acks"] = "all"
        self._producer = Producer(config)
        self.verdict_topic = verdict_topic
        self.dead_letter_topic = dead_letter_topic
        self._on_delivered = on_delivered
        self._on_fatal = on_fatal
        self._delivery_retries = delivery_retries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="sink-delivery", daemon=True)
        self.failed: str | None = None

    def start(self) -> None:
        self._thread.start()

    async def send_verdict(self, verdict: BaseModel, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        await self._send(self.verdict_topic, _encode(verdict), key, ticket, headers)

    async def send_dead_letter(self, letter: BaseModel, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        await self._send(self.dead_letter_topic, _encode(letter), key, ticket, headers)

    async def _send(self, topic: str, value: bytes, key: bytes | None, ticket: Ticket, headers: Headers) -> None:
        # A full local queue (BufferError) means the broker is slower than we are: wait, never drop.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(BufferError), wait=wait_exponential(multiplier=0.005, max=0.5)
        ):
            with attempt:
                self._produce(topic, value, key, ticket, headers, attempt=0)

    def _produce(self, topic: str, value: bytes, key: bytes | None, ticket: Ticket, headers: Headers, attempt: int) -> None:
        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                self._on_delivered(ticket)
            elif err.retriable() and attempt < self._delivery_retries:
                log.warning("retrying delivery to %s after %s (attempt %d)", topic, err.str(), attempt + 1)
                self._resend(topic, value, key, ticket, headers, attempt + 1)
            else:
                self._fail(f"delivery to topic {topic!r} failed: {err.str()}")

        self._producer.produce(topic, value=value, key=key, headers=headers or None, on_delivery=report)

    def _resend(self, topic: str, value: bytes, key: bytes | None, ticket: Ticket, headers: Headers, attempt: int) -> None:
        # Runs on the delivery thread, which may block: serve reports until the queue has room.
        while True:
            try:
                return self._produce(topic, value, key, ticket, headers, attempt)
            except BufferError:
                self._producer.poll(0.05)

    def _on_client_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fail(f"fatal producer error: {err.str()}")
        else:
            log.info("producer: %s", err.str())

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.error("%s", reason)
            self._on_fatal(reason)

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def flush(self, timeout: float) -> int:
        """Wait for outstanding deliveries; returns how many are still undelivered."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            return self._producer.flush(timeout)
        except KafkaException as exc:
            self._fail(f"flush failed: {exc}")
            return len(self._producer)

    def close(self) -> None:
        """Release the producer's connections; call after `flush`."""
        self._producer.close()

    def __len__(self) -> int:
        return len(self._producer)


def _encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))
