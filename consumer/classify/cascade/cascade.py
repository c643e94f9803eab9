"""`CascadeClassifier`: cache -> lexical -> embedding -> reasoner, behind the `Classifier` Protocol.

What it guarantees, per request:
- the verdict names the stage that decided in `model`: `cascade:cache`, `cascade:lexical`,
  `cascade:embedding`, or the reasoner's own model name; a cheap stage's `confidence` is its
  calibrated probability (as text, e.g. "0.972");
- a cheap stage decides only where its calibrated confidence reaches the policy's target
  precision; otherwise the request goes to the reasoner, and the reasoner's failure is the
  request's failure (`ClassificationFailed`, a dead letter), never a silent cheap answer;
- without a reasoner, a request no stage decides is answered by the most confident
  calibrated stage, marked `cascade:<stage>:undecided` with its real confidence (or, with
  `undecided: dead_letter`, fails as `classifier_error`); with no calibrated stage at all it
  fails: nothing is answered that no stage can back with a calibrated probability; where the
  lexical stage is the only stage asked, an ASCII text's undecided answer is kept by its cache
  digest and the weights in force (`UndecidedAnswers`), and its copies in later batches get it
  without reaching the stage;
- identical content (after normalisation) under the same policy version is sent to the
  reasoner once, even when the copies arrive together;
- a poll batch is decided a batch at a time (`classify_now_many`): per policy, one pass of
  cache keys (cache keys stay per policy version); then per stage whose features are cheap
  enough for the event loop (the lexical stage) and per set of heads one scoring of every
  text still open in the batch (the compiled n-grams score texts without making their rows, and
  not again an ASCII text a head scored in an earlier batch: `ScoreMemo`; else one
  vectorisation per stage and one matrix product per set of heads) and one
  calibration call, each request decided against its own policy's target precision; what
  remains goes through `classify` without repeating those stages, and what `classify` asks of
  an instant stage in one turn of the event loop is decided together the same way;
- a policy's heads are trained from its examples on its first request (the platform's
  policies, those without a community, at `start`), once however many requests ask at once;
  policies with the same text, reasoning effort and examples share one set of heads; a
  policy's heads are trained anew when that changes, and learn from every reasoner verdict;
- at most `max_trained_policies` sets of heads are held: the least recently used is evicted
  beyond it (saved to `state_dir` when set, and restored from there, not retrained, when its
  policy is asked again).

Counters are plain attributes (`counters`, per policy id: what the metrics exporter reads);
everything else of a policy (heads, cache keys, shadow sampling) is by `Policy.key`, unique
where two communities use one id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumer import stages
from consumer.classify import (
    Capacity,
    Classification,
    ClassificationFailed,
    Classifier,
    ClassifyRequest,
    ProbesDependency,
    ReportsHealth,
)
from consumer.classify.cascade import verdicts
from consumer.classify.cascade.cache import CacheKey, UndecidedAnswers, VerdictCache, cache_key, cache_keys
from consumer.classify.cascade.counters import PolicyCounters
from consumer.classify.cascade.examples import TrainingSet, training_set
from consumer.classify.cascade.stage import Decision, Featurizer, LearnedStage, ScoreMemo, StageRules
from consumer.config.cascade import CascadeSettings, PolicyPlan
from consumer.errors import Fatal, Unavailable
from consumer.events import ErrorType
from consumer.policy import Policy, PolicyStore

log = logging.getLogger(__name__)

# How many reasoner labels one person's decision is worth to the heads: it is learned this
# many times (a weight by repetition; the heads' online updates take no sample weights).
HUMAN_LABEL_WEIGHT = 3


@dataclass
class _Heads:
    key: str  # the version of the training data they were trained from (`TrainingSet.version`)
    stages: list[LearnedStage]


@dataclass(slots=True)
class _Open:
    """What `classify_now_many` found for a request it leaves to `classify`: the stages it
    already asked, so that `classify` asks only the others."""

    request: ClassifyRequest
    heads: _Heads  # the heads that answered (evicted and trained again since: asked again)
    asked: int  # how many of the policy's stages gave `best` already
    best: tuple[LearnedStage, Decision] | None


@dataclass(slots=True)
class _Share:
    """One policy's requests in a poll batch, while `classify_now_many` decides them."""

    policy: Policy
    plan: PolicyPlan
    counters: PolicyCounters
    heads: _Heads
    asked: int  # the position of the first stage left to `classify` (all stages: none left)
    stopped: bool = False  # reached a stage that is not instant: the rest are `classify`'s
    # Copies of one content share one decision: open[key] lists the requests behind it; keys[key]
    # is its cache key (None without a cache), best[key] the most confident undecided answer.
    open: dict[CacheKey | int, list[int]] = dataclasses.field(default_factory=dict)
    keys: dict[CacheKey | int, CacheKey | None] = dataclasses.field(default_factory=dict)
    best: dict[CacheKey | int, tuple[LearnedStage, Decision]] = dataclasses.field(default_factory=dict)
    # Where `UndecidedAnswers` applies (`_undecided_state`): the state its answers are held in.
    undecided_state: Hashable | None = None


