"""A learned stage for one policy: a linear head on some features, calibrated, learning online.

What `LearnedStage` guarantees:
- it decides nothing until it holds `min_examples` labelled examples with `min_per_class`
  of each label; until then `decide` returns None;
- its confidence is a probability from a calibrator fitted on out-of-fold scores (the model
  that scored an example never saw it), and `Decision.decided` is true only where that
  confidence reaches the target precision;
- every 8 labels from the reasoner update the head at once (`partial_fit`); every
  `refit_every` labels (or a tenth of the kept examples, if more), the head is refitted from
  all kept examples and recalibrated, off the event loop;
- a person's decision (`learn(..., urgent=True)`) is in the head in force within two refits
  of the kept examples, whatever traffic follows: it starts a refit at once, or, while one
  runs, the next, which starts when that one ends (a refit that ends with urgent labels it did
  not see, or with `refit_every` labels it did not see, is followed by another). Two refits of
  `max_learned` examples are the bound: measured in docs/review.md ("When a decision reaches
  the heads");
- what it learned is saved as features and labels (never as content, never as a pickle), with
  the head in force as plain numbers, and reloaded only for the same training data (`version`),
  feature space and rules: a restored head decides as the saved one did, without a refit;
- it holds little memory: the head's coefficients that are not zero (a few thousand of the
  lexical stage's 262,144), and the examples' texts rather than their feature rows where the
  featurizer is instant (the rows are made again, in about a millisecond, when a refit needs
  them); measured per policy in docs/cascade.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import StratifiedKFold

from consumer.classify.cascade.calibrate import Calibrator, Method, calibration_error, fit_calibrator
from consumer.classify.cascade.hashing import _ngrams  # None where _ngrams.c was not compiled: numpy's product
from consumer.classify.cascade.kept import KeptByDigest
from consumer.config.cascade import CascadeSettings
from consumer.durable import replacing

log = logging.getLogger(__name__)

FOLDS = 5
# Reasoner labels per online update: one partial_fit call costs a pass over every weight
# (2**18 of them for the lexical stage) however few examples it gets, so updates go in
# small batches.
ONLINE_BATCH = 8
# Scores a `ScoreMemo` holds, all heads together (about 110 bytes each: 7 MB).
SCORE_MEMO_ENTRIES = 65_536
_weights_made = itertools.count()


class Featurizer(Protocol):
    """Turns texts into rows of a feature matrix (sparse or dense)."""

    name: str
    signature: str  # names the feature space; saved rows from another space are discarded
    # Cheap enough to run on the event loop a poll batch at a time (`transform`); a featurizer
    # that is not (a transformer model) is only asked through `features`, off the loop.
    instant: bool

    async def features(self, texts: list[str]) -> Any: ...

    def transform(self, texts: list[str]) -> Any:
        """`features`, synchronously, on the calling thread."""
        ...

    # An instant featurizer may also score texts for a linear head without making their rows:
    # `scores_texts` true and `linear_scores(texts, present, before, values)`, the head as
    # `_Weights` holds it for the compiled product (the lexical stage's compiled n-grams).

    def new_model(self) -> SGDClassifier: ...


class Decision(NamedTuple):
    """A stage's answer for one text (a tuple: one is made per request a stage answers, in a
    third of a frozen dataclass's time)."""

    violation: bool
    confidence: float  # calibrated probability that `violation` is the right answer
    decided: bool  # confidence reached the target precision


@dataclass(frozen=True)
class StageRules:
    min_examples: int
    min_per_class: int
    calibration: Method
    refit_every: int
    max_learned: int

    @classmethod
    def of(cls, settings: CascadeSettings) -> StageRules:
        """The rules the cascade's settings give every head."""
        return cls(settings.min_examples, settings.min_per_class, settings.calibration, settings.refit_every,
                   settings.max_learned)  # fmt: skip


