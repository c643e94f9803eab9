"""The checkpoint: what a resumed replay keeps, written whole or not at all."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from consumer.replay import ReplayError
from consumer.replay.bounds import OffsetRange
from consumer.replay.checkpoint import Checkpoint


def checkpoint() -> Checkpoint:
    return Checkpoint(run_id="r1", topic="chat", output="file:out.jsonl", policies=["p@1"],
                      started_at=datetime(2025, 6, 1, tzinfo=timezone.utc),
                      ranges={0: OffsetRange(start=10, end=20, next=10), 1: OffsetRange(start=0, end=5, next=0)})  # fmt: skip


def test_it_advances_to_delivered_positions_never_back_and_never_past_end():
    saved = checkpoint()
    saved.advance({0: 15, 1: 9})
    saved.advance({0: 12})
    assert (saved.ranges[0].next, saved.ranges[1].next) == (15, 5)
    assert saved.covers("chat", 0, 14) and not saved.covers("chat", 0, 15) and not saved.covers("other", 0, 14)
    assert saved.records() == 15
    saved.finish()
    assert saved.complete and all(r.next == r.end for r in saved.ranges.values())


def test_saved_and_loaded_it_is_the_same_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "replay.checkpoint.json"
    saved = checkpoint()
    saved.save(path)
    saved.advance({0: 11})
    saved.save(path)
    assert Checkpoint.load(path) == saved
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_checkpoint_written_when_the_ranges_were_called_window_still_loads(tmp_path):
    path = tmp_path / "old.checkpoint.json"
    path.write_text(checkpoint().model_dump_json().replace('"ranges"', '"window"'))
    assert Checkpoint.load(path) == checkpoint()


def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text("{}")
    with pytest.raises(ReplayError, match="not a replay checkpoint"):
        Checkpoint.load(path)
    with pytest.raises(ReplayError, match="cannot read the checkpoint"):
        Checkpoint.load(tmp_path / "missing.json")


def test_the_summary_tells_a_replay_stopped_by_an_error_from_one_interrupted():
    from consumer.pipeline.pipeline import RunResult
    from consumer.replay.run import ReplayResult, summary

    def title(exit_code: int) -> str:
        run = RunResult(exit_code=exit_code, consumed=4, verdicts=0, dead_letters=0, reason="the output failed")
        result = ReplayResult(finished=False, run=run, violations=0, done_before={}, done_this_run={}, elapsed_s=1.0)
        return str(summary(checkpoint(), result, "out.jsonl").title)

    assert "interrupted: run again with --resume" in title(0)
    assert "stopped by the error below" in title(1) and "interrupted" not in title(1)
