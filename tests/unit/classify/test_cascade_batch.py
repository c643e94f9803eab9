"""A poll batch of many policies: one pass over the texts per set of heads.

Where the lexical stage scores texts without making their rows (its compiled n-grams), one
`linear_scores` per set of heads; else one vectorisation per stage and one matrix product per set
of heads. Real stages (the lexical stage trained on spam-scams' examples), no reasoner; the
featurizer's `transform` and the heads' scoring are wrapped only to count their calls.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")

from consumer.classify import Classification  # noqa: E402
from consumer.classify.cascade import CascadeSettings  # noqa: E402
from consumer.classify.cascade import stage as stage_module  # noqa: E402
from consumer.classify.cascade.cascade import CascadeClassifier  # noqa: E402
from consumer.classify.cascade.lexical import LexicalFeatures  # noqa: E402
from tests.unit.classify.test_cascade_communities import HELD_OUT, ask, communities  # noqa: E402


class CountedFeatures(LexicalFeatures):
    """The real lexical featurizer, counting the batches `transform` is asked for; with
    `rows_only`, it scores texts through their rows, as where `_ngrams.c` was not compiled."""

    def __init__(self, rows_only: bool = False) -> None:
        self.batches: list[int] = []
        if rows_only:
            self.scores_texts = False

    def transform(self, texts: list[str]):
        self.batches.append(len(texts))
        return super().transform(texts)


# Both ways of scoring a batch: from its texts in one pass, and from its rows.
SCORING = [
    pytest.param(
        False, id="texts", marks=pytest.mark.skipif(not LexicalFeatures.scores_texts, reason="_ngrams.c not compiled")
    ),
    pytest.param(True, id="rows"),
]


@pytest.fixture
def products(monkeypatch) -> list[int]:
    """The texts of each scoring by a head, in call order: a matrix product (`_Weights.scores`)
    or a pass over texts (`LexicalFeatures.linear_scores`)."""
    sizes: list[int] = []
    product, from_texts = stage_module._Weights.scores, LexicalFeatures.linear_scores

    def counted_product(self, rows):
        sizes.append(rows.shape[0])
        return product(self, rows)

    def counted_texts(self, texts, *head):
        sizes.append(len(texts))
        return from_texts(self, texts, *head)

    monkeypatch.setattr(stage_module._Weights, "scores", counted_product)
    monkeypatch.setattr(LexicalFeatures, "linear_scores", counted_texts)
    return sizes


def outcome(answer) -> tuple[str, bool, str | None]:
    assert isinstance(answer, Classification), answer
    return answer.model, answer.violation, answer.confidence


@pytest.mark.parametrize("rows_only", SCORING)
def test_a_batch_of_four_policies_on_two_sets_of_heads_is_scored_once_per_set_of_heads(tmp_path, products, rows_only):
    # c1 and c2 adopt the platform's text (one set of heads for three policies); c3's text is its own.
    store = communities(tmp_path, ["c1", "c2"], same_text=True)
    folder = tmp_path / "policies"
    own = (folder / "c1.md").read_text().replace("community: c1\n", "community: c3\n", 1)
    (folder / "c3.md").write_text(own.replace("## INSTRUCTIONS\n", "## INSTRUCTIONS\nThe rules of c3.\n", 1))
    (folder / "c3.examples.jsonl").write_bytes((folder / "c1.examples.jsonl").read_bytes())
    store = type(store)(folder)
    policies = store.get()
    keys = ["spam-scams", "c1/spam-scams", "c2/spam-scams", "c3/spam-scams"]
    featurizer = CountedFeatures(rows_only)

    async def scenario():
        cascade = CascadeClassifier(CascadeSettings(cache=False), None, store, lexical=featurizer)
        await cascade.start()
        for key in keys:  # heads trained (a poll batch never trains them)
            await cascade.classify(ask(policies[key], ["warm up"])[0])
        one_by_one = {key: [outcome(await cascade.classify(r)) for r in ask(policies[key], HELD_OUT)] for key in keys}
        featurizer.batches.clear()
        products.clear()
        batch = [r for key in keys for r in ask(policies[key], HELD_OUT)]
        return cascade, one_by_one, [outcome(a) for a in cascade.classify_now_many(batch)]

    cascade, one_by_one, found = asyncio.run(scenario())
    assert cascade.heads("c1/spam-scams") == cascade.heads("spam-scams") != cascade.heads("c3/spam-scams")
    # From rows: every open text of the batch vectorised once; from texts: no rows made.
    assert featurizer.batches == ([4 * len(HELD_OUT)] if rows_only else [])
    assert sorted(products) == [len(HELD_OUT), 3 * len(HELD_OUT)]  # scored once per set of heads
    # The same answers as each request asked alone, in the batch's order.
    assert found == [answer for key in keys for answer in one_by_one[key]]


@pytest.mark.parametrize("rows_only", SCORING)
def test_policies_sharing_heads_decide_at_their_own_target_precision(tmp_path, products, rows_only):
    store = communities(tmp_path, [])
    platform = store.get()["spam-scams"]

    async def scenario():
        cascade = CascadeClassifier(CascadeSettings(cache=False), None, store, lexical=CountedFeatures(rows_only))
        await cascade.start()
        found = [outcome(a) for a in cascade.classify_now_many(ask(platform, HELD_OUT))]
        # A content whose confidence lies strictly between two targets: one community decides it,
        # the other does not.
        confidence = max(float(c) for _, _, c in found if 0.6 < float(c) < 0.99)
        lax = dataclasses.replace(platform, community="lax", target_precision=(0.5 + confidence) / 2)
        strict = dataclasses.replace(platform, community="strict", target_precision=(confidence + 1) / 2)
        content = HELD_OUT[[float(c) for _, _, c in found].index(confidence)]
        for policy in (lax, strict):  # heads assigned (a poll batch never trains or assigns them)
            await cascade.classify(ask(policy, ["warm up"])[0])
        products.clear()
        answers = cascade.classify_now_many(ask(lax, [content]) + ask(strict, [content]))
        return confidence, [outcome(a) for a in answers], cascade

    confidence, (lax, strict), cascade = asyncio.run(scenario())
    assert cascade.heads("lax/spam-scams") == cascade.heads("strict/spam-scams")  # one set of heads
    assert products == [2]  # both scored at once: the probability is shared, the threshold is not
    assert lax[0] == "cascade:lexical" and strict[0] == "cascade:lexical:undecided"
    assert lax[1] == strict[1] and float(lax[2]) == float(strict[2]) == pytest.approx(confidence, abs=1e-3)


@pytest.mark.parametrize("rows_only", SCORING)
def test_requests_waiting_for_their_heads_are_decided_together_once_trained(tmp_path, products, rows_only):
    store = communities(tmp_path, ["c1"])
    policy = store.get()["c1/spam-scams"]
    featurizer = CountedFeatures(rows_only)

    async def scenario():
        cascade = CascadeClassifier(CascadeSettings(cache=False), None, store, lexical=featurizer)
        await cascade.start()
        batch = ask(policy, HELD_OUT)
        assert cascade.classify_now_many(batch) == [None] * len(batch)  # c1's heads are not trained yet
        products.clear()
        verdicts = await asyncio.gather(*(cascade.classify(r) for r in batch))
        return cascade, [outcome(v) for v in verdicts]

    cascade, found = asyncio.run(scenario())
    assert products == [len(HELD_OUT)]  # released together by the training: scored once, not once each
    assert (len(HELD_OUT) in featurizer.batches) == rows_only and 1 not in featurizer.batches
    assert all(stage.startswith("cascade:lexical") for stage, _, _ in found)


def test_a_stages_answers_are_made_once_per_distinct_answer_and_say_what_decided():
    """Equal answers are one shared object (nothing changes a Classification once made); an
    answer differing in anything it reports is another."""
    from consumer.classify.cascade import verdicts
    from consumer.classify.cascade.stage import Decision

    decided = verdicts.cheap("lexical", Decision(True, 0.98712, True), 0.95)
    assert decided is verdicts.cheap("lexical", Decision(True, 0.98704, True), 0.95)  # 0.987 both
    assert (decided.confidence, decided.category, decided.stage, decided.model) == ("0.987", None, "lexical",
                                                                                    "cascade:lexical")  # fmt: skip
    assert "0.987 >= target precision 0.95" in decided.rationale
    for other in (verdicts.cheap("lexical", Decision(True, 0.988, True), 0.95),
                  verdicts.cheap("lexical", Decision(False, 0.987, True), 0.95),
                  verdicts.cheap("embedding", Decision(True, 0.987, True), 0.95),
                  verdicts.cheap("lexical", Decision(True, 0.987, True), 0.9)):  # fmt: skip
        assert other is not decided and other != decided
    guess = verdicts.undecided("lexical", Decision(False, 0.6, False), 0.95)
    assert guess is verdicts.undecided("lexical", Decision(False, 0.6, False), 0.95)
    assert (guess.stage, guess.category, guess.model) == ("undecided", "safe", "cascade:lexical:undecided")
    assert "(calibrated confidence 0.600); no reasoner configured" in guess.rationale


def _recased(text: str) -> str:
    """The same words in another case and other white space: one cache digest, one set of n-grams."""
    return "\t " + "  \n".join(word.swapcase() for word in text.split()) + " \x0b"


def _full_width(text: str) -> str:
    """Its ASCII letters as full-width ones: the cache digest of the ASCII text (NFKC), other n-grams."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# A batch of the held-out texts, then again recased (one cache digest, the same n-grams), then the