@dataclass(frozen=True)
class _Weights:
    """A head's coefficients that are not zero, as (columns, values). A head trained on one
    policy's examples touches few of the lexical stage's 262,144 columns (chat-harassment's:
    4,581), so this is about 73 KB where the dense vector is 2 MB."""

    columns: np.ndarray
    values: np.ndarray
    size: int
    # For the compiled product (`_ngrams.linear_scores`): bit c set for each column c above, how
    # many of them the 64-bit words before each word hold (48 KB for the lexical stage's 262,144
    # columns), and `values` with a 0.0 after them (`values` is a view of it).
    present: np.ndarray = field(init=False, repr=False, compare=False)
    before: np.ndarray = field(init=False, repr=False, compare=False)
    padded: np.ndarray = field(init=False, repr=False, compare=False)
    # Which weights these are, for `ScoreMemo` (an id may be reused once they are freed; this is not).
    serial: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serial", next(_weights_made))
        padded = np.zeros(len(self.values) + 1)
        padded[:-1] = self.values
        object.__setattr__(self, "padded", padded)
        object.__setattr__(self, "values", padded[:-1])
        words = (self.size + 63) // 64
        word = self.columns >> 6
        present = np.zeros(words, dtype=np.uint64)
        np.bitwise_or.at(present, word, np.left_shift(np.uint64(1), (self.columns & 63).astype(np.uint64)))
        before = np.zeros(words, dtype=np.uint32)
        np.cumsum(np.bincount(word, minlength=words)[:-1], out=before[1:])
        object.__setattr__(self, "present", present)
        object.__setattr__(self, "before", before)

    @classmethod
    def of(cls, coef: np.ndarray) -> _Weights:
        coef = np.asarray(coef, dtype=np.float64).ravel()
        columns = np.flatnonzero(coef)  # intp: as int32 they would be converted at every scatter (+20 µs)
        return cls(columns, coef[columns], coef.size)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.size)
        out[self.columns] = self.values
        return out

    def scores(self, rows: Any) -> np.ndarray:
        if (
            _ngrams is not None and sp.issparse(rows) and rows.format == "csr" and rows.shape[1] == self.size
            and rows.indptr.dtype == np.int32  # scipy's, up to 2**31 entries (its indices are too)
        ):  # fmt: skip
            return self._compiled_scores(rows)
        # Else scattered into a zeroed vector kept per thread and taken out again after the product:
        # two passes over the non-zero coefficients, where a sparse product or a lookup by
        # searchsorted costs more than the whole decision.
        scratch = _scratch(self.size)
        scratch[self.columns] = self.values
        try:
            return np.asarray(rows @ scratch).ravel()
        finally:
            scratch[self.columns] = 0.0

    def _compiled_scores(self, rows: sp.csr_matrix) -> np.ndarray:
        """The same product without the dense vector (2 MB for the lexical stage), filled, read at
        random and cleared at each call (docs/benchmark.md, issue 31, sixteenth round)."""
        out = np.empty(rows.shape[0])
        _ngrams.linear_scores(
            np.ascontiguousarray(rows.indptr), np.ascontiguousarray(rows.indices, dtype=np.int32),
            np.ascontiguousarray(rows.data, dtype=np.float64), self.present, self.before, self.padded, out,
        )  # fmt: skip
        return out


_scratch_space = threading.local()


def _scratch(size: int) -> np.ndarray:
    arrays: dict[int, np.ndarray] = _scratch_space.__dict__.setdefault("arrays", {})
    array = arrays.get(size)
    if array is None:
        array = arrays[size] = np.zeros(size)
    return array


