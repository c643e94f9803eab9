"""The lexical stage decides only where its calibrated confidence reaches the target precision.

The held-out sets in tests/data/cascade-*-heldout.jsonl were written for these tests, apart
from the policies' examples files the stage trains on (same hand, so the figures are
optimistic for real traffic; docs/cascade.md says so).
"""

import asyncio
import math

import pytest

pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")

from consumer.classify.cascade.examples import section_examples, training_set  # noqa: E402
from consumer.classify.cascade.lexical import LexicalFeatures  # noqa: E402
from consumer.classify.cascade.stage import LearnedStage, StageRules  # noqa: E402
from consumer.policy import load_policy  # noqa: E402
from consumer.policy.examples import load_examples  # noqa: E402
from tests.conftest import REPO  # noqa: E402

RULES = StageRules(min_examples=40, min_per_class=10, calibration="auto", refit_every=25, max_learned=5000)
TARGET = 0.95


def binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


async def trained(policy_name: str, texts=None, labels=None, rules=RULES) -> LearnedStage:
    policy = load_policy(REPO / "policies" / f"{policy_name}.md")
    data = training_set(policy)
    stage = LearnedStage(LexicalFeatures(), rules, data.version)
    await stage.train(data.texts if texts is None else texts, data.labels if labels is None else labels)
    return stage


def test_examples_come_from_the_policy_section_and_the_file_beside_it():
    policy = load_policy(REPO / "policies" / "spam-scams.md")
    section = section_examples(policy.text)
    assert len(section) == 5
    # the content keeps its own arrow; the label is after the last one
    assert (section[0].content, section[0].label) == ("FREE NITRO for everyone who joins -> discord-gift.xyz/claim", 1)
    data = training_set(policy)
    file_rows = len((REPO / "policies" / "spam-scams.examples.jsonl").read_text().splitlines())
    assert len(data.texts) == 5 + file_rows and 50 <= file_rows <= 100


@pytest.mark.parametrize(
    ("policy_name", "heldout"),
    [("chat-harassment", "cascade-harassment-heldout"), ("spam-scams", "cascade-spam-heldout")],
)
def test_a_trained_stage_decides_only_above_its_target_precision(policy_name, heldout, record_property):
    async def scenario():
        stage = await trained(policy_name)
        examples = load_examples(REPO / "tests" / "data" / f"{heldout}.jsonl")
        return stage, [(await stage.decide(e.content, TARGET), e.label) for e in examples]

    stage, outcomes = asyncio.run(scenario())
    assert stage.calibrated
    decided = [(d.violation == label) for d, label in outcomes if d.decided]
    undecided = [(d.violation == label) for d, label in outcomes if not d.decided]
    correct, n = sum(decided), len(decided)
    precision = correct / n
    escalation_rate = len(undecided) / len(outcomes)
    record_property("decided", n)
    record_property("precision_of_decided", round(precision, 3))
    record_property("escalation_rate", round(escalation_rate, 3))
    print(f"{policy_name}: decided {n}/{len(outcomes)}, precision of decided {precision:.3f}, "
          f"escalation rate {escalation_rate:.3f}, accuracy of the escalated {sum(undecided) / len(undecided):.3f}")
    assert n >= 10  # it does decide a real share
    # Not significantly below the target: if the true precision were 0.95, seeing this few
    # correct answers (or fewer) would happen more than 5% of the time.
    assert binomial_cdf(correct, n, TARGET) > 0.05
    # and the confident share is more accurate than what it escalates
    assert precision > sum(undecided) / len(undecided)
    for decision, _ in outcomes:
        assert decision.decided == (decision.confidence >= TARGET)


def test_a_stage_with_too_few_examples_is_not_calibrated_and_decides_nothing():
    async def scenario():
        only_the_section = section_examples(load_policy(REPO / "policies" / "spam-scams.md").text)
        texts, labels = [e.content for e in only_the_section], [e.label for e in only_the_section]
        stage = await trained("spam-scams", texts, labels)
        return stage, await stage.decide("FREE NITRO for everyone who joins -> discord-gift.xyz/claim", 0.6)

    stage, decision = asyncio.run(scenario())
    assert stage.examples == 5 and not stage.calibrated
    assert decision is None


