"""The cascade at many communities: heads trained on first use, held in a bounded LRU, shared.

Real stages throughout (the lexical stage trained on spam-scams' examples), no reasoner: the
cheap stages answer. Community variants of spam-scams use the platform policy's id, as two
communities may, so everything below must tell them apart by `Policy.key`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")

from consumer.classify import Classification, ClassifyRequest  # noqa: E402
from consumer.classify.cascade import CascadeSettings, make_cascade  # noqa: E402
from consumer.classify.cascade.cache import cache_key  # noqa: E402
from consumer.config.cascade import CascadeSettings as Settings  # noqa: E402
from consumer.events import ContentEvent  # noqa: E402
from consumer.policy import Policy, PolicyStore  # noqa: E402
from tests.conftest import REPO  # noqa: E402

HELD_OUT = [json.loads(line)["content"] for line in (REPO / "tests/data/cascade-spam-heldout.jsonl").read_text().splitlines()]


def communities(tmp_path: Path, names: list[str], same_text: bool = False) -> PolicyStore:
    """spam-scams for the platform, and a variant of it (same id) for each named community; each
    variant's text names its community unless `same_text`."""
    folder = tmp_path / "policies"
    folder.mkdir()
    source = (REPO / "policies" / "spam-scams.md").read_text()
    examples = REPO / "policies" / "spam-scams.examples.jsonl"
    (folder / "spam-scams.md").write_text(source)
    shutil.copy(examples, folder / "spam-scams.examples.jsonl")
    for name in names:
        text = source.replace("id: spam-scams\n", f"id: spam-scams\ncommunity: {name}\n", 1)
        if not same_text:
            text = text.replace("## INSTRUCTIONS\n", f"## INSTRUCTIONS\nThe rules of community {name}.\n", 1)
        (folder / f"{name}.md").write_text(text)
        shutil.copy(examples, folder / f"{name}.examples.jsonl")
    return PolicyStore(folder)


def ask(policy: Policy, texts: list[str]) -> list[ClassifyRequest]:
    return [ClassifyRequest(ContentEvent(event_id=f"e{i}", content=t), policy, f"e{i}") for i, t in enumerate(texts)]


async def answers(cascade, policy: Policy) -> list[tuple[str, bool, str | None]]:
    """The cascade's answers for the held-out set under `policy`, as (stage, violation, confidence)."""
    verdicts = [await cascade.classify(r) for r in ask(policy, HELD_OUT)]
    return [(v.model, v.violation, v.confidence) for v in verdicts]


