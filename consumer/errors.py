"""The family of the consumer's own errors: one base, and the three things a caller must tell apart.

A caller catches `ConsumerError` for "ours", and decides by type, never by message:

- `RecordFault`: this record is bad (bytes that do not decode, a request the classifier refuses
  as such, an answer that stays unparseable). It becomes a dead letter with `error_type`; the
  records after it go on.
- `Unavailable`: something the consumer depends on is down or not answering (the reasoner fleet,
  the in-process engine restarting, a schema registry, a policy topic). Never a record's fault:
  the record is kept, intake pauses, offsets stay uncommitted, `/readyz` says why, and the work
  is retried when the dependency answers again. `retry_after_s` is a hint for the next try.
- `Fatal`: the process cannot go on (a topic gone, authentication refused, an engine that died
  for good). The run stops with a non-zero exit, committing nothing past what was delivered.

Each layer keeps its own exceptions in an `exceptions` module (or beside the stage that raises
them), subclassing one of these three; this module is at the bottom of the layers so every layer
may use it. The split follows vLLM's `EngineGenerateError` (this request) / `EngineDeadError`
(the engine) and quix-streams' control-carrying `SinkBackpressureError(retry_after)`.
"""

from __future__ import annotations

from consumer.events import ErrorType


class ConsumerError(Exception):
    """Base of every error the consumer raises on purpose."""


class RecordFault(ConsumerError):
    """This record cannot be processed; it becomes a dead letter of `error_type`."""

    def __init__(self, error_type: ErrorType, message: str):
        super().__init__(message)
        self.error_type = error_type


class Unavailable(ConsumerError):
    """A dependency (`dependency` names it: "reasoner", "schema registry", ...) does not answer now.

    Recoverable: the caller keeps the record and tries again later, after `retry_after_s` at the
    earliest when it is set."""

    def __init__(self, dependency: str, reason: str, retry_after_s: float | None = None):
        super().__init__(f"{dependency} unavailable: {reason}")
        self.dependency = dependency
        self.reason = reason
        self.retry_after_s = retry_after_s


class Fatal(ConsumerError):
    """The run cannot go on; it stops with a non-zero exit and commits nothing past what was delivered."""
