"""The lexical stage's features: hashed word and character n-grams.

No vocabulary to fit or store (a hashing vectorizer), so a head can learn online from the
first event on and its saved rows stay valid across restarts. Character n-grams inside word
boundaries catch the spellings spam uses to dodge word lists (fr33 n1tro, d1scord).
Measured cost of a decision (features, product, calibration; the bench's chat messages of
about 76 characters, 2 cores shared with other work): about 0.5 ms for one message alone,
mostly scikit-learn's per-call overhead; about 135 µs a message in batches of 10, 94 µs in
batches of 100 and 85 µs in batches of 500, which is how the cascade asks
(`LearnedStage.decide_many`, a poll batch at a time). Of those 85 µs the character n-grams
are about half.
"""

from __future__ import annotations

from typing import Any

import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import SGDClassifier

N_FEATURES = 1 << 17


class LexicalFeatures:
    """Word 1-2-grams and character 2-5-grams, each hashed into 2**17 columns, l2-normalised."""

    name = "lexical"
    instant = True
    signature = f"hashing-word12-charwb25-{N_FEATURES}-v1"

    def __init__(self) -> None:
        self._words = HashingVectorizer(
            n_features=N_FEATURES, ngram_range=(1, 2), alternate_sign=False, token_pattern=r"(?u)\b\w+\b"
        )
        # scikit-learn's own "char_wb" analyzer with ngram_range (2, 5), written with slices
        # instead of a loop per character: the same n-grams (a test holds them equal), in a
        # third of the time; generating them was most of the stage's cost.
        self._chars = HashingVectorizer(n_features=N_FEATURES, analyzer=char_wb_2_5, alternate_sign=False)

    async def features(self, texts: list[str]) -> Any:
        return self.transform(texts)

    def transform(self, texts: list[str]) -> Any:
        return sp.hstack([self._words.transform(texts), self._chars.transform(texts)], format="csr")

    def new_model(self) -> SGDClassifier:
        # Logistic loss, so partial_fit is online logistic regression. No weight averaging:
        # it makes every update touch all 2**18 weights instead of the event's few n-grams.
        return SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=50, tol=None, random_state=0)


def char_wb_2_5(text: str) -> list[str]:
    """Character 2-5-grams inside word boundaries, each word padded with one space either side,
    lower-cased: `HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5))`'s n-grams, in its order."""
    grams: list[str] = []
    for word in text.lower().split():
        word = f" {word} "
        size = len(word)
        for n in range(2, 6):
            if n >= size:  # a word no longer than n counts once, whole
                grams.append(word)
                break
            grams += [word[i : i + n] for i in range(size - n + 1)]
    return grams
