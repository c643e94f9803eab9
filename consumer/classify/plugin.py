"""A user's own classifier, loaded from `classifier.factory: module:callable`."""

from __future__ import annotations

import importlib
from typing import Any

from consumer.classify import Classifier


def load_plugin(factory: str, options: dict[str, Any]) -> Classifier:
    """Build a classifier from `module:callable`, called with the configured options."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(f"classifier.factory must look like 'module:callable', not {factory!r}")
    target = getattr(importlib.import_module(module_name), attr)
    classifier = target(**options)
    if not isinstance(classifier, Classifier):
        raise TypeError(f"{factory} did not return a Classifier (needs name, start, capacity, classify, close)")
    return classifier