def test_calibrated_confidence_is_capped_by_the_number_of_examples():
    # 10 examples of each label, the least that calibrates here: a violation can be called
    # with at most 11/12 = 0.917, so a 0.95 target is never reached, however clear the text.
    async def scenario():
        data = training_set(load_policy(REPO / "policies" / "spam-scams.md"))
        pos = [t for t, y in zip(data.texts, data.labels) if y][:10]
        neg = [t for t, y in zip(data.texts, data.labels) if not y][:10]
        rules = StageRules(min_examples=20, min_per_class=10, calibration="auto", refit_every=25, max_learned=5000)
        stage = await trained("spam-scams", pos + neg, [1] * 10 + [0] * 10, rules)
        return stage, [await stage.decide(t, TARGET) for t in pos + neg]

    stage, decisions = asyncio.run(scenario())
    assert stage.calibrated
    assert max(d.confidence for d in decisions if d.violation) <= 11 / 12 + 1e-9
    assert not any(d.decided for d in decisions)


@pytest.mark.parametrize("n_features", [1 << 10, 1])  # small: collisions happen, and must add up the same way
@pytest.mark.parametrize("way", ["compiled", "row-by-row", "together"])
def test_the_lexical_stage_counts_the_ngrams_scikit_learn_makes_hashed_as_documented(n_features, way, monkeypatch):
    """Every n-gram of scikit-learn's analyzers (word 1-2-grams, char_wb 2-5-grams), hashed one
    by one as `consumer.classify.cascade.hashing` documents, gives the matrix the compiled code
    builds text by text, and the numpy code (its fallback) for the whole batch at once, whichever
    way it sorts the n-grams. With one column a block, every row ends on the column the next
    begins with, if that has no words ("!"): still two rows."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import HashingVectorizer

    from consumer.classify.cascade import hashing
    from consumer.classify.cascade.hashing import CHUNK, ngram_counts

    if way == "compiled":
        if hashing._ngrams is None:
            pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    else:
        monkeypatch.setattr(hashing, "_ngrams", None)
        monkeypatch.setattr(hashing, "GRID_MAX_WASTE", 10**9 if way == "row-by-row" else 0)
    words = HashingVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b").build_analyzer()
    chars = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5)).build_analyzer()
    mask = (1 << 64) - 1

    def column(gram: str) -> int:
        h = 0
        for c in gram:  # the polynomial hash, then MurmurHash3's 64-bit finaliser
            h = (h * 0x100000001B3 + ord(c)) & mask
        for shift, factor in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53), (33, None)):
            h ^= h >> shift
            h = (h * factor) & mask if factor else h
        return h & (n_features - 1)

    def expected(text: str) -> np.ndarray:
        row = np.zeros(2 * n_features)
        for offset, analyzer in ((0, words), (n_features, chars)):
            block = np.zeros(n_features)
            for gram in analyzer(text):
                block[column(gram)] += 1
            norm = np.linalg.norm(block)
            row[offset : offset + n_features] = block / norm if norm else block
        return row

    texts = [e.content for e in load_examples(REPO / "policies" / "spam-scams.examples.jsonl")]
    texts += ["", " ", "a", "ab", "x  y\tz\n", "ÀÉ İstanbul ǅ", "🎉🎉 ok", "fr33 n1tro!!", "w" * 40, "a\x00b c\x00",
              "snake_case über-cool ½ ٣٤ x²", "lol lol lol lol", "\ud800 lone", "end.", "UP\x1cPer\x1f\x0bCase\r\n",
              "!", "!", "?!", "..", "..", "a", "a long one " * 200]  # fmt: skip
    matrix = ngram_counts(texts, n_features)
    assert matrix.has_canonical_format  # each row's columns in order, each once: what scipy's products expect
    for text, row in zip(texts, matrix.toarray()):
        assert np.allclose(row, expected(text)), repr(text)
    many = texts * 20  # more than one chunk, rows of every length side by side
    assert len(many) > CHUNK and (ngram_counts(many, n_features) != sp.vstack([matrix] * 20)).nnz == 0
    assert ngram_counts([], n_features).shape == (0, 2 * n_features)


def test_the_compiled_counts_are_the_numpy_codes_on_any_text():
    """`_ngrams.c` against its fallback on fuzzed text: ASCII as it comes (the C code pads it
    itself) and every other plane, white space of every kind, lone surrogates."""
    import numpy as np
    import scipy.sparse as sp
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from consumer.classify.cascade import hashing

    if hashing._ngrams is None:
        pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    texts = st.one_of(
        st.text(st.characters(max_codepoint=127), max_size=60),
        st.text(st.sampled_from(" \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u2028\u3000aAzZ09_!-"), max_size=40),
        st.text(st.characters(blacklist_categories=()), max_size=40),  # surrogates too
    )

    @settings(max_examples=300, deadline=None)
    @given(st.lists(texts, max_size=12), st.sampled_from([1, 1 << 4, 1 << 17]))
    def same(batch: list[str], n_features: int) -> None:
        compiled, numpy_ = hashing.ngram_counts(batch, n_features), hashing.numpy_ngram_counts(batch, n_features)
        assert compiled.shape == numpy_.shape and compiled.has_canonical_format
        assert (compiled.indptr == numpy_.indptr).all() and (compiled.indices == numpy_.indices).all()
        assert (compiled.data == numpy_.data).all()  # bit for bit: the same sums and square roots
        assert compiled.indptr.dtype == np.int32  # as made, not copied by scipy's constructor
        # Made without scipy's constructor (`hashing._csr_as_made`): what it would make (compared
        # fresh, before a property caches its flags on either), and valid.
        fresh = hashing.ngram_counts(batch, n_features)
        checked = sp.csr_matrix((fresh.data, fresh.indices, fresh.indptr), shape=fresh.shape)
        assert vars(fresh).keys() == vars(checked).keys() and fresh.maxprint == checked.maxprint
        assert (fresh != checked).nnz == 0 and fresh.dtype == checked.dtype
        fresh.check_format(full_check=True)  # raises where scipy would refuse the arrays

    same()


def test_texts_past_int32_row_pointers_are_counted_in_parts(monkeypatch):
    """The compiled counts' row pointers are int32: a batch that could need more entries than
    that counts is made in halves (here with a limit of a few hundred, for want of 2**31
    entries), the same matrix as at once."""
    import numpy as np

    from consumer.classify.cascade import hashing

    if hashing._ngrams is None:
        pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    texts = ["gg wp", "free nitro at example.com", "ÀÉ İstanbul", "", "lol " * 30, "x"] * 3
    whole = hashing.ngram_counts(texts, 1 << 10)
    monkeypatch.setattr(hashing, "INT32_ROOM", 300)
    parts = hashing.ngram_counts(texts, 1 << 10)
    assert (parts != whole).nnz == 0 and parts.shape == whole.shape and parts.has_canonical_format
    with pytest.raises(ValueError, match="int32 row pointers"):  # and the C code will not write past them
        hashing._ngrams.counts(["a" * 10], 1 << 10, np.empty(10, np.int32), np.empty(10), np.empty(2, np.int32))


def test_the_compiled_product_is_numpys_on_any_rows_and_head(monkeypatch):
    """`_ngrams.linear_scores` (a head's non-zero columns as a bitmap and their ranks) against the
    dense product it replaces: the same float64 scores, for heads with no columns, a few, every
    one, columns at the bitmap's word edges; rows from the n-gram counts and empty ones. Both
    loops: with the popcnt instruction where this CPU has it, and the portable one. A malformed
    matrix is refused, not read past."""
    import numpy as np
    import scipy.sparse as sp
    from hypothesis import given, settings
    from hypothesis import strategies as st

    import consumer.classify.cascade.stage as stage_module
    from consumer.classify.cascade import hashing

    if stage_module._ngrams is None:
        pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    size = 2 * (1 << 10)  # 32 words of the bitmap
    edges = [0, 1, 62, 63, 64, 65, 127, 128, 511, 512, 513, 1023, 1024, 1535, 1536, size - 1]

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.text(max_size=40), max_size=8),
        st.sampled_from([0.0, 0.002, 0.05, 0.5, 1.0]),  # the share of columns the head has
        st.booleans(),  # and the words' edges too
        st.integers(0, 2**32 - 1),
    )
    def same(texts: list[str], density: float, edged: bool, seed: int) -> None:
        rng = np.random.default_rng(seed)
        coef = np.where(rng.random(size) < density, rng.normal(size=size), 0.0)
        if edged:
            coef[edges] = rng.normal(size=len(edges))
        weights = stage_module._Weights.of(coef)
        rows = hashing.ngram_counts(texts, size // 2)
        compiled = weights.scores(rows)
        portable = np.empty(len(texts))  # the loop for CPUs without the popcnt instruction
        stage_module._ngrams.linear_scores(rows.indptr, rows.indices, rows.data, weights.present,
                                           weights.before, weights.padded, portable, True)  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(stage_module, "_ngrams", None)
            dense = weights.scores(rows)
        assert compiled.shape == dense.shape == (len(texts),)
        assert (compiled == dense).all() and (portable == dense).all()  # bit for bit: the same terms, in order
        wide = rows.copy()  # int64 index arrays, as scipy keeps a matrix past 2**31 entries: numpy's product
        wide.indptr, wide.indices = wide.indptr.astype(np.int64), wide.indices.astype(np.int64)
        assert (weights.scores(wide) == dense).all()

    same()
    weights = stage_module._Weights.of(np.ones(size))
    rows = hashing.ngram_counts(["gg wp"], size // 2)
    wider = sp.csr_matrix((rows.data, rows.indices + size, rows.indptr), shape=(1, 2 * size))
    with pytest.raises(ValueError, match="outside the head's columns"):
        stage_module._ngrams.linear_scores(wider.indptr, wider.indices, wider.data,
                                           weights.present, weights.before, weights.padded, np.empty(1))  # fmt: skip
    with pytest.raises(ValueError, match="row pointers"):
        stage_module._ngrams.linear_scores(np.array([0, 10**6], dtype=np.int32), rows.indices, rows.data,
                                           weights.present, weights.before, weights.padded, np.empty(1))  # fmt: skip


def test_scores_from_texts_are_the_products_of_their_rows():
    """`_ngrams.text_scores` (a head's scores of texts, no rows made: each n-gram's weight summed
    as it is read, each block over its norm from a table of the columns seen) against the
    compiled product of the n-gram counts' rows: the same scores but for the order of the sums
    (within 1e-12 of the score's scale), on any text (every plane and kind of string, words
    repeated past the table's first probe, none at all) and heads with no columns, a few, every
    one. Both loops, with and without the popcnt instruction, give the same float64 bits. A head
    narrower than the n-grams' columns and a text that is not str are refused."""
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from consumer.classify.cascade import hashing
    from consumer.classify.cascade.stage import _Weights

    if hashing._ngrams is None:
        pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    n_features = 1 << 10
    words = st.sampled_from(["gg", "GG", "free", "nitro", "ünï", "東京", "🙂", "a", "x_1"])

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(st.text(max_size=60), st.lists(words, max_size=80).map(" ".join)), max_size=8
        ),
        st.sampled_from([0.0, 0.002, 0.05, 0.5, 1.0]),  # the share of columns the head has
        st.integers(0, 2**32 - 1),
    )
    def same(texts: list[str], density: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        coef = np.where(rng.random(2 * n_features) < density, rng.normal(size=2 * n_features), 0.0)
        weights = _Weights.of(coef)
        rows = weights.scores(hashing.ngram_counts(texts, n_features))
        found = hashing.ngram_scores(texts, n_features, weights.present, weights.before, weights.padded)
        assert found is not None and found.shape == (len(texts),)
        assert np.allclose(found, rows, rtol=1e-12, atol=1e-12 * (np.abs(coef).max(initial=0.0) + 1))
        portable = np.empty(len(texts))
        hashing._ngrams.text_scores(hashing._lowered(texts), n_features, weights.present, weights.before,
                                    weights.padded, portable, True)  # fmt: skip
        assert (portable == found).all()

    same()
    narrow = _Weights.of(np.ones(n_features))  # the word block's columns only
    with pytest.raises(ValueError, match="outside the head's columns"):
        hashing.ngram_scores(["gg wp"], n_features, narrow.present, narrow.before, narrow.padded)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        hashing._ngrams.text_scores(["gg", 1], n_features, narrow.present, narrow.before, narrow.padded, np.empty(2))


def test_one_long_text_among_short_ones_is_not_padded_for(monkeypatch):
    """A forum post among chat lines: sorted with the others' n-grams, not in a matrix padded
    to its length (200 rows of its 30,000 n-grams); short texts alone are sorted row by row."""
    from consumer.classify.cascade import hashing

    monkeypatch.setattr(hashing, "_ngrams", None)  # the numpy code's choice; the compiled code sorts each text alone
    taken = []
    for name in ("_sorted_row_by_row", "_sorted_together"):
        way = getattr(hashing, name)
        monkeypatch.setattr(hashing, name, lambda *args, way=way, name=name: taken.append(name) or way(*args))
    short = ["gg, that was close lol"] * 199
    hashing.ngram_counts(short, 1 << 10)
    hashing.ngram_counts(short + ["word " * 6_000], 1 << 10)
    assert taken == ["_sorted_row_by_row", "_sorted_together"]


def test_a_calibrator_maps_scores_as_its_formula_says_in_place_or_not():
    """`Calibrator` clips in place (np.maximum, np.minimum) where it called np.clip: the same
    probabilities bit for bit as the plain formula, for both methods, scores of every size and
    infinities, and the scores handed in are left as they were."""
    import numpy as np

    from consumer.classify.cascade.calibrate import Calibrator

    rng = np.random.default_rng(7)
    scores = np.concatenate([rng.normal(size=200) * 8, [np.inf, -np.inf, 1e300, -1e300, 0.0, 600.0, -600.0]])
    given = scores.copy()
    low, high = 0.02, 0.97
    a, b = -1.7, 0.3
    sigmoid = Calibrator("sigmoid", (low, high), np.array([a, b]))
    assert (sigmoid(scores) == np.clip(1.0 / (1.0 + np.exp(np.clip(a * scores + b, -500, 500))), low, high)).all()
    thresholds = np.array([[-3.0, -1.0, 0.0, 1.0, 3.0], [0.0, 0.2, 0.5, 0.8, 1.0]])
    isotonic = Calibrator("isotonic", (low, high), thresholds)
    assert (isotonic(scores) == np.clip(np.interp(scores, thresholds[0], thresholds[1]), low, high)).all()
    assert (scores == given).all()


def test_ascii_texts_of_one_cache_digest_have_one_lexical_score():
    """What the score memo rests on (`cascade._memo_digests`): an ASCII text's n-grams are read
    from its words lower-cased and joined by single spaces, the form its cache key hashes, so two
    ASCII texts of one digest have the same score, bit for bit, whatever their case and white space
    (\\x1c-\\x1f are white space to both). Beyond ASCII a digest is not a text's n-grams: full-width
    letters have their ASCII form's digest (NFKC) and n-grams of their own, and get no digest."""
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from consumer.classify.cascade import hashing
    from consumer.classify.cascade.cache import cache_key
    from consumer.classify.cascade.cascade import _memo_digests
    from consumer.classify.cascade.stage import _Weights

    if hashing._ngrams is None:
        pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    policy = load_policy(REPO / "policies" / "spam-scams.md")
    n_features = 1 << 10
    white = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
    letters = st.characters(min_codepoint=0x21, max_codepoint=0x7E)

    def score(weights: _Weights, texts: list[str]) -> np.ndarray:
        found = hashing.ngram_scores(texts, n_features, weights.present, weights.before, weights.padded)
        assert found is not None
        return found

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.tuples(st.text(letters, min_size=1, max_size=12), st.text(white, min_size=1, max_size=3),
                           st.text(white, min_size=1, max_size=3)), max_size=12),  # fmt: skip
        st.booleans(),
        st.integers(0, 2**32 - 1),
    )
    def same(words: list[tuple[str, str, str]], swapped: bool, seed: int) -> None:
        one = "".join(space + word for word, space, _ in words)
        other = "".join(space + (word.swapcase() if swapped else word.upper()) for word, _, space in words) + " "
        keys = [cache_key(policy, one), cache_key(policy, other)]
        assert keys[0] == keys[1] and _memo_digests(keys, [one, other]) == [keys[0][2]] * 2
        rng = np.random.default_rng(seed)
        weights = _Weights.of(np.where(rng.random(2 * n_features) < 0.3, rng.normal(size=2 * n_features), 0.0))
        a, b = score(weights, [one, other])
        assert a == b  # the same float64

    same()
    ascii_text, wide = "FREE nitro here", "ＦＲＥＥ ｎｉｔｒｏ ｈｅｒｅ"
    keys = [cache_key(policy, ascii_text), cache_key(policy, wide)]
    assert keys[0] == keys[1] and _memo_digests(keys, [ascii_text, wide]) == [keys[0][2], None]
    dense = _Weights.of(np.random.default_rng(0).normal(size=2 * n_features))
    a, b = score(dense, [ascii_text, wide])
    assert a != b
