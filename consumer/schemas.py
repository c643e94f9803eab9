"""JSON Schemas of the event contracts, generated from the pydantic models in `consumer.events`."""

from __future__ import annotations

import json
from pathlib import Path

from consumer.events import EXPORTED_MODELS


def render_schemas() -> dict[str, str]:
    """File name -> schema text, exactly as `export_schemas` writes it."""
    rendered = {}
    for name, model in EXPORTED_MODELS.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **model.model_json_schema()}
        rendered[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render_schemas().items():
        path = directory / filename
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
