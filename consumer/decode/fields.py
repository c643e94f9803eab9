"""From a decoded document (a dict from JSON, Avro, Protobuf or JSON Schema) to a ContentEvent.

Every format ends here, so a field mapping reads a foreign envelope the same way whatever the
bytes were: `decode.field_mapping` names, for each ContentEvent field, a dotted path
(`data.data.text`) or a JSON pointer (`/data/data/text`, RFC 6901) in the document, e.g. an
Osprey-style action `{"send_time": .., "data": {"action_id": .., "data": {"text": ..}}}` with
`{event_id: data.action_id, content: data.data.text, created_at: send_time}`. A missing
`event_id` becomes the record's coordinates.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from consumer.decode import DecodeError, InputRecord, coordinates
from consumer.events import ContentEvent, ErrorType

_MISSING = object()


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


class FieldMapping:
    """The configured mapping (ContentEvent field -> path); empty: the document is the event."""

    def __init__(self, mapping: dict[str, str] | None = None):
        self._paths = {target: FieldPath(path) for target, path in (mapping or {}).items()}

    def __bool__(self) -> bool:
        return bool(self._paths)

    def to_event(self, doc: Any, record: InputRecord, what: str = "a JSON object") -> ContentEvent:
        """The event `doc` holds; DecodeError(schema_violation) naming the fields when it holds none."""
        if self._paths:
            doc = self._apply(doc)
        if not isinstance(doc, dict):
            raise DecodeError(ErrorType.SCHEMA_VIOLATION, f"expected {what}, got {type(doc).__name__}")
        if doc.get("event_id") in (None, ""):
            doc["event_id"] = coordinates(record)
        try:
            return ContentEvent.model_validate(doc)
        except ValidationError as exc:
            raise DecodeError(ErrorType.SCHEMA_VIOLATION, describe(exc)) from None

    def _apply(self, doc: Any) -> dict[str, Any]:
        mapped: dict[str, Any] = {}
        for target, path in self._paths.items():
            found = path.get(doc)
            if found is not _MISSING:
                mapped[target] = found
        return mapped


def describe(exc: ValidationError) -> str:
    # Field names and problems only: the input values are user content.
    problems = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        field = ".".join(str(p) for p in error["loc"]) or "(root)"
        problems.append(f"{field}: {error['msg']}")
    return "; ".join(problems)
