"""gpt-oss-safeguard behind the `Classifier` Protocol: in process on vLLM, or on a served fleet.

`classifier.reasoner` (read once, `ClassifierSettings.reasoner_place`) picks where it runs:
`in_process` (vLLM's AsyncLLM in the consumer, a local GPU) or `remote` (OpenAI-compatible
endpoints, remote/); the `engine:` section holds that engine's settings. Importing this
package imports neither vllm nor openai_harmony (nor torch, nor httpx): the config loader
validates the settings on machines without them. The `make_*` functions import an engine
only when it is actually built. Nothing outside this package imports vllm or openai_harmony.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from consumer.classify.engine.remote.settings import Priority, RemoteSettings
from consumer.classify.engine.settings import EngineSettings
from consumer.classify.exceptions import EngineUnavailable
from consumer.config import ReasonerPlace

if TYPE_CHECKING:
    from consumer.classify.engine.remote.classifier import RemoteClassifier
    from consumer.classify.engine.vllm_engine import VllmClassifier

__all__ = [
    "EngineSettings",
    "EngineUnavailable",
    "RemoteSettings",
    "engine_settings",
    "make_engine_classifier",
    "make_remote_classifier",
    "make_vllm_classifier",
]


def make_vllm_classifier(settings: EngineSettings) -> VllmClassifier:
    """A `VllmClassifier` for `settings`, not yet started (call `await classifier.start()`)."""
    try:
        from consumer.classify.engine.vllm_engine import VllmClassifier
    except ImportError as exc:
        raise EngineUnavailable(
            f"classifier.reasoner in_process needs vLLM and openai_harmony ({exc}); on a GPU install vllm, "
            "on a CPU follow requirements/engine-cpu.txt (see docs/engine.md)"
        ) from exc
    return VllmClassifier(settings)


def engine_settings(section: dict[str, Any], place: ReasonerPlace) -> EngineSettings | RemoteSettings:
    """The `engine:` section validated for the engine at `place` (raises pydantic's ValidationError;
    ValueError naming the key when an endpoint's key variable is not set)."""
    if place == "remote":
        remote = RemoteSettings(**section)
        unset = remote.unset_key_variables(os.environ)
        if unset:
            raise ValueError("; ".join(unset))
        return remote
    return EngineSettings(**section)


def make_remote_classifier(settings: RemoteSettings, priority: Priority | None = None) -> RemoteClassifier:
    """A `RemoteClassifier` for `settings`, not yet started; `priority` overrides `settings.priority`."""
    try:
        from consumer.classify.engine.remote.classifier import RemoteClassifier
    except ImportError as exc:
        raise EngineUnavailable(f"classifier.reasoner remote needs httpx ({exc}): pip install httpx") from exc
    if priority is not None:
        settings = settings.model_copy(update={"priority": priority})
    return RemoteClassifier(settings)


def make_engine_classifier(
    section: dict[str, Any], place: ReasonerPlace, priority: Priority | None = None
) -> VllmClassifier | RemoteClassifier:
    """The reasoner at `place` with the `engine:` section's settings. `priority` applies to remote
    fleets, which live traffic and replays share (the in-process engine serves one consumer)."""
    settings = engine_settings(section, place)
    if isinstance(settings, RemoteSettings):
        return make_remote_classifier(settings, priority)
    return make_vllm_classifier(settings)
