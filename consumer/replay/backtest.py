"""The backtest: what changed between two runs of the policies over the same records.

Inputs are the outputs (verdict and dead-letter JSON objects) of a baseline (the live
consumer, or an earlier replay) and of a candidate (a replay with the changed policy).
Records are matched by their source coordinates (topic, partition, offset) and, inside a
verdict, by policy id, so a live verdict that applied several policies is compared only on
the policies the replay ran. A flip is a change of `violation` for one (record, policy):
"flagged" (0 -> 1) or "cleared" (1 -> 0). Records that only one side has, or that became a
dead letter on either side, are counted apart and never counted as flips.

Reports carry event ids, coordinates, categories, actions and rationales, never content.

`backtest` puts it together for the replay command: it reads both sides back (a JSON Lines
file, or a topic through the bounded reader of `consumer.kafka.ranges`), compares them over
the replay's offset ranges, prints the tables and writes the Markdown report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import orjson
from rich.console import Console
from rich.table import Table

from consumer.config import Settings
from consumer.kafka.client import Consumer, KafkaException
from consumer.kafka.ranges import iter_ranges
from consumer.replay import ReplayError
from consumer.replay.bounds import Bound, resolve_ranges
from consumer.replay.checkpoint import Checkpoint
from consumer.replay.source import replay_consumer_config

# Verdict timestamps come from the producing clock, which may lag the input's producer.
CLOCK_SLACK = timedelta(hours=1)

RecordKey = tuple[str, int, int]  # the input record: topic, partition, offset
Direction = Literal["flagged", "cleared"]
DIRECTIONS: tuple[Direction, ...] = ("flagged", "cleared")


@dataclass(frozen=True)
class Decision:
    """One policy's decision on one record, as much of it as a backtest needs."""

    event_id: str
    policy_id: str
    policy_version: str
    violation: bool
    category: str | None
    action: str
    rationale: str | None


@dataclass
class Outputs:
    """One run's outputs indexed by input record.

    A later output for the same record replaces an earlier one: at-least-once delivery may
    repeat a record, and the last word is the one that stands.
    """

    decisions: dict[RecordKey, dict[str, Decision]] = field(default_factory=dict)
    failed: dict[RecordKey, str] = field(default_factory=dict)  # dead letters: their error type
    oldest_ms: int | None = None  # the earliest input record timestamp seen

    @classmethod
    def collect(
        cls, records: Iterable[dict[str, Any]], keep: Callable[[RecordKey], bool] = lambda key: True
    ) -> Outputs:
        outputs = cls()
        for record in records:
            source = record.get("source") or {}
            try:
                key = (str(source["topic"]), int(source["partition"]), int(source["offset"]))
            except (KeyError, TypeError, ValueError):
                continue  # not an output of this project
            if not keep(key):
                continue
            timestamp = source.get("timestamp_ms")
            if isinstance(timestamp, int) and (outputs.oldest_ms is None or timestamp < outputs.oldest_ms):
                outputs.oldest_ms = timestamp
            if record.get("kind") == "dead_letter":
                outputs.decisions.pop(key, None)
                outputs.failed[key] = str((record.get("error") or {}).get("type", "unknown"))
            elif record.get("kind") == "verdict":
                outputs.failed.pop(key, None)
                outputs.decisions[key] = {
                    r["policy_id"]: Decision(
                        event_id=str(record.get("event_id", "")),
                        policy_id=r["policy_id"],
                        policy_version=r.get("policy_version", ""),
                        violation=bool(r["violation"]),
                        category=r.get("category"),
                        action=r.get("action", ""),
                        rationale=r.get("rationale"),
                    )
                    for r in record.get("results", [])
                }
        return outputs

    def __len__(self) -> int:
        return len(self.decisions) + len(self.failed)


@dataclass(frozen=True)
class Flip:
    key: RecordKey
    before: Decision
    after: Decision

    @property
    def direction(self) -> Direction:
        return "flagged" if self.after.violation else "cleared"

    @property
    def category(self) -> str:
        """The category of the side that found a violation."""
        violating = self.after if self.after.violation else self.before
        return violating.category or "(none)"


