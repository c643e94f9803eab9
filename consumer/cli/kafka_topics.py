"""Commands for Kafka: `topics create` and the local development broker (`dev-kafka`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from consumer.cli.app import (
    EXIT_UNREACHABLE,
    BootstrapOption,
    ConfigOption,
    bootstrap_override,
    dev_kafka_app,
    settings_or_exit,
    topics_app,
)


@topics_app.command("create")
def topics_create(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
    partitions: int = typer.Option(6, min=1, help="Partitions of each new topic: the most consumers that help."),
    replication: Optional[int] = typer.Option(None, min=1, help="Replication factor; default min(3, brokers)."),
) -> None:
    """Create every topic the configuration names: the named input topics, the verdict and
    dead-letter topics (sized for the largest dead letter, pipeline.max_payload_bytes) and,
    with review.enabled, the review items (sized alike), decisions and appeals topics; with
    shadow.enabled, the shadow topic; with policies.topic, that topic (one partition,
    cleanup.policy=compact).
    Existing topics are left as they are. With sinks.registered_outputs, their JSON Schemas are
    registered under the topics' subjects, compatibility tested first."""
    from consumer.kafka.admin import TopicPlan, Unreachable, connect, create_topics, plan_topics

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    try:
        cluster = connect(settings)
    except Unreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    plans = plan_topics(settings, partitions)
    if settings.shadow.enabled and all(plan.name != settings.shadow.topic for plan in plans):
        plans.append(TopicPlan(settings.shadow.topic, "shadow results", partitions, {}))
    create_topics(cluster, plans, replication)
    for plan in plans:
        typer.echo(f"{plan.name} ({plan.role}): {plan.outcome}")
    skipped = [t for t in settings.kafka.input_topics if t.startswith("^")]
    if skipped:
        typer.echo(f"not created (regular expressions): {', '.join(skipped)}", err=True)
    failed = any(p.outcome.startswith("failed") for p in plans)
    if settings.sinks.registered_outputs:
        from consumer.sinks.registry import register_output_schemas

        for subject, outcome in register_output_schemas(settings):
            typer.echo(f"{subject} (schema): {outcome}")
            failed = failed or outcome.startswith(("failed", "incompatible"))
    raise typer.Exit(1 if failed else 0)


@dev_kafka_app.command("start")
def dev_kafka_start(
    port: Optional[int] = typer.Option(None, help="Listener port on 127.0.0.1; a free one by default."),
    data_dir: Optional[Path] = typer.Option(None, help="Data folder; under the cache folder by default."),
) -> None:
    """Fetch Kafka's jars (first time), start a broker in the background, print its bootstrap address."""
    from consumer.kafka.devkafka import DevKafkaError, start_detached

    try:
        state = start_detached(port=port, data_dir=data_dir)
    except DevKafkaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(state.bootstrap)


@dev_kafka_app.command("stop")
def dev_kafka_stop() -> None:
    """Stop the background broker; leaves no process behind."""
    from consumer.kafka.devkafka import stop_detached

    typer.echo("stopped" if stop_detached() else "not running")


@dev_kafka_app.command("status")
def dev_kafka_status() -> None:
    """Print the bootstrap address of the running broker, or exit 1 if none runs."""
    from consumer.kafka.devkafka import running_broker

    state = running_broker()
    if state is None:
        typer.echo("not running")
        raise typer.Exit(1)
    typer.echo(f"running pid {state.pid} at {state.bootstrap} (data {state.data_dir}, log {state.log_file})")
