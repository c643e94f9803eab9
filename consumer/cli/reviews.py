"""Commands for human review: `review pending`, `export`, `audit`, `coop-bridge`, `console`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from consumer.cli.app import (
    BootstrapOption,
    ConfigOption,
    bootstrap_override,
    config_exit,
    preflight_or_exit,
    review_app,
    settings_or_exit,
)
from consumer.config import Settings


def _reader(settings: Settings, config: Optional[Path], bootstrap_servers: Optional[str]) -> dict:
    """After the pre-flight: the options of a client that reads the review topics, logging through ours."""
    from consumer.kafka.client_logs import client_options
    from consumer.pipeline.preflight import review_needs

    preflight_or_exit(settings, review_needs(settings, writes_decisions=False), config, bootstrap_servers)
    kafka = settings.kafka
    return kafka.consumer_options | {"bootstrap.servers": kafka.bootstrap_servers, **client_options("review")}


@review_app.command("export")
def review_export(
    policy: str = typer.Option(
        ..., "--policy", help="The policy whose decisions to export: its id, or community/id for a community's own."
    ),
    out: Path = typer.Option(..., "--out", help="The JSONL file to write (policy eval's --data format)."),
    version: Optional[str] = typer.Option(None, help="Only decisions on this policy version."),
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Write moderators' decisions on a policy as labelled examples for `policy eval`."""
    from consumer.review.export import export_decisions

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    client = _reader(settings, config, bootstrap_servers)
    count = export_decisions(client, settings.review.topic, settings.review.decisions_topic, policy, out, version)
    typer.echo(f"{count} decided reviews of {policy} written to {out}")


@review_app.command("audit")
def review_audit(
    fmt: str = typer.Option("csv", "--format", help="csv or jsonl."),
    output: Optional[Path] = typer.Option(None, "--output", help="The file to write (whole or not at all); "
                                                                 "default: standard output."),
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Write the audit trail: every decision, overturn, escalation, comment and appeal outcome on the
    review and decisions topics (who, when, what the machine said before, the answer, the reason)."""
    import sys

    from consumer.durable import replacing
    from consumer.review.audit import audit_rows, render
    from consumer.review.export import read_state

    if fmt not in ("csv", "jsonl"):
        raise config_exit(f"--format: {fmt!r} is not csv or jsonl")
    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    client = _reader(settings, config, bootstrap_servers)
    rows = audit_rows(read_state(client, settings.review.topic, settings.review.decisions_topic))
    if output is None:
        for chunk in render(rows, fmt):  # type: ignore[arg-type]
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        with replacing(output) as handle:
            for chunk in render(rows, fmt):  # type: ignore[arg-type]
                handle.write(chunk)
    typer.echo(f"{len(rows)} review actions written to {output or 'standard output'}", err=True)


@review_app.command("pending")
def review_pending(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
    limit: int = typer.Option(50, help="How many to list."),
) -> None:
    """List the reviews that await a person (review id, reason, policy, what the machine said, content)."""
    from consumer.review.export import read_state

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    client = _reader(settings, config, bootstrap_servers)
    pending = read_state(client, settings.review.topic, settings.review.decisions_topic).pending()
    for item in pending[:limit]:
        machine = item.machine
        guess = "violation" if machine.violation else "safe"
        # A keyword or plugin verdict has no cascade stage: its classifier stands in.
        said = ", ".join(str(part) for part in (machine.stage or machine.model, machine.confidence) if part)
        typer.echo(f"{item.review_id}  {item.reason.value:<14} {item.policy_id:<18} machine: {guess} "
                   f"({said})  {item.event.content[:60]!r}")  # fmt: skip
    typer.echo(f"{len(pending)} reviews await a person; post decisions to {settings.review.decisions_topic} "
               "keyed by review_id", err=True)  # fmt: skip


@review_app.command("coop-bridge")
def review_coop_bridge(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Send review items to ROOST's Coop and turn its signed action webhooks into decisions (review.coop)."""
    import signal
    import threading

    from consumer.pipeline.preflight import Port, review_needs
    from consumer.pipeline.telemetry.logs import configure_logging
    from consumer.review.coop import CoopBridge, check_coop_settings

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    configure_logging(settings.log.level, settings.log.format == "json")
    coop = settings.review.coop
    try:
        check_coop_settings(coop)
    except ValueError as exc:
        raise config_exit(str(exc)) from None
    port = Port("review.coop.webhook_port", coop.webhook_host, coop.webhook_port)
    # Before the bridge exists: its clients would otherwise be the first to meet a wrong address.
    preflight_or_exit(settings, review_needs(settings, writes_decisions=True, port=port), config, bootstrap_servers)
    try:
        bridge = CoopBridge(settings)
    except ValueError as exc:
        raise config_exit(str(exc)) from None
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    bridge.start()
    typer.echo(f"Coop bridge: webhooks on http://{settings.review.coop.webhook_host}:{bridge.port}/, "
               f"review items from {settings.review.topic} to {settings.review.coop.url}", err=True)  # fmt: skip
    stopping.wait()
    bridge.stop()


@review_app.command("console")
def review_console(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Serve the review console: the review queue on a web page, decisions to the decisions topic (review.console)."""
    import signal
    import threading

    from consumer.console.identity import Identity
    from consumer.console.server import ConsoleError, ReviewConsole
    from consumer.kafka.client import KafkaException
    from consumer.pipeline.preflight import Port, review_needs
    from consumer.pipeline.telemetry.logs import configure_logging

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    configure_logging(settings.log.level, settings.log.format == "json")
    console_settings = settings.review.console
    problem = Identity(console_settings).check()  # the configuration first, as everywhere: then the brokers
    if problem:
        raise config_exit(f"the review console cannot start: {problem}")
    port = Port("review.console.port", console_settings.host, console_settings.port)
    preflight_or_exit(settings, review_needs(settings, writes_decisions=True, port=port), config, bootstrap_servers)
    try:
        console = ReviewConsole(settings)
        console.start()
    except (ConsoleError, KafkaException, RuntimeError, OSError) as exc:  # settings, topics, broker, port
        raise config_exit(f"the review console cannot start: {exc}") from None
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    identity = settings.review.console
    who = f"{len(identity.reviewers)} reviewers with tokens" if identity.identity == "tokens" \
        else f"reviewers named by the {identity.header} header"
    typer.echo(f"review console on {console.url} ({who}); items from {settings.review.topic}, decisions to "
               f"{settings.review.decisions_topic}", err=True)  # fmt: skip
    stopping.wait()
    console.stop()
