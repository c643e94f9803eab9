"""Commands for policy authors: `policy validate`, `policy render`, `policy eval`; and the policy
topic's (`policies.topic`): `policy publish`, `list`, `show`, `retire`, `promote`."""

from __future__ import annotations

import asyncio
import getpass
import glob
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from consumer.cli.app import (
    DISAGREEMENTS_SHOWN,
    EXIT_UNREACHABLE,
    BootstrapOption,
    ConfigOption,
    bootstrap_override,
    config_exit,
    policy_app,
    preflight_or_exit,
    settings_or_exit,
)
from consumer.cli.shadow import shadow_app
from consumer.config import ConfigError, Settings

if TYPE_CHECKING:
    from consumer.policy.topic import PolicyRecord

policy_app.add_typer(shadow_app, name="shadow")


@policy_app.command("validate")
def policy_validate(
    paths: list[Path] = typer.Argument(..., help="Policy files or folders of them."),
    max_tokens: int = typer.Option(1500, help="Policies longer than this many tokens are errors."),
) -> None:
    """Check structure, front matter, example labels and length; prints file:line: problem."""
    from consumer.policy import PolicyError, parse_policy, validate_policy

    files = [f for p in paths for f in (sorted(p.glob("*.md")) if p.is_dir() else [p])]
    errors = 0
    # A folder is what `run` loads: two files of one id there stop it, so they are an error here too.
    ids: dict[tuple[Path, str], Path] = {}
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
        try:
            policy_key = parse_policy(data, path).key
        except PolicyError:
            continue  # reported above
        first = ids.setdefault((path.resolve().parent, policy_key), path)
        if first != path:
            typer.echo(f"{path}:2: error: policy id {policy_key!r} is also used by {first}; a policies folder holds "
                       "one file per id and community (keep drafts elsewhere)")  # fmt: skip
            errors += 1
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
        raise config_exit(str(exc)) from None
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

    settings = settings_or_exit(config)
    try:
        examples = load_examples(data)
        current = load_policy(policy)
        baseline_policy = load_policy(against) if against else None
    except (DataError, PolicyError) as exc:
        raise config_exit(str(exc)) from None
    try:
        # That file alone (its examples file beside it): not its neighbours, which may be drafts or reports.
        assert current.path is not None
        alone = PolicyStore(current.path.parent, settings.policies.max_tokens, pattern=glob.escape(current.path.name))
        classifier = build_classifier(settings, alone)
    except (ConfigError, PolicyError) as exc:
        raise config_exit(str(exc)) from None

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


# -- the policy topic ----------------------------------------------------------------------------


class _Topic:
    """The policy topic a command reads or writes, after the pre-flight (one line, exit 2 or 1)."""

    def __init__(self, config: Optional[Path], bootstrap_servers: Optional[str], write: bool, command: str):
        from consumer.kafka.admin import TopicNeed
        from consumer.pipeline.preflight import Needs

        self.settings = settings_or_exit(config, bootstrap_override(bootstrap_servers))
        if not self.settings.policies.topic:
            raise config_exit(f"policies.topic is not set: `policy {command}` reads and writes the policy topic "
                              "it names")
        self.name: str = self.settings.policies.topic
        self._preflight = (Needs([TopicNeed("policies.topic", self.name, write=write)]), config, bootstrap_servers)

    def check(self) -> None:
        needs, config, bootstrap_servers = self._preflight
        preflight_or_exit(self.settings, needs, config, bootstrap_servers)

    def records(self) -> dict[str, PolicyRecord]:
        """The last record of each key in force (tombstoned keys left out)."""
        from consumer.errors import Unavailable
        from consumer.kafka.client_logs import client_options
        from consumer.kafka.policy_topic import read_policy_topic
        from consumer.policy.topic import latest

        k = self.settings.kafka
        client = k.consumer_options | {"bootstrap.servers": k.bootstrap_servers, **client_options("policies")}
        try:
            return latest(read_policy_topic(client, self.name, k.startup_timeout_s))
        except Unavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_UNREACHABLE) from None

    def write(self, key: str, value: bytes | None, by: str, **headers: str) -> str:
        """One record (None: a tombstone), acknowledged; where it landed."""
        from consumer.errors import Unavailable
        from consumer.kafka.client_logs import client_options
        from consumer.kafka.policy_topic import write_policy_record
        from consumer.policy.topic import PUBLISHED_AT, PUBLISHED_BY

        k = self.settings.kafka
        producer = k.producer_options | {"bootstrap.servers": k.bootstrap_servers, **client_options("policies")}
        metadata = {PUBLISHED_BY: by, PUBLISHED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds"), **headers}
        try:
            return write_policy_record(producer, self.name, key, value, metadata, k.startup_timeout_s)
        except Unavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_UNREACHABLE) from None


