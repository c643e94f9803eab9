"""The command line's Typer apps, what every command shares, and the core commands: run, demo,
check-config, version, schemas export. The other commands live beside it, by subject."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

import consumer
from consumer.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:  # imported by the commands themselves: --help needs none of the pipeline
    from consumer.pipeline.preflight import Needs

# Plain help (rich_markup_mode None): Typer's rich panels print `<bool>` beside every flag.
app = typer.Typer(
    help="A streaming moderation consumer: Kafka in, policy verdicts and dead letters out.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
_SUBCOMMANDS: dict = {"no_args_is_help": True, "rich_markup_mode": None}
dev_kafka_app = typer.Typer(help="A local single-node Apache Kafka on 127.0.0.1 for development.", **_SUBCOMMANDS)
schemas_app = typer.Typer(help="JSON Schemas of the event contracts.", **_SUBCOMMANDS)
policy_app = typer.Typer(
    help="Write, check and measure policies; publish them on the policy topic; shadow candidates.", **_SUBCOMMANDS
)
topics_app = typer.Typer(help="The Kafka topics the configuration names.", **_SUBCOMMANDS)
review_app = typer.Typer(help="Human review: open reviews, the review console, labelled data, the Coop bridge.",
                         **_SUBCOMMANDS)  # fmt: skip
app.add_typer(review_app, name="review")
app.add_typer(dev_kafka_app, name="dev-kafka")
app.add_typer(policy_app, name="policy")
app.add_typer(schemas_app, name="schemas")
app.add_typer(topics_app, name="topics")

EXIT_CONFIG = 2  # a bad command line, configuration, policy or checkpoint
DISAGREEMENTS_SHOWN = 20  # on the terminal; the report lists them all

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file; SAFEGUARD_* env vars override it.")


def settings_or_exit(config: Optional[Path], overrides: dict[str, object] | None = None) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        raise config_exit(str(exc)) from None


def config_exit(message: str) -> typer.Exit:
    """Print `error: message` and return the exit (code 2) to raise: the one way every command refuses to start."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_CONFIG)


EXIT_UNREACHABLE = 1  # no broker answered: nothing wrong with the command, try again later
BootstrapOption = typer.Option(None, "--bootstrap-servers", help="Overrides kafka.bootstrap_servers.")


def bootstrap_override(bootstrap_servers: Optional[str]) -> dict[str, object] | None:
    return {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None


def create_command(config: Optional[Path], bootstrap_servers: Optional[str]) -> str:
    """The `topics create` command line for the configuration this command was given."""
    return " ".join(["safeguard-consumer topics create"] + ([f"--config {config}"] if config else [])
                    + ([f"--bootstrap-servers {bootstrap_servers}"] if bootstrap_servers else []))  # fmt: skip


def preflight_or_exit(
    settings: Settings,
    needs: Needs,
    config: Optional[Path],
    bootstrap_servers: Optional[str],
    log: logging.Logger | None = None,
) -> None:
    """The online pre-flight every command that talks to Kafka runs before it starts: returns,
    or exits with one line (2: configuration, topics, ports; 1: no broker answered). `log`:
    where a long-running command reports (`run`'s JSON logs), else the terminal."""
    from consumer.kafka.admin import TopicProblem, Unreachable
    from consumer.pipeline.preflight import connect_and_check

    try:
        warnings = connect_and_check(settings, needs, create_command(config, bootstrap_servers))
    except (ConfigError, TopicProblem) as exc:
        raise config_exit(str(exc)) from None
    except Unreachable as exc:
        if log is not None:
            log.error("%s", exc)
        else:
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    for warning in warnings:
        if log is not None:
            log.warning("%s", warning)
        else:
            typer.echo(f"warning: {warning}", err=True)


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Consume the input topics and publish a verdict or a dead letter for every record.

    Before the first poll it runs the pre-flight of `check-config --connect`: exit 2 for a bad
    configuration or a missing output topic, exit 1 when no broker answers within
    kafka.startup_timeout_s."""
    from consumer.pipeline.http import PortInUse
    from consumer.pipeline.pipeline import Pipeline
    from consumer.pipeline.preflight import describe, prepare, run_needs
    from consumer.pipeline.telemetry.logs import configure_logging
    from consumer.pipeline.telemetry.tracing import TelemetryError

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    configure_logging(settings.log.level, settings.log.format == "json")
    log = logging.getLogger("consumer.cli")
    try:
        prepared = prepare(settings)
    except ConfigError as exc:
        raise config_exit(str(exc)) from None
    log.info("%s", describe(settings, prepared))
    preflight_or_exit(settings, run_needs(settings), config, bootstrap_servers, log)
    assert prepared.classifier is not None
    try:
        pipeline = Pipeline(settings, prepared.classifier, prepared.policies)
    except TelemetryError as exc:
        raise config_exit(str(exc)) from None
    try:
        result = asyncio.run(pipeline.run())
    except PortInUse as exc:
        raise config_exit(str(exc)) from None
    typer.echo(
        f"consumed {result.consumed}, verdicts {result.verdicts}, dead letters {result.dead_letters}",
        err=True,
    )
    if result.exit_code:
        typer.echo(f"error: {result.reason}", err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def demo(
    policies: Optional[Path] = typer.Option(None, help="Policies folder; the repository's policies/ by default."),
    engine: str = typer.Option(
        "auto", help="auto (vllm with a GPU, else cascade), vllm, cascade (CPU, no model) or keyword."
    ),
    model: str = typer.Option("openai/gpt-oss-safeguard-20b", help="The model, for the vllm engine."),
) -> None:
    """Run the whole data path on bundled sample chat and reviews against a private local Kafka."""
    from rich.console import Console

    from consumer.demo import ENGINES, default_policies_dir, run_demo
    from consumer.kafka.devkafka import DevKafkaError

    if engine != "auto" and engine not in ENGINES:
        raise config_exit(f"--engine must be auto, {', '.join(ENGINES)}; not {engine!r}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_demo(policies or default_policies_dir(), Console(), engine=engine, model=model)
    except (DevKafkaError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("check-config")
def check_config(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
    connect: bool = typer.Option(False, "--connect", help="Also check the brokers, the topics, the permissions "
                                 "and the metrics port."),  # fmt: skip
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only problems, not the configuration."),
) -> None:
    """The pre-flight of `run`: validate the configuration, load the policies, resolve the routes,
    have librdkafka check its options and build the classifier (a vLLM engine: its settings
    and its package only); print the configuration with secrets hidden. With --connect, also
    the checks `run` makes before its first poll. Exit 2 naming the key on a problem (exit 1
    when --connect finds no broker)."""
    from consumer.config import redact
    from consumer.pipeline.preflight import describe, prepare, run_needs

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    try:
        prepared = prepare(settings, build_engine=False)
    except ConfigError as exc:
        raise config_exit(str(exc)) from None
    if not quiet:
        typer.echo(json.dumps(redact(settings.model_dump(mode="json")), indent=2))
        typer.echo(describe(settings, prepared).replace("starting: ", "would start: ", 1), err=True)
    if connect:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        preflight_or_exit(settings, run_needs(settings), config, bootstrap_servers)
        typer.echo(f"brokers {settings.kafka.bootstrap_servers}: reachable; topics present and permitted", err=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(consumer.__version__)


@schemas_app.command("export")
def schemas_export(
    directory: Path = typer.Option(Path("schemas"), "--dir", help="Where to write the *.schema.json files."),
) -> None:
    """Write the JSON Schemas of ContentEvent, Verdict and DeadLetter."""
    from consumer.schemas import export_schemas

    for path in export_schemas(directory):
        typer.echo(str(path))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
