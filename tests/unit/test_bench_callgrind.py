"""bench/callgrind.py and the window `Meter` marks: what an instruction count covers."""

import sys

import pytest

from bench import callgrind, workload
from tests.conftest import REPO


def test_a_meter_marks_its_window_once_at_each_end(monkeypatch):
    marks = []
    monkeypatch.setattr(workload.os, "getsid", lambda pid: marks.append(pid) or 0)
    meter = workload.Meter()
    meter.first_record()
    meter.first_record()  # every record calls it: only the first marks
    assert marks == [0]
    meter.done()
    assert marks == [0, 0]


def test_instructions_an_event_are_the_difference_over_the_sizes():
    assert callgrind.per_event((1_000_000, 4_000_000), (1000, 4000)) == 1000.0


@pytest.mark.skipif(not callgrind.available(), reason=callgrind.MISSING)
def test_the_count_is_the_window_between_the_two_marks_alone(tmp_path):
    def window(loops: int, after: int) -> int:
        # Work before the first mark and after the second must not count; work between them must.
        code = (f"import os; sum(range(200000)); os.getsid(0); sum(range({loops})); os.getsid(0); "
                f"sum(range({after}))")  # fmt: skip
        return callgrind.count_window([sys.executable, "-c", code], REPO, {}, tmp_path / f"{loops}-{after}", 120)

    small, large, large_then_more = window(10_000, 0), window(110_000, 0), window(110_000, 500_000)
    assert large - small > 100_000 * 10  # at least ten instructions a loop of `sum(range(...))`
    assert abs(large_then_more - large) < (large - small) / 10
