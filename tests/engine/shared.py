"""Running a pipeline on the session's shared engine (whose AsyncLLM belongs to one loop)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from consumer.classify import Capacity, Classification, ClassifyRequest
from consumer.pipeline.pipeline import Pipeline, RunResult
from tests.kafka_helpers import Collector, decoded


class SharedEngine:
    """The session's started VllmClassifier, lent to one pipeline: it must not stop the engine."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.name = engine.name

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return self._engine.capacity()

    async def classify(self, request: ClassifyRequest) -> Classification:
        return await self._engine.classify(request)

    async def close(self) -> None:
        return None


def run_until_outputs(
    run: Callable[..., Any], pipeline: Pipeline, bootstrap: str, topics: list[str], count: int
) -> tuple[RunResult, list[dict]]:
    """Run `pipeline` on the engine's loop until `count` outputs are in `topics`; returns them decoded."""
    outputs = Collector(bootstrap, *topics)

    def stop_when_done() -> None:
        outputs.until(count, timeout=240)
        pipeline.stop()

    watcher = threading.Thread(target=stop_when_done, daemon=True)
    watcher.start()
    try:
        result = run(pipeline.run(install_signal_handlers=False))
        watcher.join(10)
        return result, decoded(outputs.collect(wait=1.0))
    finally:
        outputs.close()
