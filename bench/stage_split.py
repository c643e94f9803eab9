"""The per-stage split of a case's event-loop CPU: where the main thread's µs per event go.

`pipeline_bench --stages` has each of our cases sampled from outside by py-spy (`--nonblocking`:
the process is never stopped, so sampling costs it nothing; idle samples dropped, so a sample is
time on a CPU). Each main-thread sample goes to the stage of the innermost frame on its stack
that names one (`STAGES`, by function or module path); what no frame names is the loop itself
(asyncio, the pipeline's own batching and bookkeeping). Set-up and shutdown, around the measured
window, are not counted. Each stage's share of the counted samples, times the case's measured
`cpu_us_main`, is its µs per event; the poll thread's and librdkafka's come from the thread split
beside it (/proc). C functions have no frame of their own in a sample: `Producer.produce` counts
under its Python caller (`KafkaSink._produce`: produce), `orjson.dumps` under the output budget
(fit + encode output), delivery reports under `KafkaSink.serve`.

py-spy is not a dependency of the consumer: `pip install py-spy` (a standalone binary) wherever
the bench runs, or pass its path with `--py-spy`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

LOOP = "loop"
NOT_COUNTED = "-"  # set-up and shutdown, outside the measured window

# (stage, function names, module path fragments): the first rule a frame matches names its stage.
STAGES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # Pipeline.run's own steps are its start and shutdown: the records' work runs in callbacks and
    # tasks of their own, under the loop.
    (NOT_COUNTED, ("build_pipeline", "cpu_classifier", "read_verdicts", "Pipeline.run"), ()),
    ("produce", ("KafkaSink._send", "KafkaSink._produce"), ()),
    ("delivery reports + offsets", ("KafkaSink.serve",), ("consumer/kafka/offsets.py",)),
    ("decode", (), ("consumer/decode/", "consumer/events.py")),
    ("route + context", ("Conversations.observe_lazily",), ("consumer/policy/route.py",)),
    ("classify", (), ("consumer/classify/", "consumer/pipeline/classify_step.py")),
    ("fit + encode output", (), ("consumer/kafka/budget.py",)),
    ("metrics", (), ("consumer/pipeline/telemetry/metrics.py", "consumer/pipeline/telemetry/drift.py")),
    ("tracing", ("Telemetry.record_spans", "Telemetry._start"),
     ("consumer/pipeline/telemetry/tracing.py", "opentelemetry/")),
    ("build verdict", ("Pipeline._conclude",), ("consumer/pipeline/outputs.py", "consumer/pipeline/output_step.py",
                                                "consumer/review/", "consumer/pipeline/chat.py", "consumer/policy/")),
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?):\d+\)$")


def stage_of(function: str, path: str) -> str | None:
    for stage, functions, fragments in STAGES:
        if function in functions or any(fragment in path for fragment in fragments):
            return stage
    return None


def split(raw: str, thread: str = "MainThread") -> dict[str, int]:
    """Samples per stage of one thread, from py-spy's raw output (`--threads -f raw`)."""
    samples: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or len(frames) < 2 or not frames[0].endswith(f": {thread}"):
            continue
        stage = LOOP
        for frame in frames[1:]:
            match = _FRAME.match(frame)
            if match is None:
                continue
            named = stage_of(match["function"], match["path"])
            if named is not None:
                stage = named
                if named == NOT_COUNTED:
                    break
        samples[stage] = samples.get(stage, 0) + int(count)
    return samples


def stages_us(samples: dict[str, int], cpu_us_main: float) -> dict[str, float]:
    """µs per event per stage: each stage's share of the counted samples × `cpu_us_main`."""
    counted = {stage: n for stage, n in samples.items() if stage != NOT_COUNTED}
    total = sum(counted.values()) or 1
    return {stage: round(n / total * cpu_us_main, 2) for stage, n in sorted(counted.items(), key=lambda kv: -kv[1])}


class Sampler:
    """py-spy recording this process from outside until `stop`."""

    def __init__(self, py_spy: str, rate: int = 1000):
        self._out = Path(tempfile.mkstemp(prefix="stages-", suffix=".txt")[1])
        self._proc = subprocess.Popen(
            [py_spy, "record", "--nonblocking", "--threads", "-r", str(rate), "-f", "raw", "-o", str(self._out),
             "--pid", str(os.getpid())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> dict[str, int]:
        """Samples per stage of the main thread."""
        self._proc.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
        self._proc.wait(timeout=60)
        try:
            return split(self._out.read_text(encoding="utf-8"))
        finally:
            self._out.unlink(missing_ok=True)