class ScoreMemo(KeptByDigest[float]):
    """Linear heads' scores of texts they scored before, by the 16-byte digest the verdict cache
    keys a text's normalised form by (`cache.cache_key`). A chat stream repeats its texts (greetings,
    copy-pasted raids), and where no stage decides one and there is no reasoner, the cache keeps
    no answer for it (an undecided answer is not a verdict), so each copy was scored again.

    A digest stands for a text only where the features are the same for every text with that
    normalised form: the caller gives one only for those (`cascade._memo_digests`). Scores are
    kept per set of weights (`_Weights.serial`): an online update or refit makes new weights, whose
    scores start empty, so a memoised score is always the one the head in force would give, bit
    for bit. At most `max_entries` scores and sets of weights are held.
    """

    def __init__(self, max_entries: int = SCORE_MEMO_ENTRIES):
        super().__init__(max_entries)

    def scores(
        self, weights: _Weights, texts: list[str], digests: list[bytes | None],
        score: Callable[[list[str]], np.ndarray],
    ) -> np.ndarray:  # fmt: skip
        """The scores of `texts`: memoised where a text's digest was scored by these weights, the
        others by one call of `score`, then memoised (those with a digest)."""
        known = self.known(weights.serial)
        found: list[float | None] = [known.get(d) for d in digests]  # type: ignore[arg-type]  # None is never a key
        missing = [i for i, value in enumerate(found) if value is None]
        if not missing:
            return np.array(found, dtype=np.float64)
        made = score([texts[i] for i in missing]).tolist()
        fresh: dict[bytes, float] = {}
        for i, value in zip(missing, made):
            found[i] = value
            digest = digests[i]
            if digest is not None:
                fresh[digest] = value
        if fresh:
            self.remember(weights.serial, fresh)
        return np.array(found, dtype=np.float64)


@dataclass
class _Fitted:
    # None for a head restored from a saved file: its first label starts a refit, which makes one.
    model: SGDClassifier | None
    weights: _Weights
    intercept: float
    calibrator: Calibrator
    calibration_error: float

    @classmethod
    def of(cls, model: SGDClassifier, calibrator: Calibrator, calibration_error: float) -> _Fitted:
        fitted = cls(model, _Weights.of(model.coef_), float(model.intercept_[0]), calibrator, calibration_error)
        fitted._drop_dense()
        return fitted

    def _drop_dense(self) -> None:
        """Keep the model's coefficients as `weights` only (a model that averages keeps its own
        dense copies: the embedding stage's, of 384 columns)."""
        assert self.model is not None
        if not self.model.average:
            del self.model.coef_  # made again from `weights` for the next online update

    def update(self, rows: Any, labels: list[int]) -> None:
        """An online update of the model (`partial_fit`) with a few labels."""
        assert self.model is not None
        if not hasattr(self.model, "coef_"):
            self.model.coef_ = self.weights.dense()[None, :]
        self.model.partial_fit(rows, labels)
        self.weights, self.intercept = _Weights.of(self.model.coef_), float(self.model.intercept_[0])
        self._drop_dense()

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "head_columns": self.weights.columns, "head_values": self.weights.values,
            "head_size": np.array(self.weights.size), "head_intercept": np.array(self.intercept),
            "head_calibration_error": np.array(self.calibration_error),
        } | {f"calibration_{name}": value for name, value in self.calibrator.arrays().items()}  # fmt: skip

    @classmethod
    def from_arrays(cls, saved: Any) -> _Fitted:
        weights = _Weights(saved["head_columns"].astype(np.intp), saved["head_values"].astype(np.float64),
                           int(saved["head_size"]))  # fmt: skip
        calibrator = Calibrator.from_arrays({name: saved[f"calibration_{name}"] for name in ("method", "bounds", "params")})
        return cls(None, weights, float(saved["head_intercept"]), calibrator, float(saved["head_calibration_error"]))


