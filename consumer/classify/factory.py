"""The classifier the configuration's `classifier` section names."""

from __future__ import annotations

from pydantic import ValidationError

from consumer.classify import Classifier
from consumer.classify.keyword import KeywordClassifier
from consumer.classify.plugin import load_plugin
from consumer.config import ConfigError, Settings, format_validation_error
from consumer.policy import PolicyStore


def build_classifier(settings: Settings, policies: PolicyStore, priority: str | None = None) -> Classifier:
    """The classifier the `classifier` section names; raises ConfigError naming the key at fault.

    `priority` (live or low) overrides `engine.priority` of a remote reasoner; replays pass low."""
    c = settings.classifier
    try:
        if c.kind == "keyword":
            return KeywordClassifier(**c.options)
        if c.kind == "plugin":
            assert c.factory is not None
            return load_plugin(c.factory, c.options)
        place = c.reasoner_place
        reasoner = None
        if place is not None:
            # gpt-oss-safeguard in process or on a served fleet: where, said once in classifier.reasoner.
            from consumer.classify.engine import make_engine_classifier

            reasoner = make_engine_classifier(settings.engine, place, priority)  # type: ignore[arg-type]
        if c.kind == "reasoner":
            assert reasoner is not None
            return reasoner
        from consumer.classify.cascade import make_cascade

        return make_cascade(settings.cascade, reasoner, policies)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, None).replace("\n  ", "\n  engine.")) from None
    except (ImportError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"classifier ({c.kind}): {exc}") from None