@dataclass
class Backtest:
    """The comparison of a baseline and a candidate run; every count is of (record, policy) pairs
    except `only_*` and `failed_*`, which count records."""

    compared: Counter[str] = field(default_factory=Counter)  # policy id -> pairs compared
    flips: list[Flip] = field(default_factory=list)
    action_changes: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (policy, before, after)
    versions: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)  # policy -> (before, after)
    only_baseline: int = 0
    only_candidate: int = 0
    failed_baseline: int = 0
    failed_candidate: int = 0

    def flip_counts(self) -> Counter[tuple[Direction, str, str, str, str]]:
        """(direction, policy, category, action before, action after) -> flips."""
        return Counter(
            (f.direction, f.after.policy_id, f.category, f.before.action, f.after.action) for f in self.flips
        )

    def flipped(self, policy_id: str, direction: Direction) -> int:
        return sum(1 for f in self.flips if f.after.policy_id == policy_id and f.direction == direction)

    def examples(self, per_group: int) -> dict[tuple[Direction, str, str], list[Flip]]:
        """Up to `per_group` flips for each (direction, policy, category), in record order."""
        groups: dict[tuple[Direction, str, str], list[Flip]] = {}
        for flip in sorted(self.flips, key=lambda f: f.key):
            group = groups.setdefault((flip.direction, flip.after.policy_id, flip.category), [])
            if len(group) < per_group:
                group.append(flip)
        return groups


def compare(baseline: Outputs, candidate: Outputs) -> Backtest:
    result = Backtest()
    records = baseline.decisions.keys() | baseline.failed.keys() | candidate.decisions.keys() | candidate.failed.keys()
    for key in records:
        in_before = key in baseline.decisions or key in baseline.failed
        in_after = key in candidate.decisions or key in candidate.failed
        if not in_after:
            result.only_baseline += 1
            continue
        if not in_before:
            result.only_candidate += 1
            continue
        result.failed_baseline += key in baseline.failed
        result.failed_candidate += key in candidate.failed
        if key in baseline.failed or key in candidate.failed:
            continue
        before_policies, after_policies = baseline.decisions[key], candidate.decisions[key]
        for policy_id in before_policies.keys() & after_policies.keys():
            before, after = before_policies[policy_id], after_policies[policy_id]
            result.compared[policy_id] += 1
            seen = result.versions.setdefault(policy_id, (set(), set()))
            seen[0].add(before.policy_version)
            seen[1].add(after.policy_version)
            if before.violation != after.violation:
                result.flips.append(Flip(key, before, after))
            if before.action != after.action:
                result.action_changes[(policy_id, before.action, after.action)] += 1
    return result


# -- rendering ---------------------------------------------------------------------------------


def summary_rows(result: Backtest) -> list[tuple[str, ...]]:
    rows = []
    for policy_id in sorted(result.compared):
        before, after = result.versions[policy_id]
        flagged, cleared = result.flipped(policy_id, "flagged"), result.flipped(policy_id, "cleared")
        rows.append((
            policy_id, ", ".join(sorted(before)), ", ".join(sorted(after)), str(result.compared[policy_id]),
            str(result.compared[policy_id] - flagged - cleared), str(flagged), str(cleared),
        ))  # fmt: skip
    return rows


SUMMARY_COLUMNS = ("policy", "version before", "version after", "compared", "unchanged", "flagged (0→1)",
                   "cleared (1→0)")  # fmt: skip
FLIP_COLUMNS = ("direction", "policy", "category", "action before", "action after", "flips")


def flip_rows(result: Backtest) -> list[tuple[str, ...]]:
    counts = result.flip_counts()
    order = sorted(counts, key=lambda k: (DIRECTIONS.index(k[0]), k[1], -counts[k], k[2:]))
    return [(*key, str(counts[key])) for key in order]


def tables(result: Backtest) -> list[Table]:
    """The report as rich tables: per policy, then flips by category and action."""
    summary = Table(title="Backtest: decisions compared per policy")
    for column in SUMMARY_COLUMNS:
        summary.add_column(column, justify="left" if column in SUMMARY_COLUMNS[:3] else "right")
    for row in summary_rows(result):
        summary.add_row(*row)
    flips = Table(title=f"Flips by category and action ({len(result.flips)} in all)")
    for column in FLIP_COLUMNS:
        flips.add_column(column, justify="right" if column == "flips" else "left")
    for row in flip_rows(result):
        flips.add_row(*row)
    return [summary, flips]


