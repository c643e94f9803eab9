"""One replay run: its plan (offset ranges, policies, settings), the `Pipeline` with the replay's
source and sink, its progress bars and its result.

The command (`safeguard-consumer replay`) is in `consumer.cli`; it calls, in order,
`replay_policies`, `plan_replay` (or `Checkpoint.load` and `check_resumable`),
`replay_settings`, `Replay.run`, then `summary` and, with `--compare`, the backtest. A worker of a
run shared by many (`--run`) calls `join_run` instead of planning, and `Replay` with the run's plan.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from consumer.classify import Classifier
from consumer.config import Settings
from consumer.errors import Unavailable
from consumer.events import ReplayInfo
from consumer.kafka.client import Consumer, KafkaException
from consumer.kafka.client_logs import client_options
from consumer.kafka.offsets import Ticket
from consumer.kafka.policy_topic import read_policy_topic
from consumer.kafka.roles import SourceOptions, SourceWiring
from consumer.pipeline.pipeline import Pipeline, RunResult
from consumer.policy import PolicyError, PolicyStore, load_policy
from consumer.policy.route import Router
from consumer.policy.topic import TopicPolicyStore
from consumer.replay import ReplayError
from consumer.replay.bounds import Bound, OffsetRange, TokenBucket, resolve_ranges
from consumer.replay.checkpoint import Checkpoint
from consumer.replay.group_source import RunSource
from consumer.replay.outputs import ReplayOutput
from consumer.replay.runs import RunLedger, RunPlan, RunRecords, RunRequest, new_plan
from consumer.replay.source import ReplaySource, replay_consumer_config
from consumer.sinks.file import JsonlSink
from consumer.sinks.kafka import KafkaSink
from consumer.sinks.roles import OutputSink, SinkOptions, SinkWiring

EXIT_INTERRUPTED = 130


# -- the plan ----------------------------------------------------------------------------------


def refuse_exactly_once(settings: Settings) -> None:
    """A replay commits no offsets (its checkpoint file records how far it got), so there is no
    transaction for its outputs to join: `pipeline.delivery: exactly_once` cannot be honoured,
    and is refused rather than quietly run at-least-once."""
    if settings.pipeline.delivery == "exactly_once":
        raise ReplayError(
            "pipeline.delivery is exactly_once, which a replay cannot honour (it commits no offsets; "
            "its checkpoint records its progress): run it with pipeline.delivery: at_least_once, "
            "e.g. SAFEGUARD_PIPELINE__DELIVERY=at_least_once"
        )


def replay_settings(settings: Settings, run_id: str, topic: str, output_topic: str | None) -> Settings:
    """The live settings narrowed to a replay: one input topic, its own group, one output for
    verdicts and dead letters alike (plain JSON), policies fixed for the whole run, no health endpoint."""
    kafka = settings.kafka.model_copy(update={
        "input_topics": [topic],
        "group_id": f"safeguard-replay-{run_id}",
        "verdict_topic": output_topic or "",
        "dead_letter_topic": output_topic or "",
    })  # fmt: skip
    policies = settings.policies.model_copy(update={"reload_interval_s": 0.0})
    # The live consumer may serve its health port on this host; a replay stays off it.
    telemetry = settings.telemetry.model_copy(update={"http_port": None})
    # One output topic takes both kinds (one subject cannot hold both schemas), and backtests read plain JSON.
    sinks = settings.sinks.model_copy(update={"registered_outputs": []})
    return settings.model_copy(update={"kafka": kafka, "policies": policies, "telemetry": telemetry, "sinks": sinks})


def replay_policies(settings: Settings, policy: str | None) -> tuple[Settings, PolicyStore]:
    """The policies a replay runs, fixed for the run.

    Without `policy`: the configured directory and routes, as the live consumer runs them.
    With `ID` or `ID@FILE`: that one policy (the file's version when given) applies to every
    record, routes aside, so that a backtest compares one policy's decisions.
    """
    if policy is None:
        if settings.policies.topic:
            store: PolicyStore = _with_policy_topic(settings)
            # Read once, fixed for the run: a pipeline given no topic does not follow it.
            settings = settings.model_copy(update={"policies": settings.policies.model_copy(update={"topic": None})})
        else:
            store = PolicyStore(settings.policies.directory, settings.policies.max_tokens)
        Router(settings.policies, store.get)  # fails early on routes naming unknown policies
        return settings, store
    policy_id, _, file = policy.partition("@")
    if file:
        source = Path(file)
        named = load_policy(source).id
        if named != policy_id:
            raise PolicyError(f"{source}:2: its id is {named!r}, not {policy_id!r}")
    else:
        configured = PolicyStore(settings.policies.directory, settings.policies.max_tokens).get()
        if policy_id not in configured or configured[policy_id].path is None:
            hint = (f" (one on {settings.policies.topic}: `policy show {policy_id} > FILE`, then --policy "
                    f"{policy_id}@FILE)" if settings.policies.topic else "")  # fmt: skip
            raise PolicyError(f"{settings.policies.directory}:0: no policy {policy_id!r}{hint}")
        source = configured[policy_id].path
    # A store of exactly this file: PolicyStore validates it as it would a live edit. Reloads
    # are off for a replay, so the staging folder is not needed once loaded.
    with tempfile.TemporaryDirectory(prefix="safeguard-replay-policy-") as staging:
        shutil.copyfile(source, Path(staging) / f"{policy_id}.md")
        store = PolicyStore(Path(staging), settings.policies.max_tokens)
    narrowed = settings.policies.model_copy(update={"routes": [], "default": policy_id})
    return settings.model_copy(update={"policies": narrowed}), store


def _with_policy_topic(settings: Settings) -> TopicPolicyStore:
    """The policy files merged with `policies.topic` as it is now, as the live consumer merges them."""
    assert settings.policies.topic is not None
    k = settings.kafka
    client = k.consumer_options | {"bootstrap.servers": k.bootstrap_servers, **client_options("policies")}
    store = TopicPolicyStore(settings.policies.directory, settings.policies.max_tokens)
    try:
        store.apply(read_policy_topic(client, settings.policies.topic, k.startup_timeout_s))
    except Unavailable as exc:
        raise ReplayError(f"policies.topic: {exc}") from None
    return store


def plan_replay(
    settings: Settings,
    policies: PolicyStore,
    topic: str,
    output: str,
    start: Bound,
    end: Bound,
    partitions: list[int] | None = None,
) -> Checkpoint:
    """A fresh run: the offset ranges resolved now, the policy versions in force."""
    return Checkpoint(
        run_id=uuid.uuid4().hex[:12],
        topic=topic,
        output=output,
        policies=policy_refs(policies),
        started_at=datetime.now(timezone.utc),
        ranges=offset_ranges(settings, topic, partitions, start, end),
    )


def policy_refs(policies: PolicyStore) -> list[str]:
    """The `id@version` of every policy in force, sorted: what a run's outputs are stamped with."""
    return sorted(p.ref for p in policies.get().values())


def offset_ranges(
    settings: Settings, topic: str, partitions: list[int] | None, start: Bound, end: Bound
) -> dict[int, OffsetRange]:
    """START and END resolved to offsets per partition, now."""
    probe = Consumer(replay_consumer_config(settings.kafka.bootstrap_servers, "safeguard-replay-plan",
                                            settings.kafka.consumer_options))  # fmt: skip
    try:
        return resolve_ranges(probe, topic, partitions, start, end)
    except KafkaException as exc:
        raise ReplayError(f"cannot read the offsets of {topic!r}: {exc}") from None
    finally:
        probe.close()


def check_resumable(checkpoint: Checkpoint, topic: str, output: str, policies: PolicyStore) -> None:
    """A resumed run must write where the first part wrote, with the same policy versions."""
    if checkpoint.topic != topic or checkpoint.output != output:
        raise ReplayError(f"the checkpoint is of a replay of {checkpoint.topic!r} to {checkpoint.output}, "
                          f"not of {topic!r} to {output}")  # fmt: skip
    now = policy_refs(policies)
    if now != checkpoint.policies:
        raise ReplayError(f"the policies changed since the replay started ({', '.join(checkpoint.policies)} then, "
                          f"{', '.join(now)} now); start a new replay without --resume")  # fmt: skip


# -- progress ----------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="cyan")


class ReplayProgress:
    """A rich progress bar per partition: records of the offset range done, rate, time left.

    `delivered` may be called from any thread (rich's Progress holds a lock)."""

    def __init__(self, console: Console, checkpoint: Checkpoint):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeRemainingColumn(), console=console,
        )  # fmt: skip
        self._totals = {p: r.end - r.start for p, r in checkpoint.ranges.items()}
        self._tasks = {
            p: self.progress.add_task(f"{checkpoint.topic}[{p}]", total=self._totals[p], completed=r.next - r.start)
            for p, r in sorted(checkpoint.ranges.items())
        }
        self.done_this_run: Counter[int] = Counter()

    def delivered(self, tickets: list[Ticket]) -> None:
        by_partition = Counter(ticket.partition for ticket in tickets)
        for partition, count in by_partition.items():
            self.done_this_run[partition] += count
            self.progress.advance(self._tasks[partition], count)

    def complete(self) -> None:
        for partition, task in self._tasks.items():
            self.progress.update(task, completed=self._totals[partition])


