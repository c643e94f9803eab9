"""What a person's decision teaches the cascade, and how it reports a shadow disagreement."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")

from consumer.classify import Classification, LearnsFromReview, ReportsDisagreements  # noqa: E402
from consumer.classify.cascade import CascadeSettings, make_cascade  # noqa: E402
from consumer.classify.cascade.cascade import HUMAN_LABEL_WEIGHT  # noqa: E402
from consumer.policy import PolicyStore  # noqa: E402
from tests.unit.classify.test_cascade import LabelReasoner, policy_dir, request  # noqa: E402

CLEAR_SPAM = "FREE NITRO for 3 months!! claim here -> discord-nitro.gift/claim"


def test_a_decision_answers_the_same_content_from_then_on_and_teaches_the_heads_weighted(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    hard = "anyone up for a trade? dm me"

    async def scenario():
        cascade = make_cascade(CascadeSettings(shadow_fraction=0), None, store)
        assert isinstance(cascade, LearnsFromReview)
        await cascade.start()
        before = await cascade.classify(request(policy, hard))
        human = Classification(violation=True, category="scam", model="human", stage="human")
        await cascade.learn_from_review(request(policy, hard), human)
        after = await cascade.classify(request(policy, "Anyone up for a   trade? DM me", 1))
        at_once = cascade.classify_now(request(policy, hard, 2))
        counters = cascade.counters["spam-scams"]
        await cascade.close()
        return before, after, at_once, counters, cascade

    before, after, at_once, counters, cascade = asyncio.run(scenario())
    assert before.stage == "undecided"
    assert after.violation and after.model == "cascade:cache:human" and after.category == "scam"
    assert at_once is not None and at_once.model == "cascade:cache:human"
    assert counters.learned_human == 1
    assert all(stage.examples >= HUMAN_LABEL_WEIGHT for stage in cascade.heads("spam-scams"))
    # A machine verdict never replaces a person's answer in the cache.
    from consumer.classify.cascade.cache import cache_key

    cascade.cache.put(cache_key(policy, hard), Classification(violation=False, model="m"))
    assert cascade.cache.get(cache_key(policy, hard)).violation is True


def test_a_shadow_check_that_disagrees_is_reported_with_both_answers(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    reported = []

    async def scenario():
        cascade = make_cascade(CascadeSettings(shadow_fraction=1.0), LabelReasoner({CLEAR_SPAM: 0}), store)
        assert isinstance(cascade, ReportsDisagreements)
        cascade.on_disagreement = lambda req, cheap, reasoner: reported.append((req.request_id, cheap, reasoner))
        await cascade.start()
        verdict = await cascade.classify(request(policy, CLEAR_SPAM))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if reported:
                break
        await cascade.close()
        return verdict

    verdict = asyncio.run(scenario())
    assert verdict.stage == "lexical" and verdict.violation
    ((request_id, cheap, reasoner),) = reported
    assert request_id == "e0/spam-scams" and cheap.violation and not reasoner.violation and reasoner.stage == "reasoner"


def test_a_burst_of_decisions_reaches_the_heads_within_two_refits_with_no_traffic_after(tmp_path):
    # 11 decisions are 33 labels: the 25th starts a refit (refit_every), the last 8 arrive
    # during it, and nothing is classified afterwards to start another. Before the fix the
    # head in force lacked them: it answered the 10th message against the person (0.68).
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    burst = [(f"selling {thing} cheap, dm me for the price", i % 2) for i, thing in enumerate(
        ["my bike", "an old phone", "two tickets", "a gpu", "my couch", "a skateboard", "a guitar", "some books",
         "a camera", "my desk", "a drone"])]

    async def scenario():
        cascade = make_cascade(CascadeSettings(shadow_fraction=0), None, store)
        await cascade.start()
        (lexical,) = cascade.heads("spam-scams")
        for text, label in burst:
            human = Classification(violation=bool(label), category="scam" if label else "safe", model="human",
                                   stage="human")
            await cascade.learn_from_review(request(policy, text), human)
            await asyncio.sleep(0.05)  # one by one, as the review loop applies them, while a refit runs
        taught = time.monotonic()
        while lexical.unfitted and time.monotonic() - taught < 30:
            await asyncio.sleep(0.01)
        reached = time.monotonic() - taught
        answers = lexical.decide_many([text for text, _ in burst], 0.95)
        refit = await timed_refit(lexical)
        await cascade.close()
        return lexical, reached, answers, refit

    lexical, reached, answers, refit = asyncio.run(scenario())
    assert lexical.unfitted == 0, "the last labels of the burst never reached a refit"
    assert [int(answer.violation) for answer in answers] == [label for _, label in burst]
    assert lexical.examples >= len(burst) * HUMAN_LABEL_WEIGHT
    # Two refits of these examples, with room for a shared, busy machine's scheduling.
    assert reached <= 2 * refit + 1.0, (reached, refit)


async def timed_refit(stage) -> float:
    """How long one refit of the stage's kept examples takes (one more urgent label's worth)."""
    began = time.monotonic()
    await stage.learn("one more decision, to time a refit", 0, urgent=True)
    await stage.wait_idle()
    return time.monotonic() - began


def test_an_overturn_replaces_what_the_heads_learned_of_the_content_a_second_decision_does_not(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    text = "selling two tickets cheap, dm me for the price"
    scam = Classification(violation=True, category="scam", model="human", stage="human")
    safe = Classification(violation=False, category="safe", model="human", stage="human")

    async def scenario(corrects: bool):
        cascade = make_cascade(CascadeSettings(shadow_fraction=0), None, store)
        await cascade.start()
        (lexical,) = cascade.heads("spam-scams")
        seeded = lexical.examples
        await cascade.learn_from_review(request(policy, text), scam)
        await cascade.learn_from_review(request(policy, text, 1), safe, corrects=corrects)
        deadline = time.monotonic() + 30
        while lexical.unfitted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        answered = cascade.classify_now(request(policy, text, 2))
        await cascade.close()
        return lexical.examples - seeded, lexical.unfitted, answered

    overturned, unfitted, answered = asyncio.run(scenario(corrects=True))
    assert overturned == HUMAN_LABEL_WEIGHT and unfitted == 0  # the scam labels are gone, refitted without them
    assert answered is not None and not answered.violation  # the cache: the overturn's answer
    added, _, _ = asyncio.run(scenario(corrects=False))
    assert added == 2 * HUMAN_LABEL_WEIGHT  # a plain second decision adds to what was learned