def trained(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The policies whose heads were trained or restored, in order, from the cascade's log."""
    return [r.args[1] for r in caplog.records if r.msg.startswith("cascade heads")]


def test_only_the_platform_policies_are_trained_at_start_and_a_community_on_its_first_request(tmp_path, caplog):
    store = communities(tmp_path, ["c1", "c2", "c3", "c4"])
    caplog.set_level(logging.INFO, logger="consumer.classify.cascade.cascade")

    async def scenario():
        cascade = make_cascade(CascadeSettings(), None, store)
        await cascade.start()
        at_start = trained(caplog)
        verdict = await cascade.classify(ask(store.get()["c2/spam-scams"], [HELD_OUT[0]])[0])
        return cascade, at_start, verdict

    cascade, at_start, verdict = asyncio.run(scenario())
    assert at_start == ["spam-scams"]
    assert trained(caplog) == ["spam-scams", "c2/spam-scams"]
    assert verdict.model.startswith("cascade:lexical")
    assert cascade.heads("c2/spam-scams") and not cascade.heads("c1/spam-scams") and not cascade.heads("c3/spam-scams")


def test_concurrent_first_requests_for_a_policy_train_its_heads_once(tmp_path, caplog):
    store = communities(tmp_path, ["c1"])
    caplog.set_level(logging.INFO, logger="consumer.classify.cascade.cascade")
    policy = store.get()["c1/spam-scams"]

    async def scenario():
        cascade = make_cascade(CascadeSettings(cache=False), None, store)
        await cascade.start()
        # A poll batch finds no heads yet: every request goes to `classify` at once.
        batch = ask(policy, HELD_OUT)
        assert cascade.classify_now_many(batch) == [None] * len(batch)
        return await asyncio.gather(*(cascade.classify(r) for r in batch))

    verdicts = asyncio.run(scenario())
    assert len(verdicts) == len(HELD_OUT) and all(isinstance(v, Classification) for v in verdicts)
    assert trained(caplog) == ["spam-scams", "c1/spam-scams"]


def test_policies_with_the_same_text_and_examples_share_one_set_of_heads(tmp_path, caplog):
    store = communities(tmp_path, ["c1", "c2"], same_text=True)
    caplog.set_level(logging.INFO, logger="consumer.classify.cascade.cascade")
    policies = store.get()

    async def scenario():
        cascade = make_cascade(CascadeSettings(max_trained_policies=1), None, store)
        await cascade.start()
        for key in ("c1/spam-scams", "c2/spam-scams"):
            await cascade.classify(ask(policies[key], [HELD_OUT[0]])[0])
        return cascade

    cascade = asyncio.run(scenario())
    assert policies["c1/spam-scams"].version != policies["spam-scams"].version  # other files, one text
    assert trained(caplog) == ["spam-scams"]  # one training for the three; a bound of one holds them all
    (platform,) = cascade.heads("spam-scams")
    assert cascade.heads("c1/spam-scams") == [platform] == cascade.heads("c2/spam-scams")


@pytest.mark.parametrize("saved", [True, False])
def test_the_least_recently_used_heads_are_evicted_at_the_bound_and_answer_alike_when_asked_again(tmp_path, caplog, saved):
    store = communities(tmp_path, ["c1", "c2", "c3"])
    caplog.set_level(logging.INFO, logger="consumer.classify.cascade.cascade")
    policies = store.get()
    state = tmp_path / "state" if saved else None
    settings = CascadeSettings(max_trained_policies=2, cache=False, state_dir=state)
    person = Classification(violation=True, category="scam", confidence="high", model="reviewer")

    async def scenario():
        cascade = make_cascade(settings, None, store)
        await cascade.start()
        c1 = policies["c1/spam-scams"]
        # What a person taught c1's heads is part of what an eviction must keep.
        await cascade.classify(ask(c1, [HELD_OUT[0]])[0])
        for text in ("dm me for cheap followers, 1000 for $5", "selling accounts with rare skins, dm"):
            await cascade.learn_from_review(ask(c1, [text])[0], person)
        for stage in cascade.heads("c1/spam-scams"):
            await stage.wait_idle()
        examples = [stage.examples for stage in cascade.heads("c1/spam-scams")]
        before = await answers(cascade, c1)
        await answers(cascade, policies["c2/spam-scams"])  # the platform's heads are the least recent now
        held = {key: bool(cascade.heads(key)) for key in policies}
        await answers(cascade, policies["c3/spam-scams"])  # evicts c1's
        evicted = not cascade.heads("c1/spam-scams")
        after = await answers(cascade, c1)
        again = [stage.examples for stage in cascade.heads("c1/spam-scams")]
        if saved:
            (path,) = state.glob(f"heads/{cascade.heads('c1/spam-scams')[0].version}/lexical.npz")
            written = path.stat().st_mtime_ns
            for key in ("c2/spam-scams", "c3/spam-scams"):
                await answers(cascade, policies[key])  # evicts c1's again, unchanged since restored
            assert not cascade.heads("c1/spam-scams") and path.stat().st_mtime_ns == written
        return held, evicted, examples, again, before, after

    held, evicted, examples, again, before, after = asyncio.run(scenario())
    assert held == {"spam-scams": False, "c1/spam-scams": True, "c2/spam-scams": True, "c3/spam-scams": False}
    assert evicted
    assert any(stage.startswith("cascade:lexical") and not stage.endswith("undecided") for stage, _, _ in before)
    if saved:
        # Restored, not retrained: the person's decisions are still in the heads, the answers the same.
        assert again == examples
        assert after == before
        assert "(restored)" in [r.getMessage() for r in caplog.records if r.msg.startswith("cascade heads")][-1]
    else:
        # Trained again from the examples alone: what the person taught is gone.
        assert again[0] == examples[0] - 2 * 3
    assert trained(caplog).count("c1/spam-scams") == 2


def test_two_communities_using_one_id_have_cache_entries_of_their_own():
    policy = Policy(id="house-rules", version="v1", text="# rules\n")
    ours, theirs = dataclasses.replace(policy, community="a"), dataclasses.replace(policy, community="b")
    assert cache_key(ours, "hello") != cache_key(theirs, "hello")
    assert cache_key(policy, "hello")[0] == "house-rules"


def test_a_policy_of_its_own_target_precision_wins_over_the_configured_ones():
    settings = Settings(target_precision=0.95, policies={"spam-scams": {"target_precision": 0.9}})
    assert settings.plan_for("spam-scams").target_precision == 0.9
    assert settings.plan_for("spam-scams", 0.99).target_precision == 0.99
    assert settings.plan_for("other", 0.8).target_precision == 0.8
    assert settings.plan_for("other").target_precision == 0.95


def test_the_cascade_decides_at_the_policy_s_own_target_precision(tmp_path):
    if "target_precision" not in {field.name for field in dataclasses.fields(Policy)}:
        pytest.skip("Policy.target_precision (a community's override) is not in this checkout's policy model yet")
    store = communities(tmp_path, [])
    strict = dataclasses.replace(store.get()["spam-scams"], target_precision=0.999)

    async def scenario():
        cascade = make_cascade(CascadeSettings(cache=False), None, store)
        await cascade.start()
        return await answers(cascade, store.get()["spam-scams"]), await answers(cascade, strict)

    default, at_strict = asyncio.run(scenario())
    assert any(stage == "cascade:lexical" for stage, _, _ in default)
    assert all(stage == "cascade:lexical:undecided" for stage, _, _ in at_strict)


def test_one_poll_batch_keeps_apart_two_communities_whose_policies_share_id_and_version(tmp_path):
    store = communities(tmp_path, [])
    platform = store.get()["spam-scams"]
    # As a policy topic may deliver them: the community in the record, not in the policy's bytes.
    ours, theirs = (dataclasses.replace(platform, community=name) for name in ("a", "b"))
    assert ours.ref == theirs.ref and ours.key != theirs.key

    async def scenario():
        cascade = make_cascade(CascadeSettings(), None, store)
        await cascade.start()
        for policy in (ours, theirs):
            await cascade.classify(ask(policy, ["warm up"])[0])
        batch = ask(ours, HELD_OUT[:1]) + ask(theirs, HELD_OUT[:1])
        return cascade, cascade.classify_now_many(batch)

    cascade, found = asyncio.run(scenario())
    assert all(isinstance(answer, Classification) for answer in found)
    assert cascade.counters["spam-scams"].coalesced == 0  # neither was taken for a copy of the other
    assert cascade.heads("a/spam-scams") == cascade.heads("b/spam-scams") == cascade.heads("spam-scams")
