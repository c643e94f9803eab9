"""librdkafka options: the producers' defaults, and options checked by librdkafka itself, before anything connects.

`kafka.common`, `kafka.consumer` and `kafka.producer` are passed through to the clients, so
only the client can say whether `sasl.pasword` or `fetch.wait.max.ms: soon` is acceptable.
`check_client_options` builds each client once, offline (no bootstrap address, closed at
once), and turns a rejection into a `ConfigError` naming the key, never its value.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

from consumer.config import ConfigError, Settings

# What every producer of ours starts from (the sinks, the review loop, the console's writer):
# idempotence and acks=all are what "delivered" means here. linger.ms 20, not librdkafka's 5: the
# sink produces all the time, a few outputs per call, and at 5 ms its broker thread cost 3-6 µs an
# output (about 4 produce requests per 1000 outputs) against 1-2 µs at 20 ms (1.6-2.3 requests);
# docs/benchmark.md has the measurement. It adds at most 15 ms to a verdict's way out.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "compression.type": "lz4",
}

_PROPERTY = re.compile(r'property:? "([^"]+)"')
_QUOTED = re.compile(r'"[^"]*"')


class _Quiet:
    """A logger for the throwaway clients: they never connect, so they have nothing to say."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        return None


def check_client_options(settings: Settings) -> None:
    """Raise `ConfigError` naming `kafka.<section>.<option>` for an option librdkafka rejects."""
    k = settings.kafka
    problems = []
    for section, options in (("common", k.common), ("consumer", k.consumer), ("producer", k.producer)):
        if not options:
            continue
        problem = _rejection(section, {**(k.common if section != "common" else {}), **options})
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _rejection(section: str, options: dict[str, Any]) -> str | None:
    client = Producer if section == "producer" else Consumer
    config = {key: (str(value).lower() if isinstance(value, bool) else value) for key, value in options.items()}
    config = {**config, "logger": _Quiet()}
    if client is Consumer:
        config.setdefault("group.id", "safeguard-option-check")
    try:
        handle = client(config)
    except (KafkaException, TypeError, ValueError) as exc:
        error = exc.args[0] if exc.args else exc
        text = error.str() if hasattr(error, "str") else str(error)
        match = _PROPERTY.search(text)
        if match:
            key = match.group(1)
            what = "not a librdkafka option" if text.startswith("No such") else "librdkafka does not accept its value"
            if key not in options:  # librdkafka names the canonical property of an alias
                what += f" (librdkafka calls it {key})"
                key = next((k for k in options if k.split(".")[0] == key.split(".")[0]), key)
            return f"kafka.{section}.{key}: {what}"
        # No property named: say what librdkafka said, minus anything quoted (a value, maybe a secret).
        return f"kafka.{section}: librdkafka rejected the options: {_QUOTED.sub('...', text)}"
    try:
        if isinstance(handle, Consumer):
            handle.close()
        else:
            handle.flush(0)
    except (KafkaException, RuntimeError) as exc:  # pragma: no cover - nothing was connected
        logging.getLogger(__name__).debug("closing the option check's client: %s", exc)
    return None
