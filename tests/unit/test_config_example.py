"""deploy/config.example.yaml lists every key of the settings models, with its default and a
comment; the few keys set to an example value say so."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel

from consumer.config import Settings, load_settings
from tests.conftest import REPO

EXAMPLE = REPO / "deploy" / "config.example.yaml"
# Keys the example sets to something other than the default, to show the shape.
EXAMPLE_VALUES = {"kafka.input_topics", "policies.directory", "policies.default", "policies.routes"}


def model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default, for every key of the settings (sections recursed into)."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(model_keys(annotation, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field.get_default(call_default_factory=True)
    return keys


def example_lines() -> dict[str, str]:
    """Dotted key -> its line, for the mapping keys of the example (two spaces a level)."""
    lines: dict[str, str] = {}
    path: list[str] = []
    for line in EXAMPLE.read_text().splitlines():
        match = re.match(r"^((?:  )*)([a-z_]+):", line)
        if not match or line.lstrip().startswith("#"):
            continue
        depth, key = len(match.group(1)) // 2, match.group(2)
        if depth > len(path):
            continue  # inside a value (a route's keys), not a settings key
        path = [*path[:depth], key]
        lines[".".join(path)] = line
    return lines


def test_the_example_lists_every_key_with_a_comment():
    keys, lines = model_keys(Settings), example_lines()
    missing = sorted(set(keys) - set(lines))
    assert not missing, f"deploy/config.example.yaml misses {len(missing)} keys: {', '.join(missing)}"
    sections = {key.rsplit(".", n)[0] for key in keys for n in range(1, key.count(".") + 1)}
    unknown = sorted(k for k in lines if k not in keys and k not in sections and k.split(".")[0] != "engine")
    assert not unknown, f"keys in the example that the settings do not have: {unknown}"
    uncommented = sorted(k for k in keys if "#" not in lines[k])
    assert not uncommented, f"keys without a comment: {uncommented}"


def test_the_example_shows_the_defaults():
    data = yaml.safe_load(EXAMPLE.read_text())
    settings = load_settings(EXAMPLE)
    for key, default in model_keys(Settings).items():
        if key in EXAMPLE_VALUES:
            assert "example" in example_lines()[key], f"{key}: an example value must say so"
            continue
        written = data
        for part in key.split("."):
            written = written[part]
        assert written == default or str(written) == str(default), f"{key}: {written!r} is not the default {default!r}"
    assert settings.classifier.kind == "keyword"


def test_the_classifier_kind_comment_names_every_kind():
    kinds = Settings.model_fields["classifier"].annotation.model_fields["kind"].annotation.__args__
    line = example_lines()["classifier.kind"]
    assert all(kind in line for kind in kinds), line
