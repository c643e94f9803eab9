"""gpt-oss-safeguard behind the `Classifier` Protocol, on vLLM's in-process engine.

Importing this package imports neither vllm nor openai_harmony (nor torch): the config
loader validates `EngineSettings` on machines without them. `make_vllm_classifier` imports
the engine only when a vLLM classifier is actually built. Nothing outside this package
imports vllm or openai_harmony.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consumer.classify.engine.settings import EngineSettings

if TYPE_CHECKING:
    from consumer.classify.engine.vllm_engine import VllmClassifier

__all__ = ["EngineSettings", "EngineUnavailable", "make_vllm_classifier"]


class EngineUnavailable(RuntimeError):
    """vLLM (or openai_harmony) is not installed in this environment."""


def make_vllm_classifier(settings: EngineSettings) -> VllmClassifier:
    """A `VllmClassifier` for `settings`, not yet started (call `await classifier.start()`)."""
    try:
        from consumer.classify.engine.vllm_engine import VllmClassifier
    except ImportError as exc:
        raise EngineUnavailable(
            f"classifier kind 'vllm' needs vLLM and openai_harmony ({exc}); on a GPU install vllm, "
            "on a CPU follow requirements/engine-cpu.txt (see docs/engine.md)"
        ) from exc
    return VllmClassifier(settings)
