"""The committed JSON Schemas match the pydantic models they are exported from."""

from consumer.schemas import render_schemas
from tests.conftest import REPO


def test_committed_schemas_match_the_models():
    for filename, text in render_schemas().items():
        committed = REPO / "schemas" / filename
        assert committed.exists(), f"{filename} missing: run `safeguard-consumer schemas export`"
        assert committed.read_text() == text, f"{filename} drifted: run `safeguard-consumer schemas export`"


def test_dead_letter_schema_lists_every_error_type():
    import json

    from consumer.events import ErrorType

    schema = json.loads(render_schemas()["dead-letter.schema.json"])
    assert set(schema["$defs"]["ErrorType"]["enum"]) == {e.value for e in ErrorType}