def markdown(result: Backtest, baseline_name: str, candidate_name: str, examples: int = 3) -> str:
    """The report as Markdown: the tables, the unmatched records, and examples of each flip."""
    lines = [
        "# Backtest report",
        "",
        f"Baseline: `{baseline_name}`. Candidate: `{candidate_name}`.",
        "",
        f"{sum(result.compared.values())} (record, policy) decisions compared; {len(result.flips)} flipped: "
        f"{sum(f.direction == 'flagged' for f in result.flips)} newly flagged (0→1), "
        f"{sum(f.direction == 'cleared' for f in result.flips)} cleared (1→0).",
        "",
        *_markdown_table(SUMMARY_COLUMNS, summary_rows(result)),
        "",
        "## Flips by category and action",
        "",
        "The category is the violating side's: the candidate's for a flag, the baseline's for a clearance.",
        "",
        *(_markdown_table(FLIP_COLUMNS, flip_rows(result)) if result.flips else ["No decision flipped."]),
        "",
        "## Action changes",
        "",
    ]
    if result.action_changes:
        rows = [(p, b, a, str(n)) for (p, b, a), n in sorted(result.action_changes.items())]
        lines += _markdown_table(("policy", "action before", "action after", "decisions"), rows)
    else:
        lines.append("No action changed.")
    lines += [
        "",
        "## Records not compared",
        "",
        f"- only in the baseline: {result.only_baseline}",
        f"- only in the candidate: {result.only_candidate}",
        f"- a dead letter in the baseline: {result.failed_baseline}",
        f"- a dead letter in the candidate: {result.failed_candidate}",
        "",
        "## Examples",
    ]
    groups = result.examples(examples)
    if not groups:
        lines += ["", "None."]
    for (direction, policy_id, category), flips in groups.items():
        lines += ["", f"### {direction}: {policy_id}, {category}", ""]
        for flip in flips:
            topic, partition, offset = flip.key
            lines.append(f"- `{flip.after.event_id}` ({topic}[{partition}]@{offset}): "
                         f"{flip.before.action} → {flip.after.action}")
            lines.append(f"  - before (`{flip.before.policy_version}`): {_one_line(flip.before.rationale)}")
            lines.append(f"  - after (`{flip.after.policy_version}`): {_one_line(flip.after.rationale)}")
    return "\n".join(lines) + "\n"


def _markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows),
    ]


def _one_line(text: str | None, limit: int = 300) -> str:
    if not text:
        return "(no rationale)"
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")


# -- reading outputs back ----------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as lines:
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict):
                yield record


def read_topic(settings: Settings, topic: str, since: datetime | None) -> Iterator[dict[str, Any]]:
    """Every JSON object in `topic` from `since` (from the start when None) up to its end as of now."""
    config = replay_consumer_config(settings.kafka.bootstrap_servers, f"safeguard-replay-read-{topic}",
                                    settings.kafka.consumer_options)  # fmt: skip
    probe = Consumer(config)
    try:
        ranges = resolve_ranges(probe, topic, None, Bound.since(since), Bound("now"))
    except KafkaException as exc:
        raise ReplayError(f"cannot read the offsets of {topic!r}: {exc}") from None
    finally:
        probe.close()
    spans = [(topic, partition, r.start, r.end) for partition, r in ranges.items()]
    for message in iter_ranges(config, spans, group_id=config["group.id"]):
        try:
            record = orjson.loads(message.value() or b"")
        except orjson.JSONDecodeError:
            continue  # not an output of this project
        if isinstance(record, dict):
            yield record


def backtest(
    settings: Settings, checkpoint: Checkpoint, candidate: Path | str, baseline: str, report: Path, console: Console
) -> None:
    """Compare the replay's outputs (a file, or a topic filtered to this run) with `baseline`
    (a file or topic) over the replay's offset ranges; print the tables and write the Markdown."""
    in_ranges = lambda key: checkpoint.covers(*key)  # noqa: E731
    if isinstance(candidate, Path):
        after = Outputs.collect(read_jsonl(candidate), in_ranges)
    else:
        mine = (r for r in read_topic(settings, candidate, checkpoint.started_at - CLOCK_SLACK)
                if (r.get("replay") or {}).get("run_id") == checkpoint.run_id)  # fmt: skip
        after = Outputs.collect(mine, in_ranges)
    if Path(baseline).is_file():
        before = Outputs.collect(read_jsonl(Path(baseline)), in_ranges)
    else:
        # Outputs are produced after their input, so the baseline's start is near the ranges'.
        oldest = None if after.oldest_ms is None else datetime.fromtimestamp(after.oldest_ms / 1000, timezone.utc)
        before = Outputs.collect(read_topic(settings, baseline, oldest and oldest - CLOCK_SLACK), in_ranges)
    result = compare(before, after)
    for table in tables(result):
        console.print(table)
    report.write_text(markdown(result, baseline, f"replay {checkpoint.run_id} ({', '.join(checkpoint.policies)})"),
                      encoding="utf-8")  # fmt: skip
    console.print(f"backtest report written to {report}")