# first ten in full width (the ASCII texts' digest, n-grams of their own), then all again after an
# online update of the head (new weights, which decided nothing yet).
_REPEATS = [HELD_OUT, [_recased(t) for t in HELD_OUT], [_full_width(t) for t in HELD_OUT[:10]], HELD_OUT]


def _repeated(
    tmp_path, products: list[int], scores: bool, answers: bool, rows_only: bool = False
) -> tuple[list[list[tuple]], list[list[int]], tuple, int]:  # fmt: skip
    """`_REPEATS` through a cascade without a reasoner, with or without its memo of scores
    (`ScoreMemo`) and of undecided answers (`UndecidedAnswers`): each batch's answers, its scorings
    (`products`), the policy's counters at the end and the scores the memo holds then."""
    from consumer.classify.cascade.stage import ONLINE_BATCH

    folder = tmp_path / f"{scores}-{answers}-{rows_only}"
    folder.mkdir()
    store = communities(folder, [])
    platform = store.get()["spam-scams"]

    async def run() -> tuple[list[list[tuple]], list[list[int]], tuple, int]:
        cascade = CascadeClassifier(CascadeSettings(), None, store, lexical=CountedFeatures(rows_only))
        if not scores:
            cascade._scored = None
        if not answers:
            cascade._undecided_answers = None
        await cascade.start()
        found, scored = [], []
        for i, texts in enumerate(_REPEATS):
            if i == len(_REPEATS) - 1:
                head = cascade.heads(platform.key)[0]
                for text in HELD_OUT[:ONLINE_BATCH]:
                    await head.learn(text, 1)
            products.clear()
            found.append([outcome(a) for a in cascade.classify_now_many(ask(platform, texts))])
            scored.append(list(products))
        counters = cascade.counters[platform.id]
        held = 0 if cascade._scored is None else len(cascade._scored)
        return found, scored, (counters.requests, counters.cache_hits, counters.cache_misses, counters.decided), held

    return asyncio.run(run())


