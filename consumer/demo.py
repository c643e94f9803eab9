"""`safeguard-consumer demo`: the whole data path on a laptop, in one command.

Starts a private Kafka broker (`consumer.kafka.devkafka`), creates the topics, produces the bundled
sample stream (Discord-style chat across servers and channels, and marketplace reviews, plus
a few malformed records), runs the consumer on it, shows the verdicts as they arrive, prints
a summary, writes the verdicts and the review items to JSONL files, and stops everything it
started, also on Ctrl-C. Results the engine could not decide are shown as awaiting review
(held), not as violations, and the summary says how many await a person and where they are.

The engine is the best one available: gpt-oss-safeguard on vLLM behind the cascade where a
GPU and vLLM are present; otherwise the cascade's cheap stages alone, on CPU, trained from
each policy's examples. The demo says plainly which one ran.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from consumer import stages
from consumer.classify import Classifier
from consumer.classify.factory import build_classifier
from consumer.config import Settings, load_settings
from consumer.kafka.client import Consumer, Producer
from consumer.kafka.devkafka import KafkaBroker, cache_dir, create_topics
from consumer.pipeline.background import BackgroundPipeline
from consumer.pipeline.pipeline import Pipeline
from consumer.policy import PolicyStore

CHAT_TOPIC, REVIEW_TOPIC = "demo.chat", "demo.reviews"
VERDICT_TOPIC, DEAD_LETTER_TOPIC = "demo.verdicts", "demo.dead-letters"
REVIEW_ITEMS, DECISIONS, APPEALS = "demo.review-items", "demo.review-decisions", "demo.review-appeals"
MALFORMED = [b'{"event_id": "broken-1", "content": ', b'{"event_id": "no-content"}', b"\xff\xfe not utf-8"]


@dataclass
class DemoSummary:
    engine: str
    produced: int
    verdicts: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    by_policy: Counter[tuple[str, str]] = field(default_factory=Counter)
    seconds: float = 0.0
    verdicts_file: Path | None = None
    awaiting_review: Counter[tuple[str, str]] = field(default_factory=Counter)  # (policy, reason)
    review_items: int = 0
    review_file: Path | None = None

    @property
    def events_per_second(self) -> float:
        return (self.verdicts + sum(self.dead_letters.values())) / self.seconds if self.seconds else 0.0


def sample_events() -> list[dict]:
    text = resources.files("consumer.data").joinpath("demo_events.jsonl").read_text(encoding="utf-8")
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def default_policies_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "policies"


ENGINES = {
    "cascade": "the cascade's cheap stages on CPU (verdict cache + a lexical model trained on each policy's "
    "examples); no reasoning model: much weaker than gpt-oss-safeguard, it shows the data path",
    "vllm": "gpt-oss-safeguard ({model}) on vLLM, behind the cascade's cache and cheap stages",
    "keyword": "each policy's keyword patterns; no model at all",
}


def best_engine() -> str:
    """`vllm` where vLLM and a CUDA GPU are present, else `cascade`."""
    if importlib.util.find_spec("vllm") is None:
        return "cascade"
    import torch

    return "vllm" if torch.cuda.is_available() else "cascade"


def run_demo(
    policies_dir: Path,
    console: Console,
    engine: str = "auto",
    model: str = "openai/gpt-oss-safeguard-20b",
    timeout_s: float = 300.0,
    classifier: Classifier | None = None,
) -> DemoSummary:
    """`classifier`, when given, replaces the engine (tests)."""
    engine = best_engine() if engine == "auto" else engine
    description = ENGINES[engine].format(model=model) if classifier is None else classifier.name
    console.print(f"[bold]engine:[/bold] {description}")
    with tempfile.TemporaryDirectory(prefix="safeguard-demo-") as data_dir:
        broker = KafkaBroker(Path(data_dir))
        console.print("starting a local Kafka broker (first run fetches its jars with Maven)...")
        broker.start()
        try:
            console.print(f"Kafka at {broker.bootstrap}")
            settings = _settings(broker.bootstrap, policies_dir, engine, model, Path(data_dir))
            store = PolicyStore(settings.policies.directory)
            classifier = classifier or build_classifier(settings, store)
            return _run(broker.bootstrap, settings, store, classifier, description, console, timeout_s)
        finally:
            broker.stop()
            console.print("stopped the local Kafka broker")


def _settings(bootstrap: str, policies_dir: Path, engine: str, model: str, state_dir: Path) -> Settings:
    overrides: dict[str, object] = {
        "kafka.bootstrap_servers": bootstrap,
        "kafka.group_id": "safeguard-demo",
        "kafka.input_topics": [CHAT_TOPIC, REVIEW_TOPIC],
        "kafka.verdict_topic": VERDICT_TOPIC,
        "kafka.dead_letter_topic": DEAD_LETTER_TOPIC,
        "policies.directory": str(policies_dir),
        "policies.routes": [
        {"topics": [CHAT_TOPIC], "policies": ["chat-harassment", "spam-scams"]},
        {"topics": [REVIEW_TOPIC], "policies": ["fake-reviews", "spam-scams"]},
        ],
        "pipeline.commit_interval_s": 0.5,
        "telemetry.http_port": None,
        "chat.context_messages": 10,
        "classifier.kind": "keyword" if engine == "keyword" else "cascade",
        "classifier.reasoner": "in_process" if engine == "vllm" else "none",
        "cascade.state_dir": str(state_dir / "cascade"),
        "review.enabled": True,
        "review.topic": REVIEW_ITEMS,
        "review.decisions_topic": DECISIONS,
        "review.appeals_topic": APPEALS,
    }
    if engine == "vllm":
        overrides["engine.model"] = model
    return load_settings(None, overrides)


def _run(
    bootstrap: str,
    settings: Settings,
    store: PolicyStore,
    classifier: Classifier,
    engine: str,
    console: Console,
    timeout_s: float,
) -> DemoSummary:
    create_topics(bootstrap, CHAT_TOPIC, partitions=3)
    create_topics(bootstrap, REVIEW_TOPIC, VERDICT_TOPIC, DEAD_LETTER_TOPIC, REVIEW_ITEMS, DECISIONS, APPEALS)
    events = sample_events()
    contents = {e["event_id"]: e["content"] for e in events}
    produced = _produce(bootstrap, events)
    pipeline = Pipeline(settings, classifier, store)
    summary = DemoSummary(engine=engine, produced=produced)
    reader = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "safeguard-demo-reader", "auto.offset.reset": "earliest"}
    )
    reader.subscribe([VERDICT_TOPIC, DEAD_LETTER_TOPIC, REVIEW_ITEMS])
    out_path = cache_dir() / "demo" / "verdicts.jsonl"
    review_path = out_path.with_name("review-items.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    first_output: float | None = None
    rows: list[tuple[str, ...]] = []
    with (
        BackgroundPipeline(pipeline),
        open(out_path, "wb") as out,
        open(review_path, "wb") as review_out,
        Live(console=console, refresh_per_second=8) as live,
    ):
        # Until every record has its output and every review the verdicts announce has its item.
        while (summary.verdicts + sum(summary.dead_letters.values()) < produced
               or summary.review_items < sum(summary.awaiting_review.values())):  # fmt: skip
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the demo did not finish within {timeout_s:.0f}s")
            for message in reader.consume(200, timeout=0.2):
                if message.error() is not None:
                    continue
                if message.topic() == REVIEW_ITEMS:
                    review_out.write(message.value() + b"\n")
                    summary.review_items += 1
                    continue
                first_output = first_output or time.monotonic()
                out.write(message.value() + b"\n")
                rows.append(_record(orjson.loads(message.value()), contents, summary))
            live.update(_live_table(rows[-15:], summary))
        # Rate from the first output on: group join and broker warm-up are not throughput.
        summary.seconds = time.monotonic() - (first_output or started)
    reader.close()
    summary.verdicts_file = out_path
    summary.review_file = review_path
    _print_summary(console, summary)
    return summary


def _produce(bootstrap: str, events: list[dict]) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for event in events:
        topic = REVIEW_TOPIC if event.get("content_type") == "review" else CHAT_TOPIC
        key = str(event.get("context_id") or event["event_id"]).encode()
        producer.produce(topic, key=key, value=orjson.dumps(event))
    for value in MALFORMED:
        producer.produce(CHAT_TOPIC, key=b"malformed", value=value)
    producer.flush(30)
    producer.close()
    return len(events) + len(MALFORMED)


def _record(output: dict, contents: dict[str, str], summary: DemoSummary) -> tuple[str, ...]:
    if output["kind"] == "dead_letter":
        summary.dead_letters[output["error"]["type"]] += 1
        return ("(unreadable record)", "-", f"dead letter: {output['error']['type']}", "", output["error"]["message"][:60])
    summary.verdicts += 1
    pending = [r for r in output["results"] if r.get("review")]
    for result in pending:
        summary.awaiting_review[(result["policy_id"], result["review"]["reason"])] += 1
    for result in output["results"]:
        if result.get("stage") == stages.UNDECIDED:
            summary.by_policy[(result["policy_id"], "(needs review)")] += 1
        else:
            summary.by_policy[(result["policy_id"], result["category"] or ("violation" if result["violation"] else "safe"))] += 1
    flagged = [r for r in output["results"] if r["violation"] and r.get("stage") != stages.UNDECIDED]
    shown = flagged[0] if flagged else (pending[0] if pending else output["results"][0])
    content = contents.get(output["event_id"], "")
    if output["violation"]:
        verdict = f"VIOLATION: {output['action']}"
    elif pending:
        verdict = f"needs review: {output['action']}"
    else:
        verdict = "ok"
    return (content[:48], shown["policy_id"], verdict, shown.get("stage") or shown["model"], (shown["rationale"] or "")[:60])


def _live_table(rows: list[tuple[str, ...]], summary: DemoSummary) -> Table:
    done = summary.verdicts + sum(summary.dead_letters.values())
    table = Table(title=f"verdicts as they arrive ({done}/{summary.produced})", expand=True)
    for column in ("message", "policy", "verdict", "stage", "rationale"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "red" if row[2].startswith("VIOLATION") else "yellow" if row[2].startswith("needs review") else None
        table.add_row(*row, style=style)
    return table


def _print_summary(console: Console, summary: DemoSummary) -> None:
    table = Table(title="summary")
    table.add_column("policy")
    table.add_column("category")
    table.add_column("events", justify="right")
    for (policy, category), count in sorted(summary.by_policy.items()):
        table.add_row(policy, category, str(count))
    for error_type, count in sorted(summary.dead_letters.items()):
        table.add_row("(dead letter)", error_type, str(count))
    console.print(table)
    console.print(
        f"{summary.produced} records in, {summary.verdicts} verdicts, "
        f"{sum(summary.dead_letters.values())} dead letters, {summary.events_per_second:.0f} events/s"
    )
    console.print(f"engine: {summary.engine}")
    console.print(f"verdicts and dead letters written to {summary.verdicts_file}")
    waiting = sum(summary.awaiting_review.values())
    reasons = ", ".join(f"{policy} {reason}: {n}" for (policy, reason), n in sorted(summary.awaiting_review.items()))
    console.print(f"{waiting} results await a person's review ({reasons or 'none'}); they hold, they are not violations")
    console.print(f"their review items are in {summary.review_file}; against your own Kafka: "
                  "`safeguard-consumer review pending --config FILE` lists them, and decisions posted to "
                  "review.decisions_topic come back as corrected verdicts (README: Human review)")  # fmt: skip
