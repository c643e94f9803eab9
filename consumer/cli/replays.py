"""The `replay` command: a past offset range through the pipeline, and its backtest; with `--run`,
a worker of a run shared by many (`replay status NAME` shows such a run)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from consumer.cli.app import (
    BootstrapOption,
    ConfigOption,
    app,
    bootstrap_override,
    config_exit,
    preflight_or_exit,
    settings_or_exit,
)
from consumer.config import ConfigError, load_settings

if TYPE_CHECKING:
    from rich.console import Console

    from consumer.classify import Classifier
    from consumer.config import Settings
    from consumer.policy import PolicyStore

RUNS_TOPIC = "safeguard-replay-runs"  # consumer.replay.runs.RUNS_TOPIC; here so that --help imports nothing heavy
RunsTopicOption = typer.Option(RUNS_TOPIC, "--runs-topic", help="The compacted topic that holds the plans of runs.")

replay_app = typer.Typer(rich_markup_mode=None)
EXIT_INCOMPLETE = 3  # `replay status`: the run is not complete yet
app.add_typer(replay_app, name="replay")


@replay_app.callback(invoke_without_command=True)
def replay(
    ctx: typer.Context,
    topic: Optional[str] = typer.Option(None, "--topic", help="The topic to replay (needed)."),
    start: Optional[str] = typer.Option(None, "--from", help="ISO-8601 time (UTC if unzoned), offset, earliest, now."),
    end: Optional[str] = typer.Option(None, "--to", help="Same forms as --from; fixed when the replay starts."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; SAFEGUARD_* env overrides it."),
    partitions: Optional[str] = typer.Option(None, help="Comma-separated partitions, e.g. 0,3; all by default."),
    policy: Optional[str] = typer.Option(None, help="ID or ID@FILE: only this policy, on every record."),
    output_topic: Optional[str] = typer.Option(None, help="Write verdicts and dead letters to this topic."),
    output: Optional[Path] = typer.Option(None, help="Write verdicts and dead letters to this JSONL file."),
    rate: Optional[str] = typer.Option(None, help="Cap on records a second, e.g. 200/s or 6000/min."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted replay of the checkpoint."),
    checkpoint_file: Optional[Path] = typer.Option(None, "--checkpoint", help="Default: next to the output."),
    compare_with: Optional[str] = typer.Option(None, "--compare", help="Baseline verdicts: a topic or a JSONL file."),
    report: Optional[Path] = typer.Option(None, help="Backtest Markdown report; default backtest-RUN.md."),
    bootstrap_servers: Optional[str] = BootstrapOption,
    priority: str = typer.Option("low", help="live or low: a remote reasoner's priority on a shared fleet."),
    run: Optional[str] = typer.Option(None, "--run", help="Start or join the run NAME, shared by every worker "
                                      "given the same command (to --output-topic; no checkpoint file)."),
    runs_topic: str = RunsTopicOption,
) -> None:
    """Replay an offset range of a topic through the pipeline, and backtest a policy change with --compare.

    With --run NAME, start or join a run shared by many workers: the first fixes its plan on the
    run topic, every worker joins the run's consumer group and gets partitions by the group
    protocol, and the group's committed offsets are the progress. `replay status NAME` shows it."""
    from rich.console import Console

    from consumer.classify.factory import build_classifier
    from consumer.kafka.admin import TopicNeed
    from consumer.pipeline.preflight import Needs
    from consumer.policy import PolicyError
    from consumer.policy.route import RoutingError
    from consumer.replay import ReplayError
    from consumer.replay.backtest import backtest
    from consumer.replay.bounds import Bound, parse_rate
    from consumer.replay.checkpoint import Checkpoint
    from consumer.replay.outputs import keep_delivered_lines
    from consumer.replay.run import (
        Replay,
        check_resumable,
        plan_replay,
        refuse_exactly_once,
        replay_policies,
        replay_settings,
        summary,
    )

    if ctx.invoked_subcommand is not None:
        return
    console, status = Console(), Console(stderr=True)
    if topic is None:
        raise config_exit("--topic is needed")
    if run is not None:
        _refuse_single_process_options(output, resume, checkpoint_file, output_topic)
    elif (output_topic is None) == (output is None):
        raise config_exit("give exactly one of --output-topic and --output")
    try:
        settings = load_settings(config, bootstrap_override(bootstrap_servers))
        refuse_exactly_once(settings)
        _log_through(status, settings.log.level, settings.log.format == "json")
        # The replay's own topics, before anything is planned or classified: a wrong address or
        # a missing topic is one line now, not a stalled run later.
        needs = [TopicNeed("--topic", topic, write=False, remedy="replay reads an existing topic: check the name")]
        if output_topic:
            needs.append(TopicNeed("--output-topic", output_topic, write=True,
                                   remedy="create it first, or write to a file with --output FILE.jsonl"))  # fmt: skip
        if settings.policies.topic and policy is None:
            needs.append(TopicNeed("policies.topic", settings.policies.topic, write=False))
        preflight_or_exit(settings, Needs(needs), config, bootstrap_servers)
        settings, policies = replay_policies(settings, policy)
        limit = parse_rate(rate) if rate else None
        if priority not in ("live", "low"):
            raise ReplayError(f"--priority must be live or low, not {priority!r}")
        if run is not None:
            if start is None or end is None:
                raise ReplayError("--from and --to are needed")
            bounds = (Bound.parse(start), Bound.parse(end))
        else:
            where = f"topic:{output_topic}" if output_topic else f"file:{output.resolve()}"  # type: ignore[union-attr]
            path = checkpoint_file or _default_checkpoint(topic, output_topic, output)
            if resume:
                checkpoint = Checkpoint.load(path)
                check_resumable(checkpoint, topic, where, policies)
                if output is not None:
                    dropped = keep_delivered_lines(output, checkpoint)
                    if dropped:
                        status.print(f"dropped {dropped} lines written after the last checkpoint; they are redone")
                status.print(f"resuming replay {checkpoint.run_id}: its offset ranges, fixed when it started, apply")
            else:
                if start is None or end is None:
                    raise ReplayError("--from and --to are needed (unless --resume)")
                if output is not None and output.exists() and output.stat().st_size:
                    raise ReplayError(f"{output} exists; pass --resume to continue its replay, or remove it")
                checkpoint = plan_replay(settings, policies, topic, where, Bound.parse(start), Bound.parse(end),
                                         _partitions(partitions))  # fmt: skip
                checkpoint.save(path)
        # Low by default: on a fleet shared with the live consumer, a replay must not slow live traffic.
        # Raises ConfigError for whatever the classifier section gets wrong (validation, imports).
        classifier = build_classifier(settings, policies, priority=priority)
    except (ConfigError, PolicyError, RoutingError, ReplayError) as exc:
        raise config_exit(str(exc)) from None

    if run is not None:
        assert output_topic is not None
        _run_worker(settings, policies, classifier, run, runs_topic, topic, (start, end),  # type: ignore[arg-type]
                    bounds,
                    _partitions_or_exit(partitions), output_topic, limit, compare_with, report, console, status)
        return
    run_settings = replay_settings(settings, checkpoint.run_id, topic, output_topic)
    job = Replay(run_settings, classifier, policies, checkpoint, path, output, limit, status)
    result = asyncio.run(job.run())
    console.print(summary(checkpoint, result, output_topic or str(output)))
    if result.run.exit_code:
        console.print(f"[red]error:[/] {result.run.reason}")
    elif compare_with and result.finished:
        candidate: Path | str = output if output is not None else output_topic  # type: ignore[assignment]
        try:
            backtest(settings, checkpoint, candidate, compare_with,
                     report or Path(f"backtest-{checkpoint.run_id}.md"), console)  # fmt: skip
        except ReplayError as exc:
            raise config_exit(str(exc)) from None
    raise typer.Exit(result.exit_code)