# -- one replay run ----------------------------------------------------------------------------


@dataclass
class ReplayResult:
    finished: bool  # every record of the offset ranges has its output
    run: RunResult
    violations: int
    done_before: dict[int, int]  # per partition, records an interrupted earlier part delivered
    done_this_run: dict[int, int]
    elapsed_s: float

    @property
    def exit_code(self) -> int:
        if self.run.exit_code:
            return self.run.exit_code
        return 0 if self.finished else EXIT_INTERRUPTED


class Replay:
    """One replay run over the offset ranges of `checkpoint`: the live `Pipeline` with a
    `ReplaySource` and a `ReplayOutput`, writing to `output_file` or to the settings' verdict topic.

    `settings` are the replay's own (see `replay_settings`; exactly-once is refused, see
    `refuse_exactly_once`); the checkpoint file is saved as the run goes, and `run()` returns
    when the ranges are done, on `stop()`, on SIGINT/SIGTERM when handlers are installed, or
    on a fatal error.

    With `run` (a worker of a run shared by many, `replay --run`), the source is a `RunSource`
    instead: the run's consumer group shares the partitions out and its committed offsets are
    the progress; `checkpoint` (`consumer.replay.runs.as_checkpoint`) is then only what the
    progress bars and the summary start from, and no file is saved.
    """

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        policies: PolicyStore,
        checkpoint: Checkpoint,
        checkpoint_path: Path | None,
        output_file: Path | None = None,
        rate: float | None = None,
        console: Console | None = None,
        run: RunPlan | None = None,
    ):
        refuse_exactly_once(settings)
        if (run is None) == (checkpoint_path is None):
            raise ValueError("a replay saves a checkpoint file, a worker of a run does not: give exactly one")
        self.run_plan = run
        self.checkpoint = checkpoint
        self.checkpoint_path = checkpoint_path
        self.output_file = output_file
        self.rate = rate
        self.info = ReplayInfo(run_id=checkpoint.run_id, started_at=checkpoint.started_at, policies=checkpoint.policies)
        self.progress = ReplayProgress(console or Console(stderr=True), checkpoint)
        self.done_before = {p: r.next - r.start for p, r in checkpoint.ranges.items()}
        self.pipeline = Pipeline(
            settings, classifier, policies, source_factory=self._connect_source, sink_factory=self._open_sink
        )
        self.source: ReplaySource | RunSource | None = None
        self.output: ReplayOutput | None = None

    def stop(self) -> None:
        """Interrupt: drain what is in flight, save the checkpoint, return; safe from any thread."""
        self.pipeline.stop()

    async def run(self, install_signal_handlers: bool = True) -> ReplayResult:
        started = time.monotonic()
        with self.progress.progress:
            result = await self.pipeline.run(install_signal_handlers)
            finished = self.source is not None and self.source.finished
            if finished:
                self.progress.complete()
        return ReplayResult(
            finished=finished,
            run=result,
            violations=self.output.violations if self.output else 0,
            done_before=self.done_before,
            done_this_run=dict(self.progress.done_this_run),
            elapsed_s=time.monotonic() - started,
        )

    def _connect_source(self, options: SourceOptions, wiring: SourceWiring) -> ReplaySource | RunSource:
        """The pipeline's `SourceFactory`."""
        limiter = TokenBucket(self.rate) if self.rate else None
        if self.run_plan is not None:
            self.source = RunSource.connect(options, wiring, self.run_plan, self.pipeline.stop, limiter)
        else:
            assert self.checkpoint_path is not None
            self.source = ReplaySource.connect(options, wiring, self.checkpoint, self.checkpoint_path,
                                               on_finished=self.pipeline.stop, limiter=limiter)  # fmt: skip
        return self.source

    def _open_sink(self, options: SinkOptions, wiring: SinkWiring) -> ReplayOutput:
        """The pipeline's `SinkFactory`: deliveries also move the progress bars."""

        def delivered(tickets: list[Ticket]) -> None:
            wiring.on_delivered(tickets)
            self.progress.delivered(tickets)

        inner: OutputSink
        if self.output_file is not None:
            inner = JsonlSink(self.output_file, delivered, wiring.on_fatal)
        else:
            inner = KafkaSink.open(options, dataclasses.replace(wiring, on_delivered=delivered))
        self.output = ReplayOutput(inner, self.info)
        return self.output


