"""Replay: run the pipeline over a fixed offset range of a historical topic, and backtest a policy change.

`safeguard-consumer replay` (the command is in `consumer.cli`) reads the records of one topic
between START and END through the same stages as the live consumer (decode, route, batcher,
classifier, dead letters; the `Pipeline` itself), with its source and sink roles played by others
(`consumer.kafka.roles`, `consumer.sinks.roles`):

- the `RecordSource` is `ReplaySource` (`source`): partitions are *assigned*, under a group
  id of the replay's own that never commits, so the live group's committed offsets are
  never touched; it hands on only records inside the offset range and, instead of
  committing, moves a `Checkpoint` file (`checkpoint`); it stops the pipeline once every
  partition reached END and every output was delivered;
- the `OutputSink` is `ReplayOutput` (`outputs`): stamps each output with `replay` (run id,
  start time, the `id@version` of every policy in force) and hands it to the `KafkaSink`
  (an output topic) or to the `JsonlSink` (a file) of `consumer.sinks`.

The offset range is fixed when a replay starts (`bounds`): START and END resolve to offsets
per partition (`offsets_for_times` for times, the high watermark for `now`), so a replay of
a live topic ends. It is stored in the checkpoint, and `--resume` continues the same range
with the same policy versions after an interruption without reclassifying what was
delivered. `run` puts one replay together; `backtest` compares its outputs with a baseline's.

A replay too big for one process is a *run* shared by many workers (`replay --run NAME`): its
plan is fixed once on a compacted run topic (`runs`), and each worker's source is `RunSource`
(`group_source`), a member of the run's own consumer group, whose committed offsets replace the
checkpoint.
"""

from consumer.errors import Fatal


class ReplayError(Fatal, ValueError):
    """A replay that cannot start as asked; the CLI exits with code 2 and prints this."""
