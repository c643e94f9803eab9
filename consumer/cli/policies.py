"""Commands for policy authors: `policy validate`, `policy render`, `policy eval`."""

from __future__ import annotations

import asyncio
import glob
from pathlib import Path
from typing import Optional

import typer

from consumer.cli.app import (
    DISAGREEMENTS_SHOWN,
    ConfigOption,
    config_exit,
    policy_app,
    settings_or_exit,
)
from consumer.cli.shadow import shadow_app
from consumer.config import ConfigError

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