def _check_both_kinds(found: list[list[tuple]]) -> int:
    """How many of the first batch's answers are undecided, having checked that both kinds are there."""
    undecided = sum(model == "cascade:lexical:undecided" for model, _, _ in found[0])
    decided = sum(model == "cascade:lexical" for model, _, _ in found[0])
    assert undecided >= 10 and decided >= 10  # both kinds of answer are in the test
    assert [m for m, _, _ in found[1]] == [m.replace("cascade:lexical", "cascade:cache") if m == "cascade:lexical"
                                           else m for m, _, _ in found[0]]  # fmt: skip
    return undecided


@pytest.mark.skipif(not LexicalFeatures.scores_texts, reason="_ngrams.c not compiled: no memo on the rows' path")
def test_a_repeated_text_no_stage_decides_is_scored_once_per_head_and_answered_as_if_scored_again(
    tmp_path, products
):  # fmt: skip
    """Without a reasoner, an undecided answer is not cached, so each copy of a text reached the
    lexical stage again; its score is memoised by the text's cache digest (ASCII only) and the
    weights in force. The answers are the ones a cascade without the memo gives, batch by batch:
    those of a text in other case and white space, and of its full-width form (which has its
    digest but n-grams of its own, so it is scored); an online update of the head (new weights)
    scores every text again. (The memo of undecided answers, which would answer the copies
    before they are scored, is off here: the next test's.)"""
    with_memo, scored, _, held = _repeated(tmp_path, products, scores=True, answers=False)
    without_memo, scored_without, _, _ = _repeated(tmp_path, products, scores=False, answers=False)
    assert held > 0
    assert with_memo == without_memo
    undecided = _check_both_kinds(with_memo)
    assert scored[0] == scored_without[0] == [len(HELD_OUT)]
    # Recased: the decided ones are cache hits either way; the undecided ones were scored before.
    assert scored_without[1] == [undecided] and scored[1] == []
    assert scored[2] == scored_without[2] and sum(scored[2]) > 0  # full width: never from the memo
    assert scored[3] == scored_without[3] == [undecided]  # the updated head scores them all again