def summary(checkpoint: Checkpoint, result: ReplayResult, output: str) -> Table:
    """The table printed at the end: per partition, the offsets and what was done when."""
    state = "finished" if result.finished else "interrupted: run again with --resume to continue"
    if result.run.exit_code and not result.finished:  # an error, not a signal: resuming alone would meet it again
        state = "stopped by the error below: fix it, then run again with --resume"
    table = Table(title=f"Replay {checkpoint.run_id} of {checkpoint.topic}: {state}")
    for column in ("partition", "offsets", "records", "done before", "done this run", "left"):
        table.add_column(column, justify="right")
    for p, r in sorted(checkpoint.ranges.items()):
        table.add_row(str(p), f"{r.start}..{r.end}", str(r.end - r.start), str(result.done_before.get(p, 0)),
                      str(result.done_this_run.get(p, 0)), str(r.end - r.next))  # fmt: skip
    run = result.run
    rate = sum(result.done_this_run.values()) / result.elapsed_s if result.elapsed_s else 0.0
    table.caption = (
        f"verdicts {run.verdicts} ({result.violations} violations), dead letters {run.dead_letters}, "
        f"{result.elapsed_s:.1f} s, {rate:,.0f} records/s; policies {', '.join(checkpoint.policies)}; to {output}"
    )
    return table


def join_run(
    ledger: RunLedger, settings: Settings, name: str, request: RunRequest, start: Bound, end: Bound
) -> RunRecords:
    """The run's records, its plan fixed: the first on the run topic, or this worker's proposal when
    none was there. Refuses (ReplayError) a request that differs from the plan, naming what differs."""
    records = ledger.read(name)
    if records.plan is None:
        ranges = offset_ranges(settings, request.topic, request.partitions, start, end)
        records.plan = ledger.agree(new_plan(name, request, ranges))
    differences = records.plan.differences(request)
    if differences:
        raise ReplayError(f"replay run {name!r} was planned otherwise ({'; '.join(differences)}): give the same "
                          "options and configuration as its first worker, or another --run name")  # fmt: skip
    return records
