"""Decode and validate: input record bytes -> ContentEvent, or a `DecodeError` with its error type.

Checks run cheapest first: size, then JSON and the schema in one pass (pydantic's
`model_validate_json`, the common case). Only a record that fails it is looked at again,
step by step, to tell why: JSON (pydantic's parser, so both passes agree on what JSON is),
encoding (bad UTF-8 or bad JSON), a missing `event_id` (filled in from the record's
coordinates), the schema. A configured field mapping (which always takes the step-by-step
way) reads foreign envelopes, e.g. an Osprey-style action:
`{"send_time": .., "data": {"action_id": .., "data": {"text": ..}}}` with
`{event_id: data.action_id, content: data.data.text, created_at: send_time}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from consumer.events import ContentEvent, ErrorType

_MISSING = object()


class DecodeError(Exception):
    """An input record that cannot become a ContentEvent."""

    def __init__(self, error_type: ErrorType, message: str):
        super().__init__(message)
        self.error_type = error_type


class FieldPath:
    """A dotted path (`data.data.text`) or a JSON pointer (`/data/data/text`, RFC 6901)."""

    def __init__(self, spec: str):
        if spec.startswith("/"):
            parts = [p.replace("~1", "/").replace("~0", "~") for p in spec[1:].split("/")]
        else:
            parts = spec.split(".")
            if any(p == "" for p in parts):
                raise ValueError(f"invalid field path {spec!r}")
        self.spec = spec
        self.parts = parts

    def get(self, doc: Any) -> Any:
        node = doc
        for part in self.parts:
            if isinstance(node, dict):
                node = node.get(part, _MISSING)
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
            if node is _MISSING:
                return _MISSING
        return node


class Decoder:
    """Turns one record value into a ContentEvent; raises DecodeError, never anything else."""

    def __init__(self, max_payload_bytes: int, field_mapping: dict[str, str] | None = None):
        self.max_payload_bytes = max_payload_bytes
        self._mapping = {target: FieldPath(path) for target, path in (field_mapping or {}).items()}

    def decode(self, value: bytes | None, fallback_event_id: str) -> ContentEvent:
        if value is None:
            raise DecodeError(ErrorType.SCHEMA_VIOLATION, "record has no value (tombstone)")
        if len(value) > self.max_payload_bytes:
            raise DecodeError(
                ErrorType.PAYLOAD_TOO_LARGE,
                f"value is {len(value)} bytes; pipeline.max_payload_bytes is {self.max_payload_bytes}",
            )
        if not self._mapping:
            try:
                return ContentEvent.model_validate_json(value)
            except ValidationError:
                pass  # told apart below
        try:
            doc = from_json(value)
        except ValueError as exc:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as uexc:
                raise DecodeError(
                    ErrorType.INVALID_ENCODING, f"value is not UTF-8: {uexc.reason} at byte {uexc.start}"
                ) from None
            raise DecodeError(ErrorType.INVALID_JSON, f"value is not JSON: {exc}") from None
        if self._mapping:
            doc = self._apply_mapping(doc)
        if not isinstance(doc, dict):
            raise DecodeError(ErrorType.SCHEMA_VIOLATION, f"expected a JSON object, got {type(doc).__name__}")
        if doc.get("event_id") in (None, ""):
            doc["event_id"] = fallback_event_id
        try:
            return ContentEvent.model_validate(doc)
        except ValidationError as exc:
            raise DecodeError(ErrorType.SCHEMA_VIOLATION, _describe(exc)) from None

    def _apply_mapping(self, doc: Any) -> dict[str, Any]:
        mapped: dict[str, Any] = {}
        for target, path in self._mapping.items():
            found = path.get(doc)
            if found is not _MISSING:
                mapped[target] = found
        return mapped


def _describe(exc: ValidationError) -> str:
    # Field names and problems only: the input values are user content.
    problems = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        field = ".".join(str(p) for p in error["loc"]) or "(root)"
        problems.append(f"{field}: {error['msg']}")
    return "; ".join(problems)