@pytest.mark.parametrize("rows_only", SCORING)
def test_a_repeated_text_no_stage_decides_gets_the_answer_it_got_before_while_the_weights_are_the_same(
    tmp_path, products, rows_only
):  # fmt: skip
    """Without a reasoner, the undecided answer of an ASCII text is kept by its cache digest, the
    policy version and the weights in force, and a copy gets it without reaching the stage: the
    same answers and counters as a cascade that decides every copy again. Never for a text whose
    digest stands for other n-grams (full width), nor after the head's update, nor where the
    stage scores rows (its features are not known to be read from the digest's form alone). Where
    the answers are kept, no score is (it would never be read again)."""
    with_memo, scored, counted, held = _repeated(tmp_path, products, scores=True, answers=True, rows_only=rows_only)
    without_memo, scored_without, counted_without, _ = _repeated(
        tmp_path, products, scores=False, answers=False, rows_only=rows_only
    )
    assert with_memo == without_memo and counted == counted_without and held == 0
    undecided = _check_both_kinds(with_memo)
    assert scored[0] == scored_without[0] == [len(HELD_OUT)]
    assert scored_without[1] == [undecided] and scored[1] == ([undecided] if rows_only else [])
    assert scored[2] == scored_without[2] and sum(scored[2]) > 0  # full width: never from the memo
    assert scored[3] == scored_without[3] == [undecided]  # new weights: decided again


def test_undecided_answers_are_kept_per_state_up_to_their_bound():
    """Answers by state and digest; the bound counts the answers and the states they are kept in
    (an online update makes a new state), and past it everything is dropped."""
    from consumer.classify.cascade.cache import UndecidedAnswers

    one, other = Classification(violation=False), Classification(violation=True)
    memo = UndecidedAnswers(max_entries=6)
    assert memo.known("s") == {} and len(memo) == 0
    memo.remember("s", {b"a": one, b"b": other})
    memo.remember("s", {b"a": one})  # known already: counted once
    assert memo.known("s") == {b"a": one, b"b": other} and len(memo) == 3
    memo.remember("t", {b"a": other})
    assert memo.known("t") == {b"a": other} and memo.known("s")[b"a"] is one and len(memo) == 5
    memo.remember("s", {b"c": one, b"d": one})  # past the bound: everything dropped first
    assert memo.known("s") == {b"c": one, b"d": one} and memo.known("t") == {} and len(memo) == 3


def test_the_score_memo_keeps_scores_per_set_of_weights_up_to_its_bound():
    """Scores by digest and set of weights; a text without a digest is scored every time; the
    bound counts the scores and the sets of weights they are kept for (new weights come with every
    online update), and past it everything is dropped."""
    import numpy as np

    from consumer.classify.cascade.stage import ScoreMemo, _Weights

    asked: list[list[str]] = []

    def score(texts: list[str]) -> np.ndarray:
        asked.append(list(texts))
        return np.array([float(len(t)) for t in texts])

    memo = ScoreMemo(max_entries=6)
    one, other = _Weights.of(np.ones(8)), _Weights.of(np.ones(8))
    assert list(memo.scores(one, ["a", "bb", "ccc"], [b"a", None, b"c"], score)) == [1.0, 2.0, 3.0]
    assert list(memo.scores(one, ["a", "bb", "ccc"], [b"a", None, b"c"], score)) == [1.0, 2.0, 3.0]
    assert asked == [["a", "bb", "ccc"], ["bb"]] and len(memo) == 3  # one set of weights, two scores
    assert list(memo.scores(other, ["a"], [b"a"], score)) == [1.0]  # equal weights, another set: its own scores
    assert asked[-1] == ["a"] and len(memo) == 5
    memo.scores(_Weights.of(np.ones(8)), ["x"], [None], score)  # nothing to keep: nothing held for them
    assert len(memo) == 5
    memo.scores(one, ["dddd", "eeeee"], [b"d", b"e"], score)  # past the bound: everything dropped first
    assert len(memo) == 3
    memo.scores(one, ["a", "dddd"], [b"a", b"d"], score)
    assert asked[-1] == ["a"] and len(memo) == 4
