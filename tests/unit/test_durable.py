"""A file replaced whole or not at all."""

from __future__ import annotations

import pytest

from consumer.durable import replacing


def test_the_new_content_replaces_the_file_with_no_temporary_left(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with replacing(path) as out:
        out.write(b"new")
        assert path.read_bytes() == b"old"  # nothing visible before the block ends
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(path) as out:
            out.write(b"half")
            raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