def _refuse_single_process_options(
    output: Optional[Path], resume: bool, checkpoint_file: Optional[Path], output_topic: Optional[str]
) -> None:
    if output is not None:
        raise config_exit("--output FILE cannot take a run's outputs: each worker would write its own file; "
                          "give --output-topic, which every worker writes to and the backtest reads once")  # fmt: skip
    if resume or checkpoint_file is not None:
        raise config_exit("--resume and --checkpoint are for a replay without --run: a run's progress is its "
                          "group's committed offsets, and the same command continues it")  # fmt: skip
    if output_topic is None:
        raise config_exit("--run needs --output-topic")


def _run_worker(
    settings: Settings,
    policies: PolicyStore,
    classifier: Classifier,
    name: str,
    runs_topic: str,
    topic: str,
    written: tuple[str, str],
    bounds: tuple,
    partitions: list[int] | None,
    output_topic: str,
    limit: float | None,
    compare_with: Optional[str],
    report: Optional[Path],
    console: Console,
    status: Console,
) -> None:
    """One worker of run `name`: join (or plan) it, replay this worker's share, say how the run stands."""
    from consumer.errors import Fatal
    from consumer.kafka.admin import connect
    from consumer.replay import ReplayError
    from consumer.replay.backtest import backtest
    from consumer.replay.run import Replay, join_run, policy_refs, replay_settings
    from consumer.replay.runs import (
        RunLedger,
        RunRequest,
        as_checkpoint,
        check_run_name,
        classifier_fingerprint,
        committed_offsets,
        run_group,
        run_status,
        status_table,
    )

    try:
        check_run_name(name)
        if run_group(name) == settings.kafka.group_id:
            raise ReplayError(f"--run {name!r}: its group {run_group(name)!r} is kafka.group_id, the live group's")
        request = RunRequest(topic=topic, start=written[0], end=written[1], partitions=partitions,
                             output=f"topic:{output_topic}", policies=policy_refs(policies),
                             classifier=classifier_fingerprint(settings))  # fmt: skip
        cluster = connect(settings)
        ledger = RunLedger(settings, runs_topic)
        ledger.ensure(cluster)
        records = join_run(ledger, settings, name, request, *bounds)
        plan = records.plan
        assert plan is not None
        finished_before = records.completed is not None
        committed = {} if finished_before else committed_offsets(settings, plan)
    except ReplayError as exc:
        raise config_exit(str(exc)) from None
    except Fatal as exc:  # the brokers or the run topic: try again later
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    checkpoint = as_checkpoint(plan, committed)
    exit_code = 0
    if finished_before:
        finished_at = (records.completed or {}).get("finished_at", "?")
        status.print(f"replay run {name} is complete (finished at {finished_at}): nothing to replay")
    else:
        status.print(f"replay run {name}: {len(plan.ranges)} partitions, {plan.records()} records planned "
                     f"{plan.started_at:%Y-%m-%d %H:%M:%S} UTC; joining group {run_group(name)}")  # fmt: skip
        run_settings = replay_settings(settings, plan.name, topic, output_topic)
        job = Replay(run_settings, classifier, policies, checkpoint, None, None, limit, status, run=plan)
        result = asyncio.run(job.run())
        console.print(f"this worker: verdicts {result.run.verdicts} ({result.violations} violations), dead letters "
                      f"{result.run.dead_letters}, {sum(result.done_this_run.values())} records in "
                      f"{result.elapsed_s:.1f} s")  # fmt: skip
        try:
            if result.finished:
                ledger.complete(name)
            console.print(status_table(run_status(settings, cluster, ledger, name)))
        except Fatal as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if result.run.exit_code:
            console.print(f"[red]error:[/] {result.run.reason}")
        elif not result.finished:
            console.print("interrupted: the run goes on with its other workers; the same command joins it again")
        exit_code = result.exit_code
        finished_before = result.finished
    if compare_with and finished_before and not exit_code:
        checkpoint.finish()
        try:
            backtest(settings, checkpoint, output_topic, compare_with, report or Path(f"backtest-{name}.md"), console)
        except ReplayError as exc:
            raise config_exit(str(exc)) from None
    raise typer.Exit(exit_code)