class LearnedStage:
    def __init__(self, featurizer: Featurizer, rules: StageRules, version: str):
        self.featurizer = featurizer
        self.name = featurizer.name
        self.rules = rules
        self.version = version
        self._seed_texts: list[str] = []
        self._seed_rows: Any = None  # kept only where the featurizer is not instant (`_seed`)
        self._seed_labels = np.zeros(0, dtype=int)
        self._learned: deque[tuple[Any, int]] = deque(maxlen=rules.max_learned)
        self._fitted: _Fitted | None = None
        self._since_refit = 0
        self._pending: list[tuple[Any, int]] = []
        self._refit: asyncio.Task[None] | None = None
        # Labels taken so far, and how many of them the head in force was fitted on: a refit
        # snapshots the first count when it starts and publishes it when it ends.
        self._taken = 0
        self._fitted_upto = 0
        self._urgent_upto = 0  # the count when the last urgent label was taken
        self._refit_from = 0  # the count the latest refit started from
        # (labels taken, head in force) when last saved or restored: `save` skips what is on disk.
        self._on_disk: tuple[int, _Fitted | None] | None = None

    @property
    def calibrated(self) -> bool:
        return self._fitted is not None

    @property
    def weights_serial(self) -> int | None:
        """Which weights are in force (`_Weights.serial`: new with every online update and refit,
        and with them the intercept and calibration); None while not calibrated."""
        return None if self._fitted is None else self._fitted.weights.serial

    @property
    def calibration_error(self) -> float | None:
        return None if self._fitted is None else self._fitted.calibration_error

    @property
    def examples(self) -> int:
        return len(self._seed_labels) + len(self._learned)

    @property
    def unfitted(self) -> int:
        """Labels taken since the snapshot the head in force was refitted from (online updates
        aside): 0 once every label taken is in a full refit."""
        return self._taken - self._fitted_upto

    async def train(self, texts: list[str], labels: list[int]) -> None:
        """Fit from the policy's examples (and whatever was learned or reloaded before); a head
        that `restore` reloaded stays in force instead."""
        self._seed_texts = list(texts)
        self._seed_rows = None
        self._seed_labels = np.asarray(labels, dtype=int)
        if self._fitted is None:
            await self._refit_now()

    async def _seed(self) -> Any:
        """The examples' feature rows, made again for each refit where the featurizer is instant
        (about a millisecond for a policy's examples; their rows would be 100-140 KB a head)."""
        if self._seed_rows is not None or not self._seed_texts:
            return self._seed_rows
        rows = await self.featurizer.features(self._seed_texts)
        if not self.featurizer.instant:
            self._seed_rows = rows  # a transformer's rows cost seconds to make again
        return rows

    async def decide(self, text: str, target_precision: float) -> Decision | None:
        fitted = self._fitted
        if fitted is None:
            return None
        return _decisions(fitted, await self.featurizer.features([text]), [target_precision])[0]

    def decide_many(self, texts: list[str], target_precision: float) -> list[Decision] | None:
        """`decide` for a batch, on the calling thread: one vectorisation and one matrix product
        (or one pass over the texts, `decide_texts`) and one calibration call for all of them
        (None: not calibrated). Only for an `instant` featurizer: the lexical stage's cost per
        text falls from about 160 µs alone to about 9 µs in a batch of a hundred (measured:
        `consumer/classify/cascade/lexical.py`)."""
        return self.decide_texts(texts, [target_precision] * len(texts))

    def decide_texts(
        self, texts: list[str], target_precisions: Sequence[float], digests: list[bytes | None] | None = None,
        memo: ScoreMemo | None = None,
    ) -> list[Decision] | None:  # fmt: skip
        """`decide_rows` of these texts' rows, each against its own target precision; where the
        featurizer scores texts without making their rows (`scores_texts`), without them, and
        with a `memo`, only the texts it holds no score of (`digests[i]`: text i's, or None)."""
        fitted = self._fitted
        if fitted is None:
            return None
        if getattr(self.featurizer, "scores_texts", False):
            w = fitted.weights

            def score(some: list[str]) -> np.ndarray:
                return self.featurizer.linear_scores(some, w.present, w.before, w.padded)  # type: ignore[attr-defined,no-any-return]

            scores = score(texts) if memo is None or digests is None else memo.scores(w, texts, digests, score)
        else:
            scores = fitted.weights.scores(self.featurizer.transform(texts))
        return _decided(fitted, scores, target_precisions)

    def decide_rows(self, rows: Any, target_precisions: Sequence[float]) -> list[Decision] | None:
        """Decisions for feature rows made already (by this stage's featurizer), one matrix
        product and one calibration call for all; each row is decided against its own target
        precision (policies sharing these heads may ask for different ones). None: not calibrated."""
        fitted = self._fitted
        if fitted is None:
            return None
        return _decisions(fitted, rows, target_precisions)

    async def learn(self, text: str, label: int, urgent: bool = False, corrects: bool = False) -> None:
        """Take one label: a reasoner verdict, or with `urgent` a person's decision, which must
        reach the head within the bound above even if no other label follows. With `corrects` (a
        lead's overturn) the learned examples of the same text under the other label go first, so
        the next refit, which `urgent` brings, no longer fits the answer the overturn replaced."""
        row = await self.featurizer.features([text])
        if corrects:
            kept = [(r, y) for r, y in self._learned if y == label or not _same_row(r, row)]
            if len(kept) < len(self._learned):
                self._learned = deque(kept, maxlen=self._learned.maxlen)
        self._learned.append((row, label))
        self._since_refit += 1
        self._taken += 1
        if urgent:
            self._urgent_upto = self._taken
        self._pending.append((row, label))
        fitted = self._fitted
        if fitted is not None and fitted.model is not None and len(self._pending) >= ONLINE_BATCH:
            # Labels that arrive while a refit runs train the old head only; they are in the
            # kept examples, so the next refit has them.
            fitted.update(_stack([r for r, _ in self._pending]), [y for _, y in self._pending])
        if len(self._pending) >= ONLINE_BATCH:
            self._pending.clear()
        # Refits get rarer as the kept examples grow (each costs FOLDS + 1 fits of all of them),
        # so their total cost grows with the log of the stream, not with its length. A restored
        # head has no model to update online: its first label refits it.
        due = self._owed() or (self._enough() if fitted is None else fitted.model is None)
        if due and (self._refit is None or self._refit.done()):
            self._refit = asyncio.get_running_loop().create_task(self._refits())
        # Otherwise the running refit finds these labels owed when it ends, and goes on.

    def _owed(self) -> bool:
        """Whether the labels no refit has started from call for one now."""
        every = max(self.rules.refit_every, self.examples // 10)
        return self._since_refit >= every or self._urgent_upto > self._refit_from

    async def _refits(self) -> None:
        # One task refits until nothing is owed, so that the labels taken during a refit never
        # wait for a `learn` call that may not come.
        await self._refit_now()
        while self._owed():
            await self._refit_now()

    async def wait_idle(self) -> None:
        """Wait until no refit runs or is owed (tests, shutdown)."""
        if self._refit is not None:
            await asyncio.gather(self._refit, return_exceptions=True)

    async def _refit_now(self) -> None:
        self._since_refit = 0
        snapshot = self._refit_from = self._taken
        rows, labels = self._all_examples(await self._seed())
        if rows is None or not self._enough(labels):
            self._fitted = None
        else:
            self._fitted = await asyncio.to_thread(self._fit, rows, labels)
        self._fitted_upto = snapshot

    def _enough(self, labels: np.ndarray | None = None) -> bool:
        if labels is None:
            labels = np.concatenate([self._seed_labels, np.array([y for _, y in self._learned], dtype=int)])
        counts = np.bincount(labels, minlength=2)
        return len(labels) >= self.rules.min_examples and int(counts.min()) >= self.rules.min_per_class

    def _all_examples(self, seed: Any) -> tuple[Any, np.ndarray]:
        parts = ([seed] if seed is not None else []) + [row for row, _ in self._learned]
        labels = np.concatenate([self._seed_labels, np.array([y for _, y in self._learned], dtype=int)])
        return (_stack(parts) if parts else None), labels

    def _fit(self, rows: Any, labels: np.ndarray) -> _Fitted:
        scores = np.empty(len(labels))
        folds = min(FOLDS, int(np.bincount(labels).min()))
        splits = StratifiedKFold(folds, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels)
        for train, held_out in splits:
            model = self.featurizer.new_model().fit(rows[train], labels[train])
            scores[held_out] = model.decision_function(rows[held_out])
        return _Fitted.of(
            self.featurizer.new_model().fit(rows, labels),
            fit_calibrator(scores, labels, self.rules.calibration),
            calibration_error(scores, labels, self.rules.calibration),
        )

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the head in force and the learned examples (features and labels); atomic. Skipped
        where nothing changed since the last save or restore: a head evicted again and again
        (and every head without a reasoner, which never learns) is written once."""
        if self._fitted is None and not self._learned:
            return
        if self._on_disk is not None and self._on_disk[0] == self._taken and self._on_disk[1] is self._fitted:
            return
        arrays: dict[str, np.ndarray] = {
            "version": np.array(self.version),
            "signature": np.array(self.featurizer.signature),
            "rules": np.array(repr(self.rules)),
            "labels": np.array([y for _, y in self._learned], dtype=np.int8),
        }
        if self._learned:
            rows = _stack([row for row, _ in self._learned])
            if sp.issparse(rows):
                rows = sp.csr_matrix(rows)
                arrays |= {"data": rows.data, "indices": rows.indices, "indptr": rows.indptr,
                           "shape": np.array(rows.shape)}  # fmt: skip
            else:
                arrays["dense"] = np.asarray(rows)
        if self._fitted is not None:
            arrays |= self._fitted.arrays()
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as handle:
            np.savez(handle, **arrays)
        self._on_disk = (self._taken, self._fitted)

    def restore(self, path: Path) -> bool:
        """Reload what `save` wrote for this version and feature space; a stale file is deleted.

        Call before `train`: the learned examples join the policy's, and a head saved under the
        same rules is put in force as it was (`train` then fits nothing). True if anything was
        reloaded.
        """
        if not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["version"]) != self.version or str(saved["signature"]) != self.featurizer.signature:
                    log.info("discarding learned %s head of other training data (%s)", self.name, path)
                    path.unlink(missing_ok=True)
                    return False
                labels = saved["labels"].astype(int)
                rows: Any = None
                if "dense" in saved:
                    rows = saved["dense"]
                elif "data" in saved:
                    parts = (saved["data"], saved["indices"], saved["indptr"])
                    rows = sp.csr_matrix(parts, shape=tuple(saved["shape"]))
                same_rules = "rules" in saved and str(saved["rules"]) == repr(self.rules)
                fitted = _Fitted.from_arrays(saved) if same_rules and "head_values" in saved else None
        except (OSError, KeyError, ValueError) as exc:
            log.warning("cannot read learned %s head %s (%s); starting from the examples", self.name, path, exc)
            return False
        for i, label in enumerate(labels):
            self._learned.append((rows[i : i + 1], int(label)))
        self._fitted = fitted
        self._on_disk = (self._taken, fitted) if fitted is not None else None
        return True


def _decisions(fitted: _Fitted, rows: Any, target_precisions: Sequence[float]) -> list[Decision]:
    # The linear score without decision_function's input validation, which costs ten times
    # the product itself on a small matrix.
    return _decided(fitted, fitted.weights.scores(rows), target_precisions)


_tuple_new = tuple.__new__


def _decided(fitted: _Fitted, scores: np.ndarray, target_precisions: Sequence[float]) -> list[Decision]:
    """Decisions from a head's scores (its intercept not added yet)."""
    decisions = []
    for p, target in zip(fitted.calibrator(scores + fitted.intercept).tolist(), target_precisions, strict=True):
        violation = p >= 0.5
        confidence = p if violation else 1.0 - p
        # A NamedTuple's own constructor is Python code; tuple's makes the same object in C
        # (a poll batch's decisions: 15 against 19 µs for 43).
        decisions.append(_tuple_new(Decision, (violation, confidence, confidence >= target)))
    return decisions


def _same_row(a: Any, b: Any) -> bool:
    """Whether two feature rows (sparse or dense, one row each) are the same."""
    if sp.issparse(a) or sp.issparse(b):
        return a.shape == b.shape and (sp.csr_matrix(a) != sp.csr_matrix(b)).nnz == 0
    return bool(np.array_equal(a, b))


def _stack(parts: list[Any]) -> Any:
    if sp.issparse(parts[0]):
        return sp.vstack(parts, format="csr")
    return np.vstack(parts)
