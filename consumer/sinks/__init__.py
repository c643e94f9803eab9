"""Where outputs go: the sink role and every sink, between the Kafka plumbing and the stages above.

- `roles.py`: the `OutputSink` role (verdicts, dead letters) and the abilities a sink may add,
  each a checkable Protocol (`CarriesReviewItems`, `AsksBrokers`); the options and wiring a
  sink factory takes. Contracts only.
- `kafka.py`: `KafkaSink` (at-least-once) and `TransactionalSink` (exactly-once) on the output topics.
- `file.py`: `JsonlSink`, a JSON Lines file (replays, and `sinks.files`).
- `fan_out.py`: `FanOutSink`, several destinations, an output delivered when all have it; and
  `configured`, the pipeline's own sink from the settings.

Nothing above this layer names a concrete sink to decide what to do: it asks for an ability.
This package imports no implementation in its `__init__`, so importing the role never imports
a client.
"""