def _instant_decisions(
    featurizer: Featurizer, asked: list[tuple[LearnedStage, list[str], list[float], list[CacheKey | int] | None]],
    memo: ScoreMemo | None = None,
) -> list[list[Decision] | None]:
    """Each stage's decisions of its texts (None: not calibrated), the stages all of this
    featurizer: where it scores texts without making their rows (`scores_texts`, the lexical
    stage's compiled n-grams: counts and product in one pass, no matrix), one pass per stage over
    the texts `memo` holds no score of (by the `_memo_digests` of their cache keys, where given);
    else one vectorisation of all the texts and one product per stage."""
    if getattr(featurizer, "scores_texts", False):
        return [
            stage.decide_texts(texts, targets, None if keys is None else _memo_digests(keys, texts), memo)
            for stage, texts, targets, keys in asked
        ]
    rows = featurizer.transform([text for _, texts, _, _ in asked for text in texts])
    found, start = [], 0
    for stage, texts, targets, _ in asked:
        end = start + len(texts)
        found.append(stage.decide_rows(rows if (start, end) == (0, rows.shape[0]) else rows[start:end], targets))
        start = end
    return found


def _memo_digests(keys: list[CacheKey | int], texts: list[str]) -> list[bytes | None]:
    """The digests a `ScoreMemo` knows these texts by: each one's cache key's, for an ASCII text.
    The lexical n-grams (the only features scored from texts, `scores_texts`) are read from the
    text's words lower-cased and joined by single spaces, the very form the cache key hashes for
    ASCII text (`cache.normalise`), so one digest is one set of features. Not for other text: the
    key hashes its NFKC, case-folded form without invisible characters, which the n-grams do not
    see. None without a cache key (an index)."""
    return [key[2] if type(key) is tuple and text.isascii() else None for key, text in zip(keys, texts)]


def _better(
    best: tuple[LearnedStage, Decision] | None, stage: LearnedStage, decision: Decision
) -> tuple[LearnedStage, Decision]:
    """The more confident of the best undecided answer so far and this stage's."""
    if best is None or decision.confidence > best[1].confidence:
        return stage, decision
    return best


# Sets of heads trained at once. A poll batch may ask for hundreds of untrained policies; trained
# all together, they all end late (measured: the first verdict after 16 s instead of about 1 s,
# docs/cascade.md); in turns, the first asked are ready first.
TRAINING_AT_ONCE = os.cpu_count() or 2

# Requests `classify_now_many` left open that `classify` has not taken yet (at most about the
# intake limit; beyond this many the oldest are forgotten, which costs them their stages again).
MAX_OPEN = 20_000
# Policy plans kept (`_plan`): one per policy id and own precision, a few hundred bytes each.
MAX_PLANS = 100_000

