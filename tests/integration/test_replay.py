"""Replay against the real broker: an exact offset range, untouched live offsets, resume without redoing."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import typer
import yaml
from confluent_kafka import Producer
from rich.console import Console
from typer.testing import CliRunner

from consumer.classify.keyword import KeywordClassifier
from consumer.cli import replay
from consumer.replay.bounds import Bound
from consumer.replay.checkpoint import Checkpoint
from consumer.replay.outputs import keep_delivered_lines
from consumer.replay.run import Replay, ReplayResult, check_resumable, plan_replay, replay_policies, replay_settings
from tests.conftest import REPO
from tests.kafka_helpers import (
    committed_offsets,
    create_topic,
    create_topics,
    decoded,
    end_offsets,
    event_json,
    produce,
    read_all,
    unique,
    wait_for,
)
from tests.plugins import SlowClassifier
from tests.runner import running_pipeline, settings_for

pytestmark = pytest.mark.kafka


class InThread:
    """Runs a Replay on its own thread and loop, as the CLI would run it in the main one."""

    def __init__(self, job: Replay):
        self.job = job
        self.result: ReplayResult | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.result = asyncio.run(self.job.run(install_signal_handlers=False))

    def wait(self, timeout: float) -> ReplayResult:
        self._thread.join(timeout)
        assert self.result is not None, "the replay did not end"
        return self.result


def start_replay(settings, classifier, checkpoint: Checkpoint, path: Path, output: Path, rate=None) -> InThread:
    _, store = replay_policies(settings, None)
    run_settings = replay_settings(settings, checkpoint.run_id, checkpoint.topic, None)
    quiet = Console(file=io.StringIO())
    return InThread(Replay(run_settings, classifier, store, checkpoint, path, output, rate, quiet))


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def test_a_time_range_yields_exactly_its_records_and_stops_at_end_while_producers_write(kafka, policies_dir, tmp_path):
    topic = unique("range")
    create_topics(kafka, topic, partitions=2)
    keys = lambda n: (b"k%d" % i for i in range(n))  # noqa: E731
    produce(kafka, topic, (event_json(i, event_id=f"before-{i}") for i in range(40)), keys=keys(40))
    time.sleep(0.05)
    start = now()
    time.sleep(0.05)
    produce(kafka, topic, (event_json(i, event_id=f"in-{i}") for i in range(120)), keys=keys(120))
    time.sleep(0.05)
    end = now()
    time.sleep(0.05)

    writing = threading.Event()
    writing.set()

    def keep_producing() -> None:
        producer = Producer({"bootstrap.servers": kafka, "linger.ms": 1})
        i = 0
        while writing.is_set():
            producer.produce(topic, event_json(i, event_id=f"after-{i}"), key=b"k%d" % i)
            producer.poll(0.005)
            i += 1
        producer.flush(10)

    producer = threading.Thread(target=keep_producing, daemon=True)
    producer.start()
    try:
        wait_for(lambda: sum(end_offsets(kafka, topic, 2).values()) > 200, timeout=20, message="records after END")
        written_at_start = sum(end_offsets(kafka, topic, 2).values())
        settings, store = replay_policies(settings_for(kafka, unique("live"), topic, policies_dir), None)
        checkpoint = plan_replay(settings, store, topic, "file:out", Bound.parse(start), Bound.parse(end))
        assert checkpoint.records() == 120
        classifier = SlowClassifier()
        output, path = tmp_path / "out.jsonl", tmp_path / "out.checkpoint.json"
        result = start_replay(settings, classifier, checkpoint, path, output).wait(timeout=30)
        assert sum(end_offsets(kafka, topic, 2).values()) > written_at_start, "the producer wrote during the replay"
    finally:
        writing.clear()
        producer.join(30)

    assert result.finished and result.exit_code == 0
    assert (result.run.verdicts, result.run.dead_letters, classifier.calls) == (120, 0, 120)
    outputs = lines(output)
    assert sorted(v["event_id"] for v in outputs) == sorted(f"in-{i}" for i in range(120))
    assert {(v["source"]["partition"], v["source"]["offset"]) for v in outputs} == {
        (p, o) for p, w in checkpoint.ranges.items() for o in range(w.start, w.end)
    }
    assert {v["replay"]["run_id"] for v in outputs} == {checkpoint.run_id}
    assert store.get()["chat-harassment"].ref in checkpoint.policies and len(checkpoint.policies) == 4
    assert all(v["replay"]["policies"] == checkpoint.policies for v in outputs)
    saved = Checkpoint.load(path)
    assert saved.complete and all(w.next == w.end for w in saved.ranges.values())


def test_a_replay_never_touches_the_live_groups_offsets_and_backtests_a_policy_edit(kafka, policies_dir, tmp_path):
    topic, group, out = unique("backtest"), unique("live"), unique("replayed")
    create_topics(kafka, topic, f"{topic}.verdicts", f"{topic}.dlq", out, partitions=2)
    contents = ["kys loser", "everyone hates you", "good game all"]
    produce(kafka, topic, (event_json(i, contents[i % 3]) for i in range(30)), keys=(b"c%d" % i for i in range(30)))
    settings = settings_for(kafka, group, topic, policies_dir)
    with running_pipeline(settings, KeywordClassifier()) as live:
        read_all(kafka, f"{topic}.verdicts", expected=30, timeout=60)
        ends = end_offsets(kafka, topic, 2)
        wait_for(lambda: committed_offsets(kafka, group, topic, 2) == ends, timeout=30, message="live commits")
        assert live.stop().exit_code == 0
    produce(kafka, topic, (event_json(i, "kys") for i in range(30, 36)))  # the live group has not read these
    committed_before = committed_offsets(kafka, group, topic, 2)

    # The edit: "everyone hates you" becomes harassment, "kys" alone no longer is.
    original = (REPO / "policies" / "chat-harassment.md").read_text()
    edited = tmp_path / "chat-harassment.md"
    edited.write_text(original.replace("  - '\\bkys\\b'\n", "  - 'everyone hates you'\n"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka, "group_id": group, "input_topics": [topic]},
        "policies": {"directory": str(policies_dir), "default": "chat-harassment"},
        "pipeline": {"commit_interval_s": 0.2},
        "log": {"level": "WARNING"},
    }))  # fmt: skip
    app = typer.Typer()
    app.command()(replay)
    report, checkpoint_path = tmp_path / "report.md", tmp_path / "replay.checkpoint.json"
    result = CliRunner().invoke(app, [
        "--config", str(config), "--topic", topic, "--from", "earliest", "--to", "now",
        "--policy", f"chat-harassment@{edited}", "--output-topic", out, "--compare", f"{topic}.verdicts",
        "--report", str(report), "--checkpoint", str(checkpoint_path),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output

    checkpoint = Checkpoint.load(checkpoint_path)
    assert committed_offsets(kafka, group, topic, 2) == committed_before
    assert set(committed_offsets(kafka, f"safeguard-replay-{checkpoint.run_id}", topic, 2).values()) == {-1001}
    replayed = read_all(kafka, out, expected=36, timeout=30)
    assert len(replayed) == 36
    assert all(dict(m.headers())["safeguard-replay"] == checkpoint.run_id.encode() for m in replayed)
    assert {v["replay"]["run_id"] for v in decoded(replayed)} == {checkpoint.run_id}

    # 30 records have a live verdict to compare with: 10 flagged, 10 cleared, 10 unchanged.
    text = report.read_text()
    v1, v2 = (REPO / "policies" / "chat-harassment.md"), edited
    from consumer.policy import load_policy

    row = f"| chat-harassment | {load_policy(v1).version} | {load_policy(v2).version} | 30 | 10 | 10 | 10 |"
    assert row in text, text
    assert "| flagged | chat-harassment | harassment | allow | delete | 10 |" in text
    assert "| cleared | chat-harassment | harassment | delete | allow | 10 |" in text
    assert "- only in the candidate: 6" in text
    assert "matched pattern /everyone hates you/" in text and "no pattern matched" in text
    assert "Flips by category and action (20 in all)" in result.output


def test_interrupted_and_resumed_classifies_every_record_of_the_range_once(kafka, policies_dir, tmp_path):
    topic, total, rate = unique("resume"), 300, 150.0
    create_topics(kafka, topic, partitions=3)
    produce(kafka, topic, (event_json(i) for i in range(total)), keys=(b"c%d" % i for i in range(total)))
    settings, store = replay_policies(settings_for(kafka, unique("live"), topic, policies_dir), None)
    output, path = tmp_path / "out.jsonl", tmp_path / "out.checkpoint.json"
    checkpoint = plan_replay(settings, store, topic, f"file:{output}", Bound.parse("earliest"), Bound.parse("now"))
    checkpoint.save(path)
    started = time.monotonic()

    first = SlowClassifier(delay_s=0.005, max_concurrency=8)
    running = start_replay(settings, first, checkpoint, path, output, rate=rate)
    wait_for(lambda: sum(running.job.progress.done_this_run.values()) >= 100, timeout=30, message="100 done")
    running.job.stop()
    interrupted = running.wait(timeout=30)
    assert not interrupted.finished and interrupted.exit_code == 130
    assert 100 <= first.calls < total

    resumed_checkpoint = Checkpoint.load(path)
    check_resumable(resumed_checkpoint, topic, f"file:{output}", store)
    assert not resumed_checkpoint.complete
    assert keep_delivered_lines(output, resumed_checkpoint) == 0  # a graceful stop delivered all it started
    second = SlowClassifier(delay_s=0.005, max_concurrency=8)
    resumed = start_replay(settings, second, resumed_checkpoint, path, output, rate=rate).wait(timeout=60)
    elapsed = time.monotonic() - started

    assert resumed.finished and resumed.exit_code == 0
    assert first.calls + second.calls == total
    assert sum(resumed.done_before.values()) == first.calls
    outputs = lines(output)
    assert len(outputs) == total
    assert sorted((v["source"]["partition"], v["source"]["offset"]) for v in outputs) == sorted(
        (p, o) for p, w in checkpoint.ranges.items() for o in range(w.start, w.end)
    )
    assert {v["replay"]["run_id"] for v in outputs} == {checkpoint.run_id}
    # The token bucket starts empty and holds a tenth of a second: 300 records take >= ~1.9 s at 150/s.
    assert elapsed >= (total - 2 * rate / 10) / rate


def test_a_replay_reads_the_policy_topic_once_and_its_verdicts_carry_the_published_version(
    kafka, policies_dir, tmp_path
):
    from consumer.cli import app as cli_app
    from consumer.policy import parse_policy

    topic, policy_topic, out = unique("replay-topic-policy"), unique("policies"), unique("replayed")
    create_topics(kafka, topic, out, partitions=1)
    create_topic(kafka, policy_topic, config={"cleanup.policy": "compact"})
    produce(kafka, topic, (event_json(i, "everyone hates you") for i in range(6)))
    published = (REPO / "policies" / "chat-harassment.md").read_text().replace(
        "patterns:\n", "patterns:\n  - 'everyone hates you'\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka, "input_topics": [topic]},
        "policies": {"directory": str(policies_dir), "default": "chat-harassment", "topic": policy_topic},
        "log": {"level": "WARNING"},
    }))  # fmt: skip
    policy_file = tmp_path / "chat-harassment.md"
    policy_file.write_text(published)
    runner = CliRunner()
    done = runner.invoke(cli_app, ["policy", "publish", str(policy_file), "--config", str(config), "--by", "test"])
    assert done.exit_code == 0, done.output

    result = runner.invoke(cli_app, [
        "replay", "--config", str(config), "--topic", topic, "--from", "earliest", "--to", "now",
        "--output-topic", out, "--checkpoint", str(tmp_path / "replay.checkpoint.json"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    verdicts = decoded(read_all(kafka, out, expected=6, timeout=30))
    results = [r for v in verdicts for r in v["results"]]
    assert {r["policy_version"] for r in results} == {parse_policy(published.encode()).version}
    assert [r["violation"] for r in results] == [True] * 6, results  # the published pattern, not the file's
