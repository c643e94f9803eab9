"""The `replay` command: a past offset range through the pipeline, and its backtest."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from consumer.cli.app import (
    BootstrapOption,
    app,
    bootstrap_override,
    config_exit,
    preflight_or_exit,
)
from consumer.config import ConfigError, load_settings

if TYPE_CHECKING:
    from rich.console import Console


@app.command()
def replay(
    topic: str = typer.Option(..., "--topic", help="The topic to replay."),
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
) -> None:
    """Replay an offset range of a topic through the pipeline, and backtest a policy change with --compare."""
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

    console, status = Console(), Console(stderr=True)
    if (output_topic is None) == (output is None):
        raise config_exit("give exactly one of --output-topic and --output")
    try:
        settings = load_settings(config, bootstrap_override(bootstrap_servers))
        refuse_exactly_once(settings)
        settings, policies = replay_policies(settings, policy)
        _log_through(status, settings.log.level, settings.log.format == "json")
        # The replay's own topics, before anything is planned or classified: a wrong address or
        # a missing topic is one line now, not a stalled run later.
        needs = [TopicNeed("--topic", topic, write=False, remedy="replay reads an existing topic: check the name")]
        if output_topic:
            needs.append(TopicNeed("--output-topic", output_topic, write=True,
                                   remedy="create it first, or write to a file with --output FILE.jsonl"))  # fmt: skip
        preflight_or_exit(settings, Needs(needs), config, bootstrap_servers)
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
        limit = parse_rate(rate) if rate else None
        if priority not in ("live", "low"):
            raise ReplayError(f"--priority must be live or low, not {priority!r}")
        # Low by default: on a fleet shared with the live consumer, a replay must not slow live traffic.
        # Raises ConfigError for whatever the classifier section gets wrong (validation, imports).
        classifier = build_classifier(settings, policies, priority=priority)
    except (ConfigError, PolicyError, RoutingError, ReplayError) as exc:
        raise config_exit(str(exc)) from None

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
