"""The lexical stage's features: hashed word and character n-grams.

No vocabulary to fit or store (hashed n-grams), so a head can learn online from the first
event on and its saved rows stay valid across restarts. Character n-grams inside word
boundaries catch the spellings spam uses to dodge word lists (fr33 n1tro, d1scord). The
hashing is done a batch at a time, in C where `_ngrams.c` was compiled, else in numpy
(`consumer.classify.cascade.hashing`).
Measured cost of a decision (features, product, calibration; the bench's chat messages of
about 75 characters, one core): about 9 µs a message in batches of 100 to 500, which is how
the cascade asks (`LearnedStage.decide_many`, a poll batch at a time); 26 µs in batches of 10,
161 µs for one message alone. With scikit-learn's HashingVectorizer, which made the same
n-grams before, these were 78-84, 119 and 475 µs. (The numpy figures; the compiled counts take
the features alone from 12 to 4 µs a message in batches of 200.) For a decision the compiled
code makes no rows at all (`linear_scores`): a head's score of each text in one pass over its
n-grams, 2.0 against 3.4 µs a chat message for the counts and the product in batches of 53.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier

from consumer import stages
from consumer.classify.cascade.hashing import _ngrams, ngram_counts, ngram_scores

N_FEATURES = 1 << 17


class LexicalFeatures:
    """Word 1-2-grams and character 2-5-grams, each hashed into 2**17 columns, l2-normalised."""

    name = stages.LEXICAL
    instant = True
    # v2: the n-grams hashed in numpy (v1 was scikit-learn's MurmurHash3): v1 rows are discarded.
    signature = f"hashing-word12-charwb25-{N_FEATURES}-v2"

    async def features(self, texts: list[str]) -> Any:
        return self.transform(texts)

    # `linear_scores` is at hand: the compiled n-grams (`_ngrams.c`) were built.
    scores_texts = _ngrams is not None

    def transform(self, texts: list[str]) -> Any:
        return ngram_counts(texts, N_FEATURES)

    def linear_scores(self, texts: list[str], present: np.ndarray, before: np.ndarray, values: np.ndarray) -> Any:
        """A linear head's scores of these texts' rows without making the rows (`ngram_scores`;
        None where `_ngrams.c` was not compiled): for the decisions, which need nothing else."""
        return ngram_scores(texts, N_FEATURES, present, before, values)

    def new_model(self) -> SGDClassifier:
        # Logistic loss, so partial_fit is online logistic regression. No weight averaging:
        # it makes every update touch all 2**18 weights instead of the event's few n-grams.
        return SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=50, tol=None, random_state=0)
