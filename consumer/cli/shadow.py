"""`safeguard-consumer policy shadow report CANDIDATE`: what a candidate version of a policy,
running beside the live one on a sample of live traffic (`shadow:`), would flip so far."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from consumer.cli.app import (
    BootstrapOption,
    ConfigOption,
    bootstrap_override,
    preflight_or_exit,
    settings_or_exit,
)

shadow_app = typer.Typer(help="Candidate policy versions beside the live ones on live traffic.", no_args_is_help=True,
                         rich_markup_mode=None)  # fmt: skip


@shadow_app.command("report")
def shadow_report(
    candidate: str = typer.Argument(..., help="The candidate's policy id (community/id for a community's own)."),
    version: Optional[str] = typer.Option(None, help="Only this version of the candidate; default every version."),
    examples: int = typer.Option(5, min=0, help="Examples shown per direction."),
    show_content: bool = typer.Option(False, "--show-content", help="Show the examples' content."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document."),
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Read the shadow topic (shadow.topic) and print the candidate's flips against its live policy:
    counts by direction (safe_to_violation, violation_to_safe, category_changed) and category,
    the cheap-stage vs reasoner split, and a few examples (record coordinates, both answers)."""
    from consumer.kafka.admin import TopicNeed
    from consumer.kafka.client_logs import client_options
    from consumer.pipeline.preflight import Needs
    from consumer.pipeline.shadow_report import ShadowReport, read_report

    settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
    topic = settings.shadow.topic
    preflight_or_exit(settings, Needs([TopicNeed("shadow.topic", topic, write=False)]), config, bootstrap_servers)
    kafka = settings.kafka
    client = kafka.consumer_options | {"bootstrap.servers": kafka.bootstrap_servers, **client_options("shadow-report")}
    report = read_report(client, topic, ShadowReport(candidate, version, examples)).as_document(show_content)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{candidate}: {report['compared']} sampled events compared with the live policy "
               f"({', '.join(report['live_versions']) or 'none yet'}), {report['flipped']} flipped")  # fmt: skip
    for flip, count in report["flips"].items():
        by_category = ", ".join(f"{category} {n}" for category, n in sorted(report["categories"][flip].items()))
        typer.echo(f"  {flip:<18} {count:>7}" + (f"  ({by_category})" if by_category else ""))
    for side, kinds in report["stages"].items():
        split = ", ".join(f"{kind} {s['compared']} compared / {s['flipped']} flipped" for kind, s in kinds.items())
        typer.echo(f"  decided by, {side}: {split}")
    for example in report["examples"]:
        source, live, cand = example["source"], example["live"], example["candidate"]
        typer.echo(f"  {example['flip']}: {source['topic']}[{source['partition']}]@{source['offset']} "
                   f"live {_answer(live)} -> candidate {_answer(cand)}")  # fmt: skip
        if show_content:
            typer.echo(f"    {example['content']!r}")
    if report["duplicates"] or report["unreadable"]:
        typer.echo(f"{report['duplicates']} duplicate records (re-reads) counted once, {report['unreadable']} "
                   f"records on {topic} not readable as shadow results", err=True)  # fmt: skip


def _answer(answer: dict) -> str:
    said = "violation" if answer["violation"] else "safe"
    category = f" {answer['category']}" if answer["violation"] and answer["category"] else ""
    return f"{said}{category} ({answer['stage'] or answer['model']}, {answer['decided_by']})"
