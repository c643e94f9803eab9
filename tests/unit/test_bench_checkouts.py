"""bench/checkouts.py: a --baseline checkout's compiled part is its own, built in place."""

import shutil
from pathlib import Path

import pytest

from bench.checkouts import NGRAMS, baseline_problem, compiled_in_place, compiled_ngrams
from consumer.classify.cascade import hashing
from tests.conftest import REPO


def checkout(tmp_path: Path, source: str) -> Path:
    """A checkout holding setup.py and `source` as its _ngrams.c, as a fresh worktree has them."""
    (tmp_path / NGRAMS).parent.mkdir(parents=True)
    (tmp_path / NGRAMS).write_text(source)
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    return tmp_path


def test_a_baseline_gets_its_own_build_loaded_by_path_or_the_reason_it_has_none(tmp_path):
    if hashing._ngrams is None:
        pytest.skip("no compiled _ngrams here: this machine has no C compiler")
    source = (REPO / NGRAMS).read_text()
    # Told apart from this checkout's build by a changed answer: no text is normalised there.
    start = "    Text given = {PyUnicode_KIND(text)"
    marked = source.replace(start, "    Py_RETURN_NONE;\n" + start)
    assert marked != source
    other = compiled_ngrams(checkout(tmp_path / "other", marked))
    assert other is not None and other is not hashing._ngrams
    assert other.normalised("Free  NITRO") is None and hashing._ngrams.normalised("Free  NITRO") == "free nitro"

    assert compiled_in_place(tmp_path) is None and compiled_ngrams(tmp_path) is None  # no _ngrams.c: numpy
    problem = compiled_in_place(checkout(tmp_path / "broken", "this is not C"))
    assert problem is not None and "could not build" in problem


def test_a_baseline_must_be_a_checkout_of_this_project_with_its_compiled_part_built(tmp_path):
    assert baseline_problem(tmp_path) == "not a safeguard-consumer checkout"
    (tmp_path / "consumer" / "pipeline").mkdir(parents=True)
    assert baseline_problem(tmp_path) is None  # no _ngrams.c to build: a checkout from before it
    broken = checkout(tmp_path / "broken", "this is not C")
    (broken / "consumer" / "pipeline").mkdir(parents=True)
    problem = baseline_problem(broken)
    assert problem is not None and "could not build" in problem
