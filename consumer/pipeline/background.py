"""A Pipeline on a thread of its own, for the demo and in-process tests."""

from __future__ import annotations

import asyncio
import threading

from consumer.pipeline.pipeline import Pipeline, RunResult


class BackgroundPipeline:
    """Runs a Pipeline on its own thread and asyncio loop (the demo, in-process tests)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.result: RunResult | None = None
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    def _run(self) -> None:
        self.result = asyncio.run(self.pipeline.run(install_signal_handlers=False))

    def start(self) -> BackgroundPipeline:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> RunResult:
        self.pipeline.stop()
        self._thread.join(timeout)
        if self._thread.is_alive() or self.result is None:
            raise RuntimeError("the pipeline did not stop in time")
        return self.result

    def __enter__(self) -> BackgroundPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()