def _publisher() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no user name in a bare container
        return f"unknown@{socket.gethostname()}"


ByOption = typer.Option(None, "--by", help="Who publishes, in the record's headers; user@host by default.")


def _checked(data: bytes, path: Path, settings: Settings) -> None:
    """`policy validate`'s problems of the text to publish, printed; exit 1 on any error."""
    from consumer.policy import validate_policy

    problems = validate_policy(data, path, settings.policies.max_tokens)
    for problem in problems:
        typer.echo(str(problem), err=True)
    errors = sum(p.severity == "error" for p in problems)
    if errors:
        typer.echo(f"refused: {errors} errors; nothing was published", err=True)
        raise typer.Exit(1)


@policy_app.command("publish")
def policy_publish(
    file: Path = typer.Argument(..., help="The policy file (Markdown with YAML front matter)."),
    community: Optional[str] = typer.Option(None, help="The community whose policy it is: sets `community:` in "
                                            "its front matter (the file's own must agree)."),  # fmt: skip
    by: Optional[str] = ByOption,
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Validate a policy file as `policy validate` does (exit 1 with file:line problems, nothing
    published), then write it to policies.topic under its key (id, or community/id). Every
    consumer following the topic applies it to the events it routes from then on."""
    from consumer.policy import PolicyError, parse_policy
    from consumer.policy.topic import with_front_matter

    topic = _Topic(config, bootstrap_servers, write=True, command="publish")
    try:
        data = file.read_bytes()
    except OSError as exc:
        typer.echo(f"{file}:0: error: cannot read ({exc.strerror})", err=True)
        raise typer.Exit(1) from None
    _checked(data, file, topic.settings)
    policy = parse_policy(data, file)
    if community is not None and policy.community != community:
        if policy.community is not None:
            typer.echo(f"{file}:1: error: its front matter says community {policy.community!r}, --community "
                       f"{community!r}; refused", err=True)  # fmt: skip
            raise typer.Exit(1)
        data = with_front_matter(data, str(file), community=community)
        try:
            policy = parse_policy(data, file)
        except PolicyError as exc:
            typer.echo(f"--community: {exc}", err=True)
            raise typer.Exit(1) from None
    topic.check()
    where = topic.write(policy.key, data, by or _publisher())
    typer.echo(f"published {policy.key}@{policy.version} to {where}")


def _row(key: str, record: PolicyRecord, settings: Settings) -> dict[str, Any]:
    from consumer.policy import PolicyError
    from consumer.policy.topic import PUBLISHED_AT, PUBLISHED_BY, check_record

    row: dict[str, Any] = {"key": key, "published_at": record.headers.get(PUBLISHED_AT),
                           "published_by": record.headers.get(PUBLISHED_BY), "where": record.where}  # fmt: skip
    try:
        policy = check_record(record, settings.policies.max_tokens)
    except PolicyError as exc:
        return row | {"problem": str(exc)}
    return row | {"id": policy.id, "community": policy.community, "version": policy.version,
                  "shadow_of": policy.shadow_of}  # fmt: skip


@policy_app.command("list")
def policy_list(
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Every policy on policies.topic: key, id, community, version, published when and by whom,
    shadow_of (a candidate's live policy). A record consumers reject is listed with its problem."""
    topic = _Topic(config, bootstrap_servers, write=False, command="list")
    topic.check()
    columns = ("key", "id", "community", "version", "published_at", "published_by", "shadow_of")
    rows = [_row(key, record, topic.settings) for key, record in sorted(topic.records().items())]
    cells = [[str(row.get(c) or "-") for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row, line in zip(rows, cells):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if "problem" in row:
            typer.echo(f"  rejected by consumers: {row['problem']}")
    typer.echo(f"{len(rows)} policies on {topic.name}", err=True)


@policy_app.command("show")
def policy_show(
    key: str = typer.Argument(..., help="The policy's key: its id, or community/id."),
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Print a policy on policies.topic: its metadata (on stderr) and its text as published (on
    stdout, so `policy show KEY > FILE` gives back the file, the same version)."""
    topic = _Topic(config, bootstrap_servers, write=False, command="show")
    topic.check()
    record = topic.records().get(key)
    if record is None:
        typer.echo(f"error: no policy {key!r} on {topic.name}", err=True)
        raise typer.Exit(1)
    for name, value in _row(key, record, topic.settings).items():
        typer.echo(f"{name}: {value if value is not None else '-'}", err=True)
    assert record.value is not None
    typer.echo(record.value.decode("utf-8", "replace"), nl=False)


@policy_app.command("retire")
def policy_retire(
    key: str = typer.Argument(..., help="The policy's key: its id, or community/id."),
    by: Optional[str] = ByOption,
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Withdraw a policy from policies.topic (a tombstone): consumers stop applying it (a policy
    file of the same key, if any, is in force again)."""
    topic = _Topic(config, bootstrap_servers, write=True, command="retire")
    topic.check()
    if key not in topic.records():
        typer.echo(f"error: no policy {key!r} on {topic.name}; nothing retired", err=True)
        raise typer.Exit(1)
    where = topic.write(key, None, by or _publisher())
    typer.echo(f"retired {key} ({where})")


@policy_app.command("promote")
def policy_promote(
    candidate: str = typer.Argument(..., help="The candidate's key: a policy with `shadow_of: LIVE_ID`."),
    by: Optional[str] = ByOption,
    config: Optional[Path] = ConfigOption,
    bootstrap_servers: Optional[str] = BootstrapOption,
) -> None:
    """Make a candidate live: its text, with `id` set to its `shadow_of` and `shadow_of` removed
    (same community), published as the live policy in one record; then the candidate's key is
    retired."""
    from consumer.policy import PolicyError, parse_policy
    from consumer.policy.topic import PROMOTED_FROM, check_record, with_front_matter

    topic = _Topic(config, bootstrap_servers, write=True, command="promote")
    topic.check()
    record = topic.records().get(candidate)
    if record is None:
        typer.echo(f"error: no policy {candidate!r} on {topic.name}; nothing promoted", err=True)
        raise typer.Exit(1)
    try:
        policy = check_record(record, topic.settings.policies.max_tokens)
    except PolicyError as exc:
        typer.echo(f"error: {candidate!r} cannot be promoted: {exc}", err=True)
        raise typer.Exit(1) from None
    if policy.shadow_of is None:
        typer.echo(f"error: {candidate!r} is not a candidate (no `shadow_of:` in its front matter); "
                   "`policy publish` replaces a live policy", err=True)  # fmt: skip
        raise typer.Exit(1)
    assert record.value is not None
    data = with_front_matter(record.value, record.where, id=policy.shadow_of, shadow_of=None)
    _checked(data, Path(record.where), topic.settings)
    live = parse_policy(data)
    by = by or _publisher()
    where = topic.write(live.key, data, by, **{PROMOTED_FROM: candidate})
    typer.echo(f"promoted {candidate}: {live.key}@{live.version} ({where})")
    retired = topic.write(candidate, None, by)
    typer.echo(f"retired {candidate} ({retired})")