class CascadeClassifier:
    name = "cascade"

    def __init__(
        self,
        settings: CascadeSettings,
        reasoner: Classifier | None,
        policies: PolicyStore | None = None,
        lexical: Featurizer | None = None,
        embedding: Featurizer | None = None,
    ):
        self.settings = settings
        self.reasoner = reasoner
        self._policies = policies
        self._featurizers = {name: f for name, f in zip(stages.LEARNED, (lexical, embedding)) if f is not None}
        self._rules = StageRules.of(settings)
        self._plans: dict[tuple[str, float | None], PolicyPlan] = {}  # `_plan`'s, by (policy id, its own precision)
        self.cache = VerdictCache(settings.cache_size, settings.cache_ttl_s)
        self._scored = ScoreMemo()  # the instant stages' scores of repeated texts, by head
        # Without a reasoner, the answers to repeated texts that no stage decides.
        self._undecided_answers = UndecidedAnswers() if reasoner is None else None
        self.counters: dict[str, PolicyCounters] = {}
        self._heads: OrderedDict[str, _Heads] = OrderedDict()  # by training data; least recently used first
        self._assigned: dict[str, tuple[str, str]] = {}  # Policy.key -> (its version, its heads' key)
        # What is being made now, so that concurrent first requests wait for one making.
        self._resolving: dict[Hashable, asyncio.Task[_Heads]] = {}  # by (Policy.key, version)
        self._training: dict[Hashable, asyncio.Task[_Heads]] = {}  # by heads' key
        self._training_slots = asyncio.Semaphore(TRAINING_AT_ONCE)
        self._in_flight: dict[CacheKey, asyncio.Future[Classification]] = {}
        self._reasoner_slots: asyncio.Semaphore | None = None
        self._shadows: set[asyncio.Task[None]] = set()
        self._shadow_ticks: dict[str, int] = {}
        # ReportsDisagreements: set by the pipeline when disagreements open reviews.
        self.on_disagreement: Callable[[ClassifyRequest, Classification, Classification], None] | None = None
        self._open: dict[int, _Open] = {}  # id(request) -> what its batch found
        # Instant stages' decisions asked by `classify` in this turn of the loop (`_decide_soon`).
        self._soon: list[tuple[LearnedStage, str, float, asyncio.Future[Decision | None]]] = []

    # -- Classifier Protocol -----------------------------------------------------------------

    async def start(self) -> None:
        if self.reasoner is not None:
            await self.reasoner.start()
            self._reasoner_slots = asyncio.Semaphore(self.reasoner.capacity().max_sequences)
        for featurizer in self._featurizers.values():
            start = getattr(featurizer, "start", None)
            if start is not None:
                await start()
        if self._policies is not None:
            # The platform's policies are ready before the first event; a community's policy is
            # trained on its first request (thousands of communities would take minutes here).
            for policy in self._policies.get().values():
                if policy.community is None:
                    await self._heads_for(policy)

    def capacity(self) -> Capacity:
        # Cheap stages must not queue behind slow reasoner calls, so the cascade admits its
        # own concurrency on top of the reasoner's; reasoner calls are held to its capacity.
        if self.reasoner is None:
            return Capacity(max_sequences=self.settings.max_concurrency)
        inner = self.reasoner.capacity()
        return Capacity(max_sequences=inner.max_sequences + self.settings.max_concurrency, max_tokens=inner.max_tokens)

    def classify_now(self, request: ClassifyRequest) -> Classification | None:
        """A cache hit, answered without queueing; None sends the request through `classify`."""
        policy = request.policy
        if not self._plan(policy).cache:
            return None
        cached = self.cache.get(cache_key(policy, request.content))
        if cached is not None:
            counters = self._counters(policy.id)
            counters.requests += 1
            counters.cache_hit()
        return cached

    def classify_now_many(self, requests: Sequence[ClassifyRequest]) -> list[Classification | ClassificationFailed | None]:
        """The batch's answers from the cache and the stages cheap enough for the event loop;
        None for a request that needs a slower stage or the reasoner (`classify` takes it from
        where this left off), or whose policy's heads are not trained yet."""
        answers: list[Classification | ClassificationFailed | None] = [None] * len(requests)
        by_policy: dict[tuple[str, str], list[int]] = {}
        for i, request in enumerate(requests):
            # By key, not ref: two communities' policies may have one id and one version.
            by_policy.setdefault((request.policy.key, request.policy.version), []).append(i)
        # The policies' shares by the heads they use: policies trained from the same data (a
        # thousand communities adopting one template) are one matrix product, not a thousand.
        by_heads: dict[str, tuple[_Heads, list[_Share]]] = {}
        for indices in by_policy.values():
            policy = requests[indices[0]].policy
            heads = self._current(policy)
            if heads is None:
                continue  # trained (or restored) in `classify`, off the loop
            share = self._after_cache(requests, indices, heads, answers)
            if share.open:
                by_heads.setdefault(heads.key, (heads, []))[1].append(share)
        if by_heads:
            self._decide_instant(requests, list(by_heads.values()), answers)
        return answers

    def _after_cache(
        self, requests: Sequence[ClassifyRequest], indices: list[int], heads: _Heads,
        answers: list[Classification | ClassificationFailed | None],
    ) -> _Share:  # fmt: skip
        """One policy's share of a batch after its cache pass: what the stages still have to answer."""
        policy = requests[indices[0]].policy
        plan = self._plan(policy)
        share = _Share(policy, plan, self._counters(policy.id), heads, asked=len(heads.stages))
        open_, keys = share.open, share.keys
        if not plan.cache:
            for i in indices:
                open_[i] = [i]
                keys[i] = None
            return share
        # Looked up once, not once a request: this loop runs for every request of a poll batch.
        cached_verdict, in_flight = self.cache.get, self._in_flight
        state = share.undecided_state = self._undecided_state(policy, plan, heads)
        undecided = {} if state is None else self._undecided_answers.known(state)  # type: ignore[union-attr]
        contents = [requests[i].content for i in indices]
        hits = repeated = 0  # counted once after the loop
        # Cache keys stay per policy version: two policies sharing heads act and name categories
        # differently.
        for i, content, key in zip(indices, contents, cache_keys(policy, contents)):
            copies = open_.get(key)
            if copies is not None:
                copies.append(i)
                continue
            cached = cached_verdict(key)
            if cached is not None:
                hits += 1
                answers[i] = cached
            elif undecided and (answer := undecided.get(key[2])) is not None and content.isascii():
                repeated += 1
                answers[i] = answer
            elif key not in in_flight:  # else `classify` waits for the identical request already asked
                open_[key] = [i]
                keys[key] = key
        counters = share.counters
        counters.requests += hits + repeated
        counters.cache_hit(hits)
        # A repeated undecided answer, counted as `_leave_open` counts the answer it repeats.
        counters.cache_misses += repeated
        counters.decided[stages.UNDECIDED] += repeated
        return share

    def _decide_instant(
        self, requests: Sequence[ClassifyRequest], groups: list[tuple[_Heads, list[_Share]]],
        answers: list[Classification | ClassificationFailed | None],
    ) -> None:  # fmt: skip
        """The instant stages, in cascade order, for every share still open: per stage and set of
        heads one pass over their open texts (`_instant_decisions`) and one calibration call, each
        request against its own policy's target precision."""
        for position, featurizer in enumerate(self._featurizers.values()):
            asking: list[tuple[LearnedStage, list[tuple[_Share, CacheKey | int]], bool]] = []
            for heads, shares in groups:
                stage = heads.stages[position]
                these = []
                # Whether a score kept (`ScoreMemo`) could be read again: not where every share keeps
                # its undecided answers (a text decided is cached, one undecided kept as an answer).
                rescored = False
                for share in shares:
                    if share.stopped or not share.open or not getattr(share.plan, stage.name):
                        continue
                    if not featurizer.instant:
                        share.asked = position  # this stage and the rest are asked in `classify`, off the loop
                        share.stopped = True
                        continue
                    if stage.calibrated:
                        these.extend((share, k) for k in share.open)
                        rescored = rescored or share.undecided_state is None
                if these:
                    asking.append((stage, these, rescored))
            if not asking:
                continue
            asked = []
            for stage, these, rescored in asking:
                texts = [requests[share.open[k][0]].content for share, k in these]
                asked.append((stage, texts, [share.plan.target_precision for share, _ in these],
                              [k for _, k in these] if rescored else None))  # fmt: skip
            found = _instant_decisions(featurizer, asked, self._scored)
            for (stage, these, _), decisions in zip(asking, found):
                if decisions is None:
                    continue
                for (share, k), decision in zip(these, decisions):
                    if decision.decided:
                        self._take(requests, share, k, stage, decision, answers)
                    else:  # the best undecided answer so far (inline: most of a batch, in a chat stream)
                        best = share.best.get(k)
                        if best is None or decision.confidence > best[1].confidence:
                            share.best[k] = (stage, decision)
        for _, shares in groups:
            for share in shares:
                self._leave_open(requests, share, answers)

    def _take(
        self, requests: Sequence[ClassifyRequest], share: _Share, k: CacheKey | int, stage: LearnedStage,
        decision: Decision, answers: list[Classification | ClassificationFailed | None],
    ) -> None:  # fmt: skip
        """A stage's decision that reached its target, for one open content of a share: its answer."""
        first, *copies = share.open.pop(k)
        counters = share.counters
        counters.requests += 1 + len(copies)
        counters.cache_misses += share.keys[k] is not None
        verdict = self._decided_by(stage, decision, requests[first], share.plan, counters, share.keys[k])
        answers[first] = verdict
        for i in copies:
            counters.coalesced_copy()
            answers[i] = verdicts.as_cached(verdict)

    def _leave_open(
        self, requests: Sequence[ClassifyRequest], share: _Share,
        answers: list[Classification | ClassificationFailed | None],
    ) -> None:  # fmt: skip
        """What no instant stage decided: answered undecided where nothing else is left to ask,
        else remembered for `classify` with what was found."""
        counters = share.counters
        if share.asked == len(share.heads.stages) and self.reasoner is None:
            state, fresh = share.undecided_state, {}
            for k, waiting in share.open.items():
                counters.requests += len(waiting)
                counters.cache_misses += share.keys[k] is not None
                # One answer for all the copies: a stage's answers are shared objects anyway, and a
                # failure is only read (each copy becomes a dead letter with its reason).
                answer: Classification | ClassificationFailed
                try:
                    answer = self._undecided(share.policy, share.plan, counters, share.best.get(k), len(waiting))
                except ClassificationFailed as exc:
                    answer = exc
                for i in waiting:
                    answers[i] = answer
                # Not a failure (`undecided: dead_letter`): its traceback holds this batch.
                if (
                    state is not None and type(answer) is Classification and share.keys[k] is not None
                    and requests[waiting[0]].content.isascii()
                ):  # fmt: skip
                    fresh[k[2]] = answer  # type: ignore[index]
            if fresh:
                self._undecided_answers.remember(state, fresh)  # type: ignore[union-attr]
            return
        for k, waiting in share.open.items():
            # The first of the copies carries what was found; the others wait for it in `classify`.
            self._remember_open(_Open(requests[waiting[0]], share.heads, share.asked, share.best.get(k)))

    def _undecided_state(self, policy: Policy, plan: PolicyPlan, heads: _Heads) -> Hashable | None:
        """The state `UndecidedAnswers` holds this policy's answers in (its key and version, and the
        weights in force of each stage its plan asks), or None where it does not apply: a reasoner
        is configured, the cache is off (no digests), or a stage the plan asks reads more of a text
        than its cache key's digest stands for (only the compiled n-grams read just the ASCII
        normal form the digest hashes: `_memo_digests`)."""
        if self._undecided_answers is None or not plan.cache:
            return None
        serials = []
        for _, stage in self._stages(heads, plan, 0):
            if not getattr(stage.featurizer, "scores_texts", False):
                return None
            serials.append(stage.weights_serial)
        return policy.key, policy.version, tuple(serials)

    def _remember_open(self, found: _Open) -> None:
        self._open[id(found.request)] = found
        if len(self._open) > MAX_OPEN:
            del self._open[next(iter(self._open))]

    async def classify(self, request: ClassifyRequest) -> Classification:
        policy = request.policy
        plan = self._plan(policy)
        counters = self._counters(policy.id)
        counters.requests += 1
        found = self._open.pop(id(request), None)
        if found is not None and found.request is not request:
            found = None  # another request that reused a forgotten one's id
        if not plan.cache:
            return await self._decide(request, plan, counters, None, found)
        key = cache_key(policy, request.content)
        cached = self.cache.get(key)
        if cached is not None:
            counters.cache_hit()
            return cached
        counters.cache_misses += 1
        waiting = self._in_flight.get(key)
        if waiting is not None:
            verdict = await asyncio.shield(waiting)
            counters.coalesced_copy()
            return verdicts.as_cached(verdict)
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            verdict = await self._decide(request, plan, counters, key, found)
        except BaseException as exc:
            # An outage (or a dead engine) reaches the copies as what it is: they wait (or stop) too.
            passed_on = (ClassificationFailed, Unavailable, Fatal)
            future.set_exception(exc if isinstance(exc, passed_on) else ClassificationFailed(
                ErrorType.CLASSIFIER_ERROR, f"identical request failed: {type(exc).__name__}"))
            future.exception()  # retrieved: copies may not be waiting
            raise
        else:
            future.set_result(verdict)
            return verdict
        finally:
            del self._in_flight[key]

    async def check_health(self) -> None:
        """The reasoner's health, where it reports one: the cheap stages have none to lose."""
        if isinstance(self.reasoner, ReportsHealth):
            await self.reasoner.check_health()

    async def probe(self, dependency: str) -> bool | None:
        """The reasoner's own probe of what it found down (the cheap stages depend on nothing)."""
        if isinstance(self.reasoner, ProbesDependency):
            return await self.reasoner.probe(dependency)
        return None

    async def close(self) -> None:
        for task in list(self._shadows):
            task.cancel()
        await asyncio.gather(*self._shadows, return_exceptions=True)
        for heads in list(self._heads.values()):
            for stage in heads.stages:
                await stage.wait_idle()
        self.save()
        if self.reasoner is not None:
            await self.reasoner.close()

    # -- the cascade ---------------------------------------------------------------------------

    async def _decide(
        self, request: ClassifyRequest, plan: PolicyPlan, counters: PolicyCounters, key: CacheKey | None,
        found: _Open | None = None,
    ) -> Classification:  # fmt: skip
        heads = await self._heads_for(request.policy)
        best: tuple[LearnedStage, Decision] | None = None
        asked = 0
        if found is not None and found.heads is heads:
            best, asked = found.best, found.asked  # the stages its poll batch asked already
        for _, stage in self._stages(heads, plan, asked):
            decision = await self._decide_soon(stage, request.content, plan.target_precision)
            if decision is None:
                continue
            if decision.decided:
                return self._decided_by(stage, decision, request, plan, counters, key)
            best = _better(best, stage, decision)
        if self.reasoner is None:
            return self._undecided(request.policy, plan, counters, best)
        counters.escalations += 1
        verdict = await self._ask_reasoner(request)
        counters.decided[stages.REASONER] += 1
        if key is not None:
            self.cache.put(key, verdict)
        await self._learn(request.policy, request.content, verdict, counters)
        return verdict

    async def _decide_soon(self, stage: LearnedStage, text: str, target_precision: float) -> Decision | None:
        """`stage.decide`; for an instant stage, together with every other request of `classify`
        that asks one in the same turn of the event loop. The requests a poll batch left open
        because their heads were not trained yet are released together when the heads are: alone,
        each would cost a vectorisation and a product of its own (measured: 12,600 of the
        communities bench's 20,000 events, docs/cascade.md)."""
        if not stage.featurizer.instant:
            return await stage.decide(text, target_precision)
        future: asyncio.Future[Decision | None] = asyncio.get_running_loop().create_future()
        if not self._soon:
            asyncio.get_running_loop().call_soon(self._decide_together)
        self._soon.append((stage, text, target_precision, future))
        return await future

    def _decide_together(self) -> None:
        """What `_decide_soon` gathered, per featurizer `_instant_decisions` of each stage's texts."""
        asked, self._soon = self._soon, []
        by_featurizer: dict[int, dict[int, list[tuple[LearnedStage, str, float, asyncio.Future[Decision | None]]]]] = {}
        for entry in asked:
            by_featurizer.setdefault(id(entry[0].featurizer), {}).setdefault(id(entry[0]), []).append(entry)
        for by_stage in by_featurizer.values():
            groups = list(by_stage.values())
            try:
                found = _instant_decisions(groups[0][0][0].featurizer, [
                    (group[0][0], [text for _, text, _, _ in group], [target for _, _, target, _ in group], None)
                    for group in groups
                ])  # fmt: skip
                for group, decisions in zip(groups, found):
                    for i, (_, _, _, future) in enumerate(group):
                        if not future.done():  # its request may have been cancelled meanwhile
                            future.set_result(None if decisions is None else decisions[i])
            except Exception as exc:  # noqa: BLE001 - the requests asking fail as their own decide would
                for group in groups:
                    for _, _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)

    @staticmethod
    def _stages(heads: _Heads, plan: PolicyPlan, start: int) -> Iterator[tuple[int, LearnedStage]]:
        """The stages the policy's plan runs, in cascade order, from position `start` on (the
        stages before it were asked already), each with its position."""
        for position in range(start, len(heads.stages)):
            stage = heads.stages[position]
            if getattr(plan, stage.name):
                yield position, stage

    def _decided_by(
        self, stage: LearnedStage, decision: Decision, request: ClassifyRequest, plan: PolicyPlan,
        counters: PolicyCounters, key: CacheKey | None,
    ) -> Classification:  # fmt: skip
        """A cheap stage's decision at the target precision: counted, cached, maybe shadowed."""
        counters.decided[stage.name] += 1
        verdict = verdicts.cheap(stage.name, decision, plan.target_precision)
        if key is not None:
            self.cache.put(key, verdict)
        self._maybe_shadow(request, plan, counters, verdict, key)
        return verdict

    async def _ask_reasoner(self, request: ClassifyRequest) -> Classification:
        assert self.reasoner is not None and self._reasoner_slots is not None
        async with self._reasoner_slots:
            verdict = await self.reasoner.classify(request)
        return dataclasses.replace(verdict, stage=stages.REASONER)

    def _undecided(
        self, policy: Policy, plan: PolicyPlan, counters: PolicyCounters, best: tuple[LearnedStage, Decision] | None,
        copies: int = 1,
    ) -> Classification:  # fmt: skip
        """The answer to `copies` identical requests that no stage decided and nothing else can."""
        if best is None:
            raise ClassificationFailed(
                ErrorType.CLASSIFIER_ERROR,
                f"no cascade stage is calibrated for policy {policy.key} and no reasoner is configured",
            )
        stage, decision = best
        if self.settings.undecided == "dead_letter":
            raise ClassificationFailed(
                ErrorType.CLASSIFIER_ERROR,
                f"cascade stage {stage.name} is below the target precision for policy {policy.key} "
                "and no reasoner is configured",
            )
        counters.decided[stages.UNDECIDED] += copies
        return verdicts.undecided(stage.name, decision, plan.target_precision)

    async def _learn(self, policy: Policy, content: str, verdict: Classification, counters: PolicyCounters) -> None:
        heads = self._current(policy)
        if heads is None:
            return  # an older version's verdict teaches new heads nothing; evicted heads learn nothing
        for stage in heads.stages:
            await stage.learn(content, int(verdict.violation))
        counters.learned += 1
        self._record_calibration(policy.id, heads)

    # -- shadow sampling -----------------------------------------------------------------------

    def _maybe_shadow(
        self, request: ClassifyRequest, plan: PolicyPlan, counters: PolicyCounters, verdict: Classification,
        key: CacheKey | None,
    ) -> None:
        if self.reasoner is None or plan.shadow_fraction <= 0:
            return
        # Exactly the configured share of decisions, spread evenly: the n-th decision is
        # sampled when floor(n * fraction) steps up.
        tick = self._shadow_ticks.get(request.policy.key, 0) + 1
        self._shadow_ticks[request.policy.key] = tick
        if math.floor(tick * plan.shadow_fraction) == math.floor((tick - 1) * plan.shadow_fraction):
            return
        assert self._reasoner_slots is not None
        if len(self._shadows) >= self.reasoner.capacity().max_sequences:
            counters.shadow_skipped += 1  # never let measuring delay escalated events
            return
        counters.shadow_sent += 1
        task = asyncio.get_running_loop().create_task(self._shadow(request, counters, verdict, key))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, request: ClassifyRequest, counters: PolicyCounters, cheap: Classification, key: CacheKey | None
    ) -> None:
        try:
            verdict = await self._ask_reasoner(request)
        except (ClassificationFailed, Unavailable, Fatal):  # a shadow check is optional: skipped, never a record's
            counters.shadow_failed += 1
            return
        if verdict.violation != cheap.violation:
            counters.shadow_disagreed += 1
            if key is not None:
                self.cache.put(key, verdict)  # later copies get the reasoner's answer
            if self.on_disagreement is not None:
                self.on_disagreement(request, cheap, verdict)
        await self._learn(request.policy, request.content, verdict, counters)

    # -- learning from people ------------------------------------------------------------------

    async def learn_from_review(
        self, request: ClassifyRequest, answer: Classification, heads: bool = True, corrects: bool = False
    ) -> None:
        """LearnsFromReview: the cache answers this content with the person's answer from now on
        (under the same policy version), and the heads learn it HUMAN_LABEL_WEIGHT times, in
        force within two refits whether or not any traffic follows (`LearnedStage`); an overturn
        (`corrects`) first drops the heads' examples of this content under the other label."""
        policy = request.policy
        if self._plan(policy).cache:
            self.cache.pin(cache_key(policy, request.content), answer)
        if not heads:
            return
        counters = self._counters(policy.id)
        current = self._current(policy)
        if current is None:
            return
        for i in range(HUMAN_LABEL_WEIGHT):
            for stage in current.stages:
                await stage.learn(request.content, int(answer.violation), urgent=True, corrects=corrects and i == 0)
        counters.learned_human += 1
        self._record_calibration(policy.id, current)

    # -- heads per policy ----------------------------------------------------------------------

    def _plan(self, policy: Policy) -> PolicyPlan:
        # A policy's own target precision (a community's override) where the policy has one.
        # Made once per policy id and precision: asked for each policy of every batch, and a
        # plan made anew (an overrides model and a frozen dataclass) cost more than the lookup.
        key = (policy.id, getattr(policy, "target_precision", None))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # ids and precisions that churn: made again on demand
            plan = self._plans[key] = self.settings.plan_for(*key)
        return plan

    def _current(self, policy: Policy) -> _Heads | None:
        """The heads in force for this version of the policy, if trained and held (and then the
        most recently used); None sends the request to `_heads_for`."""
        assigned = self._assigned.get(policy.key)
        if assigned is None or assigned[0] != policy.version:
            return None
        heads = self._heads.get(assigned[1])
        if heads is not None:
            self._heads.move_to_end(assigned[1])
        return heads

    async def _heads_for(self, policy: Policy) -> _Heads:
        # Keyed by the policy version alone: the examples file is read when a version is first
        # seen (or its heads were evicted), and its edits count from then.
        heads = self._current(policy)
        if heads is not None:
            return heads
        return await _once(self._resolving, (policy.key, policy.version), lambda: self._resolve(policy))

    async def _resolve(self, policy: Policy) -> _Heads:
        data = await asyncio.to_thread(training_set, policy)
        heads = self._heads.get(data.version)
        if heads is None:
            heads = await _once(self._training, data.version, lambda: self._train(data, policy))
        else:
            self._heads.move_to_end(data.version)  # another policy's, with the same training data
        self._assigned[policy.key] = (policy.version, data.version)
        self._record_calibration(policy.id, heads)
        return heads

    async def _train(self, data: TrainingSet, policy: Policy) -> _Heads:
        """Heads for this training data: restored from `state_dir` where saved, else trained."""
        stages, restored = [], []
        async with self._training_slots:
            for name, featurizer in self._featurizers.items():
                stage = LearnedStage(featurizer, self._rules, data.version)
                if self.settings.state_dir is not None and stage.restore(self._state_path(data.version, name)):
                    restored.append(name)
                await stage.train(data.texts, data.labels)
                stages.append(stage)
        heads = _Heads(data.version, stages)
        self._heads[data.version] = heads
        while len(self._heads) > self.settings.max_trained_policies:
            _, evicted = self._heads.popitem(last=False)
            self._save(evicted)  # a refit it runs still ends, in the evicted copy only
        log.info(
            "cascade heads %s for %s@%s: %s", data.version, policy.key, policy.version,
            ", ".join(f"{s.name} {'calibrated' if s.calibrated else 'not calibrated'} on {s.examples} examples"
                      f"{' (restored)' if s.name in restored else ''}" for s in stages) or "no learned stages",
        )  # fmt: skip
        return heads

    def save(self) -> None:
        """Write every held set of heads under `state_dir` (also done by `close` and on eviction)."""
        for heads in self._heads.values():
            self._save(heads)

    def _save(self, heads: _Heads) -> None:
        if self.settings.state_dir is not None:
            for stage in heads.stages:
                stage.save(self._state_path(heads.key, stage.name))

    def _state_path(self, key: str, stage: str) -> Path:
        assert self.settings.state_dir is not None
        return self.settings.state_dir / "heads" / key / f"{stage}.npz"

    def _record_calibration(self, policy_id: str, heads: _Heads) -> None:
        self._counters(policy_id).calibration_error = {s.name: s.calibration_error for s in heads.stages}

    def _counters(self, policy_id: str) -> PolicyCounters:
        counters = self.counters.get(policy_id)
        if counters is None:
            counters = self.counters[policy_id] = PolicyCounters()
        return counters

    def heads(self, policy_key: str) -> list[LearnedStage]:
        """The learned stages in force for a policy, by `Policy.key` (empty before its first
        request, or once evicted)."""
        assigned = self._assigned.get(policy_key)
        heads = self._heads.get(assigned[1]) if assigned is not None else None
        return list(heads.stages) if heads else []


async def _once(pending: dict[Hashable, asyncio.Task[_Heads]], key: Hashable, make: Callable[[], Awaitable[_Heads]]) -> _Heads:
    """`make()` run once for the callers that ask for `key` while it runs: all await its result
    (or its exception); the next caller after it ended runs it again."""
    task = pending.get(key)
    if task is None:
        task = pending[key] = asyncio.get_running_loop().create_task(make())  # type: ignore[arg-type]

        def ended(done: asyncio.Task[_Heads]) -> None:
            del pending[key]
            if not done.cancelled():
                done.exception()  # retrieved: the callers may have gone

        task.add_done_callback(ended)
    return await asyncio.shield(task)
