"""A replay run shared by many workers (`replay --run`), against the real broker: a worker killed and
another added mid-run lose nothing, replay nothing outside the plan, duplicate within one intake
window, and the run's backtest equals one process's; a different plan under the same name is
refused and a finished run started again does nothing."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from consumer.classify.keyword import KeywordClassifier
from consumer.cli import app
from consumer.config import load_settings
from consumer.kafka.admin import connect
from consumer.replay.backtest import backtest
from consumer.replay.bounds import Bound, OffsetRange
from consumer.replay.run import Replay, plan_replay, replay_policies, replay_settings
from consumer.replay.runs import RunLedger, RunRequest, new_plan, run_group
from tests.conftest import FAULT_FIGURES, REPO
from tests.kafka_helpers import (
    committed_offsets,
    create_topics,
    decoded,
    end_offsets,
    event_json,
    produce,
    read_all,
    unique,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

INTAKE_LIMIT = 100  # pipeline.max_in_flight_events: what one killed worker may leave to be redone
CONTENTS = ["kys loser", "everyone hates you", "good game all"]


def _config(path: Path, kafka: str, plugin: dict | None = None, group_id: str | None = None) -> Path:
    classifier = {"kind": "plugin", "factory": "tests.plugins:slow_keyword", "options": plugin} if plugin else {}
    path.write_text(yaml.safe_dump({
        "kafka": {
            "bootstrap_servers": kafka, "group_id": group_id or unique("live"), "input_topics": ["unused"],
            # A killed worker's partitions move after the session timeout: the broker's minimum.
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        },
        "policies": {"directory": str(REPO / "policies"), "default": "chat-harassment"},
        "pipeline": {"commit_interval_s": 0.2, "max_in_flight_events": INTAKE_LIMIT, "revoke_drain_s": 20},
        "classifier": classifier,
        "log": {"level": "WARNING"},
    }))  # fmt: skip
    return path


def _edited_policy(tmp_path: Path) -> Path:
    """"everyone hates you" becomes harassment, "kys" alone no longer is."""
    edited = tmp_path / "chat-harassment.md"
    original = (REPO / "policies" / "chat-harassment.md").read_text()
    edited.write_text(original.replace("  - '\\bkys\\b'\n", "  - 'everyone hates you'\n"))
    return edited


def _worker(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "consumer", "replay", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _single_process(kafka: str, config: Path, topic: str, policy: str | None, output: Path) -> Replay:
    """A replay without --run over the whole topic as it is now, into `output`, in this process."""
    settings, store = replay_policies(load_settings(config, {"classifier.kind": "keyword"}), policy)
    checkpoint = plan_replay(settings, store, topic, f"file:{output}", Bound.parse("earliest"), Bound.parse("now"))
    job = Replay(replay_settings(settings, checkpoint.run_id, topic, None), KeywordClassifier(), store, checkpoint,
                 output.with_suffix(".checkpoint.json"), output, console=Console(file=io.StringIO()))  # fmt: skip
    result = asyncio.run(job.run(install_signal_handlers=False))
    assert result.finished and result.exit_code == 0
    return job


def _report_body(path: Path) -> str:
    """A backtest report without its header line, which names the runs compared."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("Baseline:"))


