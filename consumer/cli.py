"""The `safeguard-consumer` command line."""

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

if TYPE_CHECKING:
    from rich.console import Console

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
policy_app = typer.Typer(help="Write, check and measure policies.", **_SUBCOMMANDS)
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


def _settings(config: Optional[Path], overrides: dict[str, object] | None = None) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        raise _config_exit(str(exc)) from None


def _config_exit(message: str) -> typer.Exit:
    """Print `error: message` and return the exit (code 2) to raise: the one way every command refuses to start."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_CONFIG)


EXIT_UNREACHABLE = 1


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
) -> None:
    """Consume the input topics and publish a verdict or a dead letter for every record.

    Before the first poll it runs the pre-flight of `check-config --connect`: exit 2 for a bad
    configuration or a missing output topic, exit 1 when no broker answers within
    kafka.startup_timeout_s."""
    from consumer.kafka.admin import TopicProblem, Unreachable
    from consumer.pipeline.http import PortInUse
    from consumer.pipeline.pipeline import Pipeline
    from consumer.pipeline.preflight import connect_and_check, describe, prepare
    from consumer.pipeline.telemetry import TelemetryError, configure_logging

    overrides = {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None
    settings = _settings(config, overrides)
    configure_logging(settings.log.level, settings.log.format == "json")
    log = logging.getLogger("consumer.cli")
    try:
        prepared = prepare(settings)
    except ConfigError as exc:
        raise _config_exit(str(exc)) from None
    log.info("%s", describe(settings, prepared))
    try:
        for warning in connect_and_check(settings):
            log.warning("%s", warning)
    except Unreachable as exc:
        log.error("%s", exc)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except TopicProblem as exc:
        raise _config_exit(str(exc).replace("--config FILE", f"--config {config}" if config else "")) from None
    assert prepared.classifier is not None
    try:
        pipeline = Pipeline(settings, prepared.classifier, prepared.policies)
    except TelemetryError as exc:
        raise _config_exit(str(exc)) from None
    try:
        result = asyncio.run(pipeline.run())
    except PortInUse as exc:
        raise _config_exit(str(exc)) from None
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
        raise _config_exit(f"--engine must be auto, {', '.join(ENGINES)}; not {engine!r}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_demo(policies or default_policies_dir(), Console(), engine=engine, model=model)
    except (DevKafkaError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("check-config")
def check_config(
    config: Optional[Path] = ConfigOption,
    connect: bool = typer.Option(False, "--connect", help="Also check the brokers, the topics and the permissions."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only problems, not the configuration."),
) -> None:
    """The pre-flight of `run`: validate the configuration, load the policies, resolve the routes,
    have librdkafka check its options and build the classifier (a vLLM engine: its settings
    only); print the configuration with secrets hidden. Exit 2 naming the key on a problem
    (exit 1 when --connect finds no broker)."""
    from consumer.config import redact
    from consumer.kafka.admin import TopicProblem, Unreachable
    from consumer.pipeline.preflight import connect_and_check, describe, prepare

    settings = _settings(config)
    try:
        prepared = prepare(settings, build_engine=False)
    except ConfigError as exc:
        raise _config_exit(str(exc)) from None
    if not quiet:
        typer.echo(json.dumps(redact(settings.model_dump(mode="json")), indent=2))
    typer.echo(describe(settings, prepared).replace("starting: ", "would start: ", 1), err=True)
    if connect:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            warnings = connect_and_check(settings)
        except Unreachable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_UNREACHABLE) from None
        except TopicProblem as exc:
            raise _config_exit(str(exc).replace("--config FILE", f"--config {config}" if config else "")) from None
        for warning in warnings:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(f"brokers {settings.kafka.bootstrap_servers}: reachable; topics present and permitted", err=True)


@topics_app.command("create")
def topics_create(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
    partitions: int = typer.Option(6, min=1, help="Partitions of each new topic: the most consumers that help."),
    replication: Optional[int] = typer.Option(None, min=1, help="Replication factor; default min(3, brokers)."),
) -> None:
    """Create the named input topics and the verdict and dead-letter topics (sized for the
    largest dead letter, pipeline.max_payload_bytes); existing topics are left as they are."""
    from consumer.kafka.admin import Unreachable, connect, create_topics, plan_topics

    overrides = {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None
    settings = _settings(config, overrides)
    try:
        cluster = connect(settings)
    except Unreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    plans = plan_topics(settings, partitions)
    create_topics(cluster, plans, replication)
    for plan in plans:
        typer.echo(f"{plan.name} ({plan.role}): {plan.outcome}")
    skipped = [t for t in settings.kafka.input_topics if t.startswith("^")]
    if skipped:
        typer.echo(f"not created (regular expressions): {', '.join(skipped)}", err=True)
    raise typer.Exit(1 if any(p.outcome.startswith("failed") for p in plans) else 0)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(consumer.__version__)


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


@schemas_app.command("export")
def schemas_export(
    directory: Path = typer.Option(Path("schemas"), "--dir", help="Where to write the *.schema.json files."),
) -> None:
    """Write the JSON Schemas of ContentEvent, Verdict and DeadLetter."""
    from consumer.schemas import export_schemas

    for path in export_schemas(directory):
        typer.echo(str(path))


@policy_app.command("validate")
def policy_validate(
    paths: list[Path] = typer.Argument(..., help="Policy files or folders of them."),
    max_tokens: int = typer.Option(1500, help="Policies longer than this many tokens are errors."),
) -> None:
    """Check structure, front matter, example labels and length; prints file:line: problem."""
    from consumer.policy import validate_policy

    files = [f for p in paths for f in (sorted(p.glob("*.md")) if p.is_dir() else [p])]
    errors = 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            typer.echo(f"{path}:0: error: cannot read ({exc.strerror})")
            errors += 1
            continue
        for problem in validate_policy(data, path, max_tokens):
            typer.echo(str(problem))
            errors += problem.severity == "error"
    typer.echo(f"{len(files)} policies checked, {errors} errors", err=True)
    raise typer.Exit(1 if errors or not files else 0)


@policy_app.command("render")
def policy_render(
    policy: Path = typer.Argument(..., help="The policy file."),
    content: Optional[str] = typer.Option(None, help="A message to review; without it, the policy prefix only."),
) -> None:
    """Print the exact harmony prompt the engine would see, and its token count."""
    from consumer.events import ContentEvent
    from consumer.policy import PolicyError, load_policy

    try:
        loaded = load_policy(policy)
    except PolicyError as exc:
        raise _config_exit(str(exc)) from None
    try:
        from consumer.classify.engine.prompt import PromptRenderer
    except ImportError as exc:
        typer.echo(f"error: rendering needs openai_harmony ({exc}): `scripts/bootstrap core` installs it, or "
                   "pip install -r requirements/harmony.txt (not beside vLLM, which brings its own)", err=True)
        raise typer.Exit(1) from None
    event = ContentEvent(event_id="preview", content=content) if content else None
    preview = PromptRenderer().preview(loaded, event)
    typer.echo(preview.text)
    typer.echo(f"\n{preview.tokens} tokens, of which {preview.policy_prefix_tokens} are the shared policy prefix", err=True)


@policy_app.command("eval")
def policy_eval(
    policy: Path = typer.Argument(..., help="The policy file to evaluate."),
    data: Path = typer.Option(..., "--data", help="Labelled JSONL: {\"content\": ..., \"label\": 0|1, \"id\": ...}."),
    against: Optional[Path] = typer.Option(None, help="Another version of the policy, to list the changed answers."),
    report: Path = typer.Option(Path("policy-eval.md"), help="Where to write the Markdown report."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run the configured classifier over labelled examples: precision, recall, F1, disagreements."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from consumer.classify.evaluate import changed, evaluate, markdown_report, training_overlap
    from consumer.classify.factory import build_classifier
    from consumer.policy import PolicyError, PolicyStore, load_policy
    from consumer.policy.examples import DataError, load_examples

    settings = _settings(config)
    try:
        examples = load_examples(data)
        current = load_policy(policy)
        baseline_policy = load_policy(against) if against else None
    except (DataError, PolicyError) as exc:
        raise _config_exit(str(exc)) from None
    try:
        classifier = build_classifier(settings, PolicyStore(current.path.parent if current.path else Path(".")))
    except (ConfigError, PolicyError) as exc:
        raise _config_exit(str(exc)) from None

    async def both():
        await classifier.start()
        try:
            result = await evaluate(classifier, current, examples)
            baseline = await evaluate(classifier, baseline_policy, examples) if baseline_policy else None
            return result, baseline
        finally:
            await classifier.close()

    result, baseline = asyncio.run(both())
    console = Console()
    table = Table(title=f"{current.id}@{current.version} on {len(examples)} examples ({classifier.name})")
    for column in ("precision", "recall", "F1", "TP", "FP", "FN", "TN", "failed"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.precision:.3f}", f"{result.recall:.3f}", f"{result.f1:.3f}",
                  *(str(n) for n in (result.tp, result.fp, result.fn, result.tn, result.failed)))
    if baseline is not None:
        table.add_row(f"{baseline.precision:.3f}", f"{baseline.recall:.3f}", f"{baseline.f1:.3f}",
                      *(str(n) for n in (baseline.tp, baseline.fp, baseline.fn, baseline.tn, baseline.failed)),
                      style="dim")  # fmt: skip
        table.caption = f"dim: --against {against} ({baseline.policy.id}@{baseline.policy.version})"
    console.print(table)
    overlap = training_overlap(current, examples)
    if overlap:
        console.print(f"[bold red]warning:[/] {overlap} of {len(examples)} examples are the policy's own training "
                      "examples (its EXAMPLES section or examples file): their score measures memory, not the policy")
    shown = result.disagreements[:DISAGREEMENTS_SHOWN]
    if result.disagreements:
        more = len(result.disagreements) - len(shown)
        console.print(f"{len(result.disagreements)} disagreements" + (f", the first {len(shown)} here (all in the report):"
                                                                       if more else ":"))
    for o in shown:
        console.print(f"[yellow]{escape(o.example.id)}[/] label {int(o.example.label)}: "
                      f"{escape(o.rationale or o.error or '')}", highlight=False)
    if baseline is not None:
        flips = changed(baseline, result)
        console.print(f"{len(flips)} examples changed their answer from --against to this version"
                      + (":" if flips else "."))
        for before, after in flips[:DISAGREEMENTS_SHOWN]:
            mark = "fixed" if after.predicted is after.example.label else "broken"
            console.print(f"  [yellow]{escape(after.example.id)}[/] label {int(after.example.label)}: "
                          f"{int(bool(before.predicted))} -> {int(bool(after.predicted))} ({mark})")
        if len(flips) > DISAGREEMENTS_SHOWN:
            console.print(f"  ... {len(flips) - DISAGREEMENTS_SHOWN} more in the report")
    report.write_text(markdown_report(result, baseline), encoding="utf-8")
    console.print(f"report written to {report}")


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
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
    priority: str = typer.Option("low", help="live or low: a remote reasoner's priority on a shared fleet."),
) -> None:
    """Replay an offset range of a topic through the pipeline, and backtest a policy change with --compare."""
    from rich.console import Console

    from consumer.classify.factory import build_classifier
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
        raise _config_exit("give exactly one of --output-topic and --output")
    try:
        overrides = {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None
        settings = load_settings(config, overrides)
        refuse_exactly_once(settings)
        settings, policies = replay_policies(settings, policy)
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
        raise _config_exit(str(exc)) from None
    _log_through(status, settings.log.level)

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
            raise _config_exit(str(exc)) from None
    raise typer.Exit(result.exit_code)


@review_app.command("export")
def review_export(
    policy: str = typer.Option(..., "--policy", help="The policy id whose decisions to export."),
    out: Path = typer.Option(..., "--out", help="The JSONL file to write (policy eval's --data format)."),
    version: Optional[str] = typer.Option(None, help="Only decisions on this policy version."),
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
) -> None:
    """Write moderators' decisions on a policy as labelled examples for `policy eval`."""
    from consumer.review.export import export_decisions

    settings = _settings(config, {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None)
    client = settings.kafka.consumer_options | {"bootstrap.servers": settings.kafka.bootstrap_servers}
    count = export_decisions(client, settings.review.topic, settings.review.decisions_topic, policy, out, version)
    typer.echo(f"{count} decided reviews of {policy} written to {out}")


@review_app.command("pending")
def review_pending(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
    limit: int = typer.Option(50, help="How many to list."),
) -> None:
    """List the reviews that await a person (review id, reason, policy, what the machine said, content)."""
    from consumer.review.export import read_state

    settings = _settings(config, {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None)
    client = settings.kafka.consumer_options | {"bootstrap.servers": settings.kafka.bootstrap_servers}
    pending = read_state(client, settings.review.topic, settings.review.decisions_topic).pending()
    for item in pending[:limit]:
        guess = "violation" if item.machine.violation else "safe"
        typer.echo(f"{item.review_id}  {item.reason.value:<14} {item.policy_id:<18} machine: {guess} "
                   f"({item.machine.stage}, {item.machine.confidence})  {item.event.content[:60]!r}")  # fmt: skip
    typer.echo(f"{len(pending)} reviews await a person; post decisions to {settings.review.decisions_topic} "
               "keyed by review_id", err=True)  # fmt: skip


@review_app.command("coop-bridge")
def review_coop_bridge(config: Optional[Path] = ConfigOption) -> None:
    """Send review items to ROOST's Coop and turn its signed action webhooks into decisions (review.coop)."""
    import signal
    import threading

    from consumer.review.coop import CoopBridge

    settings = _settings(config)
    try:
        bridge = CoopBridge(settings)
    except ValueError as exc:
        raise _config_exit(str(exc)) from None
    logging.basicConfig(level=settings.log.level, format="%(name)s: %(message)s")
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
    bootstrap_servers: Optional[str] = typer.Option(None, help="Overrides kafka.bootstrap_servers."),
) -> None:
    """Serve the review console: the review queue on a web page, decisions to the decisions topic (review.console)."""
    import signal
    import threading

    from confluent_kafka import KafkaException

    from consumer.console.server import ConsoleError, ReviewConsole

    settings = _settings(config, {"kafka.bootstrap_servers": bootstrap_servers} if bootstrap_servers else None)
    logging.basicConfig(level=settings.log.level, format="%(name)s: %(message)s")
    try:
        console = ReviewConsole(settings)
        console.start()
    except (ConsoleError, KafkaException, RuntimeError, OSError) as exc:  # settings, topics, broker, port
        raise _config_exit(f"the review console cannot start: {exc}") from None
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


def _log_through(console: Console, level: str) -> None:
    # Log lines printed through rich appear above the progress bars instead of tearing them.
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[RichHandler(console=console)])


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
