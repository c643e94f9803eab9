"""The cascade behind the Classifier Protocol: escalation, learning, shadow sampling, restarts.

The reasoner here is `LabelReasoner`, a Classifier that answers from the labels of the
stream it is given: it stands for gpt-oss-safeguard's verdicts so the cheap stages' share and
learning can be counted exactly. The cascade end to end with the real vLLM engine and a real
broker is tests/engine/test_cascade_engine.py.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")

from consumer.classify import Capacity, Classification, ClassificationFailed, Classifier, ClassifyRequest  # noqa: E402
from consumer.classify.cascade import CascadeSettings, make_cascade  # noqa: E402
from consumer.errors import Unavailable  # noqa: E402
from consumer.events import ContentEvent, ErrorType  # noqa: E402
from consumer.policy import Policy, PolicyStore  # noqa: E402
from tests.conftest import REPO  # noqa: E402

SPAM_OPENERS = ["FREE NITRO", "free steam gift", "claim your prize", "you won", "exclusive giveaway", "get free robux",
                "double your crypto", "limited offer", "free vbucks", "airdrop live"]
SPAM_ACTIONS = ["log in at", "click", "verify at", "claim at", "connect your wallet at", "redeem now at"]
SPAM_DOMAINS = ["discord-gift.xyz", "steamcommunlty.ru", "prize-claim.top", "nitro-drop.club", "free-gems.win",
                "wallet-airdrop.io", "steam-gifts.shop", "giveaway-now.site"]
CHAT_OPENERS = ["anyone up for", "just finished", "what do you think about", "gg, that was", "can someone explain",
                "i really liked", "who wants to try", "the mods said", "good morning, ready for", "lol, remember"]
CHAT_TOPICS = ["the raid tonight", "ranked games", "the new patch", "the boss in chapter 3", "the speedrun route",
               "the art contest", "the server rules", "the lore video", "a chill duo session", "the weekly quest"]


def chat_stream(n: int, spam_share: float, seed: int) -> list[tuple[str, int]]:
    """Distinct templated chat: `spam_share` scam messages, the rest ordinary chat."""
    rng = random.Random(seed)
    seen: set[str] = set()
    stream = []
    while len(stream) < n:
        if rng.random() < spam_share:
            text = (f"{rng.choice(SPAM_OPENERS)}!! {rng.choice(SPAM_ACTIONS)} {rng.choice(SPAM_DOMAINS)}/"
                    f"{rng.randrange(10**6):06d}")
            label = 1
        else:
            text = f"{rng.choice(CHAT_OPENERS)} {rng.choice(CHAT_TOPICS)} #{rng.randrange(1000)}"
            label = 0
        if text not in seen:
            seen.add(text)
            stream.append((text, label))
    return stream


class LabelReasoner:
    """A reasoner that knows the answer: the label of each content it was given."""

    name = "label-reasoner"

    def __init__(self, labels: dict[str, int], max_sequences: int = 8, latency_s: float = 0.0):
        self.labels = labels
        self.max_sequences = max_sequences
        self.latency_s = latency_s
        self.asked: list[str] = []
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self.max_sequences)

    async def classify(self, request: ClassifyRequest) -> Classification:
        self.asked.append(request.event.content)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if request.event.content not in self.labels:
            raise ClassificationFailed(ErrorType.UNPARSEABLE_OUTPUT, "no answer", raw_output="???")
        violation = bool(self.labels[request.event.content])
        return Classification(violation=violation, category="scam" if violation else "safe", confidence="high",
                              model="gpt-oss-safeguard-20b")

    async def close(self) -> None:
        self.closed = True


def policy_dir(tmp_path: Path, with_examples: bool = True) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir(exist_ok=True)
    shutil.copy(REPO / "policies" / "spam-scams.md", folder / "spam-scams.md")
    if with_examples:
        shutil.copy(REPO / "policies" / "spam-scams.examples.jsonl", folder / "spam-scams.examples.jsonl")
    return folder


def request(policy: Policy, content: str, i: int = 0) -> ClassifyRequest:
    return ClassifyRequest(ContentEvent(event_id=f"e{i}", content=content), policy, request_id=f"e{i}/{policy.id}")


async def classify_all(cascade: Classifier, policy: Policy, texts: list[str]) -> list[Classification]:
    verdicts = []
    for i, text in enumerate(texts):
        verdicts.append(await cascade.classify(request(policy, text, i)))
        await asyncio.sleep(0)  # as in the pipeline, other tasks (shadow requests) run between events
    return verdicts


def test_the_verdict_names_the_stage_and_a_cheap_stage_gives_its_calibrated_confidence(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    clear_spam = "FREE NITRO for 3 months!! claim here -> discord-nitro.gift/claim"
    unclear = "i'm selling my old bike, message me if you're interested"
    reasoner = LabelReasoner({unclear: 0})

    async def scenario():
        cascade = make_cascade(CascadeSettings(shadow_fraction=0), reasoner, store)
        await cascade.start()
        verdicts = await classify_all(cascade, policy, [clear_spam, unclear, clear_spam.upper()])
        await cascade.close()
        return cascade, verdicts

    cascade, (cheap, escalated, cached) = asyncio.run(scenario())
    assert cheap.model == "cascade:lexical" and cheap.violation is True
    assert float(cheap.confidence) >= 0.95 and cheap.category is None
    assert escalated.model == "gpt-oss-safeguard-20b" and reasoner.asked == [unclear]
    assert cached.model == "cascade:cache" and cached.violation is True
    counters = cascade.counters["spam-scams"]
    assert counters.decided == {"cache": 1, "lexical": 1, "embedding": 0, "reasoner": 1, "undecided": 0}
    assert (counters.cache_hits, counters.cache_misses, counters.escalations) == (1, 2, 1)
    assert counters.calibration_error["lexical"] is not None and 0 <= counters.calibration_error["lexical"] < 0.2
    assert reasoner.started and reasoner.closed


def test_identical_messages_arriving_together_reach_the_reasoner_once(tmp_path):
    store = PolicyStore(policy_dir(tmp_path, with_examples=False))  # nothing calibrated: all would escalate
    policy = store.get()["spam-scams"]
    raid = "join my server!!! discord.gg/raidraid"
    reasoner = LabelReasoner({raid: 1}, latency_s=0.05)

    async def scenario():
        cascade = make_cascade(CascadeSettings(), reasoner, store)
        await cascade.start()
        verdicts = await asyncio.gather(*(cascade.classify(request(policy, raid, i)) for i in range(20)))
        return cascade, verdicts

    cascade, verdicts = asyncio.run(scenario())
    assert reasoner.asked == [raid]
    assert all(v.violation for v in verdicts)
    assert sorted(v.model for v in verdicts).count("cascade:cache") == 19
    assert cascade.counters["spam-scams"].coalesced == 19


def test_a_reasoner_failure_is_the_request_failure_not_a_cheap_answer(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]

    async def scenario():
        cascade = make_cascade(CascadeSettings(), LabelReasoner({}), store)
        await cascade.start()
        await cascade.classify(request(policy, "i'm selling my old bike, message me if you're interested"))

    with pytest.raises(ClassificationFailed) as failure:
        asyncio.run(scenario())
    assert failure.value.error_type is ErrorType.UNPARSEABLE_OUTPUT


class DownReasoner(LabelReasoner):
    """A reasoner whose fleet does not answer; its probe says whether it is back."""

    back = False

    async def classify(self, request: ClassifyRequest) -> Classification:
        self.asked.append(request.event.content)
        await asyncio.sleep(0.05)
        raise Unavailable("reasoner", "no endpoint answers")

    async def probe(self, dependency: str) -> bool | None:
        return self.back if dependency == "reasoner" else None


def test_a_reasoner_outage_reaches_every_identical_request_as_an_outage_and_the_probe_goes_through(tmp_path):
    store = PolicyStore(policy_dir(tmp_path, with_examples=False))  # nothing calibrated: all would escalate
    policy = store.get()["spam-scams"]
    raid = "join my server!!! discord.gg/raidraid"
    reasoner = DownReasoner({})

    async def scenario():
        cascade = make_cascade(CascadeSettings(), reasoner, store)
        await cascade.start()
        outcomes = await asyncio.gather(*(cascade.classify(request(policy, raid, i)) for i in range(5)),
                                        return_exceptions=True)  # fmt: skip
        down = await cascade.probe("reasoner")
        reasoner.back = True
        return outcomes, down, await cascade.probe("reasoner"), await cascade.probe("schema registry")

    outcomes, down, back, unknown = asyncio.run(scenario())
    assert reasoner.asked == [raid]  # coalesced: one request reached the reasoner
    assert all(isinstance(o, Unavailable) and o.dependency == "reasoner" for o in outcomes), outcomes
    assert (down, back, unknown) == (False, True, None)


def test_learning_from_the_reasoner_lowers_the_escalation_rate_over_a_stream(tmp_path, record_property):
    # The policy has only its five EXAMPLES: at first no stage is calibrated, so everything
    # goes to the reasoner; its verdicts train the lexical head, which then takes over.
    store = PolicyStore(policy_dir(tmp_path, with_examples=False))
    policy = store.get()["spam-scams"]
    stream = chat_stream(600, spam_share=0.3, seed=1)
    reasoner = LabelReasoner(dict(stream))

    async def scenario():
        cascade = make_cascade(CascadeSettings(cache=False, shadow_fraction=0), reasoner, store)
        await cascade.start()
        curve, wrong = [], 0
        for start in range(0, len(stream), 100):
            before = cascade.counters["spam-scams"].escalations if "spam-scams" in cascade.counters else 0
            for i, (text, label) in enumerate(stream[start : start + 100]):
                verdict = await cascade.classify(request(policy, text, start + i))
                wrong += verdict.violation != bool(label)
                await asyncio.sleep(0)  # refits run on a worker thread while events go on
            for stage in cascade.heads("spam-scams"):
                await stage.wait_idle()
            curve.append((cascade.counters["spam-scams"].escalations - before) / 100)
        return curve, wrong

    curve, wrong = asyncio.run(scenario())
    print("escalation rate per 100 events:", curve, "wrong cheap verdicts:", wrong)
    record_property("escalation_curve", curve)
    assert curve[0] > 0.5
    assert curve[-1] < curve[0] / 2
    assert wrong <= 0.05 * len(stream) * (1 - sum(curve) / len(curve))  # cheap verdicts stay >= 95% right


def test_shadow_sampling_sends_the_configured_fraction_and_counts_disagreements(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    stream = chat_stream(200, spam_share=0.3, seed=2)
    # The reasoner disagrees on every fifth message, so disagreements are known in advance.
    answers = {text: (1 - label if i % 5 == 0 else label) for i, (text, label) in enumerate(stream)}
    reasoner = LabelReasoner(answers)

    async def scenario():
        cascade = make_cascade(CascadeSettings(cache=False, shadow_fraction=0.25, refit_every=10_000),
                               reasoner, store)
        await cascade.start()
        verdicts = await classify_all(cascade, policy, [text for text, _ in stream])
        await cascade.close()  # waits for the shadow requests
        return cascade, verdicts

    cascade, verdicts = asyncio.run(scenario())
    counters = cascade.counters["spam-scams"]
    cheap = [(text, v) for (text, _), v in zip(stream, verdicts) if v.model == "cascade:lexical"]
    assert len(cheap) >= 50
    assert counters.shadow_sent == len(cheap) // 4 and counters.shadow_skipped == 0
    shadowed = {text for text in reasoner.asked} & {text for text, _ in cheap}
    assert len(shadowed) == counters.shadow_sent
    verdict_of = dict(cheap)
    expected_disagreements = sum(answers[text] != verdict_of[text].violation for text in shadowed)
    assert counters.shadow_disagreed == expected_disagreements
    assert counters.shadow_disagreement_rate == expected_disagreements / counters.shadow_sent


def test_without_a_reasoner_an_undecided_event_gets_the_best_calibrated_answer_marked_undecided(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    unclear = "i'm selling my old bike, message me if you're interested"

    async def scenario(mode: str):
        cascade = make_cascade(CascadeSettings(undecided=mode), None, store)
        await cascade.start()
        assert cascade.capacity().max_sequences == 1024
        return cascade, await cascade.classify(request(policy, unclear))

    cascade, verdict = asyncio.run(scenario("answer"))
    assert verdict.model == "cascade:lexical:undecided"
    assert 0.5 <= float(verdict.confidence) < 0.95
    assert "no reasoner" in verdict.rationale
    assert cascade.counters["spam-scams"].decided["undecided"] == 1
    assert len(cascade.cache) == 0  # a below-target answer is not reused
    with pytest.raises(ClassificationFailed) as failure:
        asyncio.run(scenario("dead_letter"))
    assert failure.value.error_type is ErrorType.CLASSIFIER_ERROR


def test_without_a_reasoner_or_a_calibrated_stage_nothing_is_answered(tmp_path):
    store = PolicyStore(policy_dir(tmp_path, with_examples=False))

    async def scenario():
        cascade = make_cascade(CascadeSettings(), None, store)
        await cascade.start()
        await cascade.classify(request(store.get()["spam-scams"], "FREE NITRO at discord-gift.xyz"))

    with pytest.raises(ClassificationFailed, match="no cascade stage is calibrated"):
        asyncio.run(scenario())


def test_learned_heads_survive_a_restart_and_are_discarded_when_the_policy_changes(tmp_path):
    folder = policy_dir(tmp_path, with_examples=False)
    state = tmp_path / "state"
    stream = chat_stream(120, spam_share=0.3, seed=3)
    settings = CascadeSettings(state_dir=state, cache=False, shadow_fraction=0)

    async def run_stream(store: PolicyStore, texts: list[str]):
        cascade = make_cascade(settings, LabelReasoner(dict(stream)), store)
        await cascade.start()
        verdicts = await classify_all(cascade, store.get()["spam-scams"], texts)
        await cascade.close()
        return cascade, verdicts

    first, _ = asyncio.run(run_stream(PolicyStore(folder), [text for text, _ in stream[:100]]))
    # Every escalated event teaches the head; how many escalate depends on when the background
    # refit makes the head confident, so count what was learned rather than assume all 100.
    learned = first.counters["spam-scams"].learned
    assert learned > 20
    assert first.heads("spam-scams")[0].examples == 5 + learned
    (saved,) = state.glob("heads/*/lexical.npz")  # one set of heads, named by its training data

    async def restarted():
        cascade = make_cascade(settings, LabelReasoner(dict(stream)), PolicyStore(folder))
        await cascade.start()
        return cascade

    again = asyncio.run(restarted())
    (stage,) = again.heads("spam-scams")
    assert stage.examples == 5 + learned and stage.calibrated  # reloaded, no reasoner verdict needed

    # The text the reasoner reads: an edit of the front matter alone (actions, categories) keeps the heads.
    edited = (folder / "spam-scams.md").read_text().replace("Lookalike domain:", "Look-alike domain:")
    (folder / "spam-scams.md").write_text(edited)
    after_edit = asyncio.run(restarted())
    (stage,) = after_edit.heads("spam-scams")
    assert stage.examples == 5 and not stage.calibrated
    assert stage.version != saved.parent.name  # the edited text's heads start from its examples


def test_a_policy_edit_while_running_retrains_the_heads_from_the_examples(tmp_path):
    folder = policy_dir(tmp_path)
    store = PolicyStore(folder)
    stream = chat_stream(60, spam_share=0.3, seed=4)

    async def scenario():
        cascade = make_cascade(CascadeSettings(cache=False, shadow_fraction=0), LabelReasoner(dict(stream)), store)
        await cascade.start()
        old = store.get()["spam-scams"]
        await classify_all(cascade, old, [text for text, _ in stream])
        learned = cascade.heads("spam-scams")[0].examples
        edited = (folder / "spam-scams.md").read_text().replace("Lookalike domain:", "Look-alike domain:")
        (folder / "spam-scams.md").write_text(edited)
        assert store.reload()
        new = store.get()["spam-scams"]
        await cascade.classify(request(new, stream[0][0]))
        return old, new, learned, cascade.heads("spam-scams")[0].examples

    old, new, learned, after = asyncio.run(scenario())
    examples = 5 + len((REPO / "policies" / "spam-scams.examples.jsonl").read_text().splitlines())
    assert old.version != new.version
    assert learned > examples and after == examples


def test_a_batch_decided_at_once_gets_the_answers_one_at_a_time_would(tmp_path):
    """`classify_now_many` (a poll batch) answers as `classify` does request by request: same
    verdicts, copies of one content decided once, failures returned per request."""
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    texts = [text for text, _ in chat_stream(120, 0.3, seed=5)]
    texts += [texts[0], texts[0].upper(), texts[1]]  # copies inside the batch

    async def scenario(batch: bool, undecided: str = "answer"):
        cascade = make_cascade(CascadeSettings(undecided=undecided), None, store)
        await cascade.start()
        requests = [request(policy, text, i) for i, text in enumerate(texts)]
        if batch:
            return cascade, cascade.classify_now_many(requests)
        outcomes: list[object] = []
        for r in requests:
            try:
                outcomes.append(await cascade.classify(r))
            except ClassificationFailed as exc:
                outcomes.append(exc)
        return cascade, outcomes

    (batched, at_once), (_, one_by_one) = asyncio.run(scenario(True)), asyncio.run(scenario(False))
    assert None not in at_once  # without a reasoner, the lexical stage answers everything on the loop
    for a, b in zip(at_once, one_by_one):
        assert isinstance(a, Classification) and isinstance(b, Classification)
        assert (a.violation, a.confidence, a.stage if a.stage != "cache" else b.stage) == (b.violation, b.confidence, b.stage)
    counters = batched.counters["spam-scams"]
    assert counters.requests == len(texts)
    assert sum(counters.decided.values()) == len(texts)
    assert counters.decided["lexical"] + counters.decided["undecided"] < len(texts)  # the copies were not scored
    _, failed = asyncio.run(scenario(True, undecided="dead_letter"))
    assert any(isinstance(f, ClassificationFailed) for f in failed)
    assert all(isinstance(f, ClassificationFailed) == (b.stage == "undecided") for f, b in zip(failed, one_by_one))


def test_a_batch_leaves_what_needs_the_reasoner_to_classify_without_scoring_it_twice(tmp_path):
    store = PolicyStore(policy_dir(tmp_path))
    policy = store.get()["spam-scams"]
    stream = chat_stream(60, 0.3, seed=9)
    reasoner = LabelReasoner(dict(stream))

    async def scenario():
        cascade = make_cascade(CascadeSettings(shadow_fraction=0), reasoner, store)
        await cascade.start()
        requests = [request(policy, text, i) for i, (text, _) in enumerate(stream)]
        answers = cascade.classify_now_many(requests)
        stage = cascade.heads(policy.id)[0]
        scored = []
        original = stage.decide

        async def counting(text: str, target: float):
            scored.append(text)
            return await original(text, target)

        stage.decide = counting  # type: ignore[method-assign]
        later = [await cascade.classify(r) for r, a in zip(requests, answers) if a is None]
        await cascade.close()
        return answers, later, scored

    answers, later, scored = asyncio.run(scenario())
    assert answers.count(None) == len(later) == len(reasoner.asked) > 0
    assert scored == []  # the lexical stage was asked once, in the batch
    assert all(v.stage == "reasoner" for v in later)
    assert all(a.stage == "lexical" for a in answers if a is not None)