def test_a_run_survives_a_sigkilled_worker_and_a_late_one_and_backtests_as_one_process(kafka, tmp_path):
    topic, out, runs, name = unique("fleet"), unique("fleet-out"), unique("runs"), unique("run")
    partitions, total = 4, 4000
    create_topics(kafka, topic, out, partitions=partitions)
    produce(kafka, topic, (event_json(i, CONTENTS[i % 3]) for i in range(total)),
            keys=(b"c%d" % i for i in range(total)))
    edited = _edited_policy(tmp_path)
    config = _config(tmp_path / "config.yaml", kafka, plugin={"delay_s": 0.02, "max_concurrency": 4})

    # The baseline (the policy as it is) and the single-process backtest of the edit, on the same range.
    baseline = tmp_path / "baseline.jsonl"
    _single_process(kafka, config, topic, None, baseline)
    alone = tmp_path / "alone.jsonl"
    job = _single_process(kafka, config, topic, f"chat-harassment@{edited}", alone)
    settings, _ = replay_policies(load_settings(config), None)
    alone_report = tmp_path / "alone.md"
    backtest(settings, job.checkpoint, alone, str(baseline), alone_report, Console(file=io.StringIO()))

    def worker(letter: str) -> subprocess.Popen:
        return _worker(["--config", str(config), "--topic", topic, "--from", "earliest", "--to", "now",
                        "--policy", f"chat-harassment@{edited}", "--run", name, "--runs-topic", runs,
                        "--output-topic", out, "--compare", str(baseline), "--report", str(tmp_path / f"{letter}.md")],
                       tmp_path / f"{letter}.log")  # fmt: skip

    def outputs() -> int:
        return sum(end_offsets(kafka, out, partitions).values())

    # Two workers start at once: they must agree on one plan.
    first, second = worker("a"), worker("b")
    try:
        ledger = RunLedger(settings, runs)
        wait_for(lambda: outputs() > 0, timeout=120, message="the run's first outputs")
        records = ledger.read(name)
        plan = records.plan
        assert plan is not None and plan.records() == total
        # Written after the plan was fixed: outside it, whatever `--to now` says to a later worker.
        produce(kafka, topic, (event_json(i, "kys") for i in range(total, total + 200)))
        wait_for(lambda: outputs() >= total // 4, timeout=120, message="a quarter of the run")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = outputs()
        late = worker("c")

        # Mid-run, `replay status` says who holds what and that the run is not complete (exit 3).
        status = CliRunner().invoke(app, ["replay", "status", name, "--config", str(config), "--runs-topic", runs])
        assert status.exit_code == 3, status.output
        assert "incomplete" in status.output and "@" in status.output  # a member (client id @ host) holds partitions

        assert second.wait(240) == 0, (tmp_path / "b.log").read_text()[-3000:]
        assert late.wait(240) == 0, (tmp_path / "c.log").read_text()[-3000:]
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    assert killed_at < total, "the kill came mid-run"

    produced = decoded(read_all(kafka, out, expected=total, timeout=60))
    covered = Counter((v["source"]["partition"], v["source"]["offset"]) for v in produced)
    planned = {(p, o) for p, r in plan.ranges.items() for o in range(r.start, r.end)}
    assert set(covered) == planned  # every record of the plan has an output, none outside it
    duplicates = sum(covered.values()) - total
    assert 0 <= duplicates <= INTAKE_LIMIT, duplicates  # one kill: at most one intake window redone
    FAULT_FIGURES.append(f"replay run: {total} records, 1 worker killed at {killed_at} outputs, 1 added: "
                         f"{duplicates} duplicates (bound {INTAKE_LIMIT}), 0 lost, 0 outside the plan")  # fmt: skip
    assert {v["replay"]["run_id"] for v in produced} == {name}
    assert len({v["replay"]["started_at"] for v in produced}) == 1
    assert committed_offsets(kafka, run_group(name), topic, partitions) == {p: r.end for p, r in plan.ranges.items()}
    final = ledger.read(name)
    assert final.completed is not None and final.plan == plan

    finished = CliRunner().invoke(app, ["replay", "status", name, "--config", str(config), "--runs-topic", runs])
    assert finished.exit_code == 0 and "complete (finished at" in finished.output, finished.output
    assert "incomplete" not in finished.output
    # The backtest of the run, read once from its output topic whoever wrote it, equals one process's.
    expected = _report_body(alone_report)
    assert "| flagged | chat-harassment | harassment | allow | delete |" in expected
    for letter in ("b", "c"):
        assert _report_body(tmp_path / f"{letter}.md") == expected


def test_another_plan_under_the_same_name_is_refused_and_a_finished_run_does_nothing(kafka, tmp_path):
    topic, out, runs, name = unique("fleet-plan"), unique("fleet-plan-out"), unique("runs"), unique("run")
    create_topics(kafka, topic, out, partitions=2)
    produce(kafka, topic, (event_json(i, CONTENTS[i % 3]) for i in range(40)), keys=(b"c%d" % i for i in range(40)))
    config = _config(tmp_path / "config.yaml", kafka)
    command = ["replay", "--config", str(config), "--topic", topic, "--from", "earliest", "--to", "now",
               "--run", name, "--runs-topic", runs, "--output-topic", out]  # fmt: skip
    runner = CliRunner()

    done = runner.invoke(app, command)
    assert done.exit_code == 0, done.output
    assert sum(end_offsets(kafka, out, 2).values()) == 40

    produce(kafka, topic, (event_json(i, "kys") for i in range(40, 50)))  # `--to now` now means more: not this run
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "is complete" in again.output and "nothing to replay" in again.output
    assert sum(end_offsets(kafka, out, 2).values()) == 40

    # Started again with --compare, a finished run only backtests: its whole output, read once.
    report = tmp_path / "report.md"
    compared = runner.invoke(app, [*command, "--compare", out, "--report", str(report)])
    assert compared.exit_code == 0 and "nothing to replay" in compared.output, compared.output
    text = report.read_text()
    assert "40 (record, policy) decisions compared; 0 flipped" in text and "- only in the candidate: 0" in text

    other_end = runner.invoke(app, [*command[:8], "30", *command[9:]])
    assert other_end.exit_code == 2
    assert "--to: 'now' in the plan, '30' here" in other_end.output
    edited = runner.invoke(app, [*command, "--policy", f"chat-harassment@{_edited_policy(tmp_path)}"])
    assert edited.exit_code == 2 and "the policy versions" in edited.output
    to_file = runner.invoke(app, [*command[:-2], "--output", str(tmp_path / "out.jsonl")])
    assert to_file.exit_code == 2 and "--output-topic" in to_file.output
    assert sum(end_offsets(kafka, out, 2).values()) == 40
    assert RunLedger(load_settings(config), runs).read(name).proposals == 1

    unknown = runner.invoke(app, ["replay", "status", unique("never"), "--config", str(config), "--runs-topic", runs])
    assert unknown.exit_code == 2 and "no replay run" in unknown.output, unknown.output
    # A run never joins the live group: a name whose run group is kafka.group_id is refused before anything is read.
    live_name = unique("live")
    live = _config(tmp_path / "live.yaml", kafka, group_id=run_group(live_name))
    as_live = runner.invoke(app, ["replay", "--config", str(live), "--topic", topic, "--from", "earliest",
                                  "--to", "now", "--run", live_name, "--runs-topic", runs, "--output-topic", out])
    assert as_live.exit_code == 2 and "the live group's" in as_live.output, as_live.output
    assert sum(end_offsets(kafka, out, 2).values()) == 40


def test_workers_proposing_at_once_all_take_the_first_plan(kafka, tmp_path):
    settings = load_settings(_config(tmp_path / "config.yaml", kafka))
    ledger, name = RunLedger(settings, unique("runs")), unique("run")
    ledger.ensure(connect(settings))
    base = RunRequest(topic="t", start="earliest", end="now", partitions=None, output="topic:o",
                      policies=["p@1"], classifier="keyword/none:x")  # fmt: skip
    # `--to now` resolved a moment apart: each worker proposes other offsets for the same request.
    proposals = [new_plan(name, base, {0: OffsetRange(start=0, end=end, next=0)}) for end in range(100, 108)]
    agreed: list = [None] * len(proposals)

    def propose(i: int) -> None:
        agreed[i] = ledger.agree(proposals[i])

    threads = [threading.Thread(target=propose, args=(i,)) for i in range(len(proposals))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    records = ledger.read(name)
    assert records.proposals == len(proposals)
    assert all(plan == records.plan for plan in agreed) and records.plan in proposals