@replay_app.command("status")
def replay_status(
    name: str = typer.Argument(..., help="The run's name, as given to --run."),
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
    runs_topic: str = RunsTopicOption,
) -> None:
    """A replay run's progress: per partition, the planned range, the run group's committed offset and
    the member holding it; complete or not. Exit 0 when complete, 3 when not, 2 for an unknown run."""
    from rich.console import Console

    from consumer.errors import Fatal
    from consumer.kafka.admin import connect
    from consumer.pipeline.preflight import Needs
    from consumer.replay import ReplayError
    from consumer.replay.runs import RunLedger, check_run_name, run_status, status_table

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    preflight_or_exit(settings, Needs([]), config, bootstrap_servers)
    try:
        check_run_name(name)
        state = run_status(settings, connect(settings), RunLedger(settings, runs_topic), name)
    except ReplayError as exc:
        raise config_exit(str(exc)) from None
    except Fatal as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    Console().print(status_table(state))
    raise typer.Exit(0 if state.completed or state.at_end else EXIT_INCOMPLETE)


def _partitions_or_exit(text: str | None) -> list[int] | None:
    from consumer.replay import ReplayError

    try:
        return _partitions(text)
    except ReplayError as exc:
        raise config_exit(str(exc)) from None


def _partitions(text: str | None) -> list[int] | None:
    from consumer.replay import ReplayError

    if not text:
        return None
    try:
        return sorted({int(p) for p in text.split(",")})
    except ValueError:
        raise ReplayError(f"--partitions {text!r}: expected numbers separated by commas, e.g. 0,3") from None


def _default_checkpoint(topic: str, output_topic: str | None, output: Path | None) -> Path:
    if output is not None:
        return output.with_name(output.name + ".checkpoint.json")
    return Path(f"replay-{topic}-to-{output_topic}.checkpoint.json")


def _log_through(console: Console, level: str, json_format: bool) -> None:
    # Log lines printed through rich appear above the progress bars instead of tearing them;
    # JSON lines (log.format: json) go to stderr as `run` writes them, for the same collector.
    from rich.logging import RichHandler

    from consumer.pipeline.telemetry.logs import configure_logging

    if json_format:
        configure_logging(level, json_format=True)
        return
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[RichHandler(console=console)])
