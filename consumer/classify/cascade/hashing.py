"""Hashed n-gram counts for a batch of texts, computed in numpy: the lexical stage's features.

The n-grams are scikit-learn's: word 1-2-grams of `(?u)\\b\\w+\\b` tokens, and "char_wb"
character 2-5-grams (inside word boundaries, each word padded with one space either side),
all lower-cased. What differs is how they are hashed. scikit-learn makes each n-gram a Python
string and hashes it with MurmurHash3; a chat message of the bench has some 220 n-grams, and
their features cost 73 µs. Here the batch becomes one array of code points and every n-gram's hash comes from
prefix sums over it, no string made: the polynomial hash of a span, `h(a, b) = sum of
cp[j] * P**(b - 1 - j)`, is `P**(b - 1) * (G[b] - G[a])` with `G[i] = sum of cp[j] * P**-j`
for j < i (P is odd, so it has an inverse modulo 2**64 and uint64 arithmetic wraps as the
modulus needs). A word bigram's hash follows from its two words' (the hash of "w1 w2").
Each hash is then mixed (MurmurHash3's 64-bit finaliser) and its low bits pick the column.

Measured on the bench's chat messages (about 75 characters), one core, the lexical stage's
whole decision (features, product, calibration) in batches of 500: 9 µs a message, against
78 µs with scikit-learn's HashingVectorizer; 161 µs for one message alone (numpy's per-call
overhead), against 475 µs. Counting equal n-grams takes a sort; sorting each row on its own
(`_sorted_row_by_row`) instead of all the batch's (row, column) keys at once, and one array of
code points for both kinds of n-gram, took the features of a batch of 200 from 18-20 to 11-13 µs
a message (`bench/lexical_features.py`, 2026-12-06).

Where a C compiler was at hand when the project was installed (`setup.py`, run by `pip install`
in `scripts/bootstrap` and the Dockerfile, whose image has gcc), `_ngrams.c` builds the same
matrix one text at a time, bit for bit, at about a third of the numpy code's cost; this module's numpy code is the fallback
without it, and the test holds both to scikit-learn's n-grams.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

try:  # built by `pip install` from setup.py; optional there, so a machine without a C compiler has the numpy code
    from consumer.classify.cascade import _ngrams
except ImportError:
    _ngrams = None

_P = np.uint64(0x100000001B3)  # FNV-1's 64-bit prime: odd, so invertible modulo 2**64
_P_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_SPACE = np.uint64(ord(" "))
_BREAK = 0x110000  # between texts in the array of code points: above every code point
# Texts hashed together at most: the arrays of a larger batch outgrow the CPU's caches
# (measured, the lexical stage's decisions on chat messages: 500 at once cost 16 µs a message,
# in chunks of 200 9 µs).
CHUNK = 200
# Rows are sorted each on its own while a matrix padded to the longest holds at most this many
# cells per n-gram; else all together (`_counts`).
GRID_MAX_WASTE = 4
# The most entries a matrix of `_ngrams.counts` is made with: its row pointers are int32.
INT32_ROOM = 2**31 - 1
_ASCII_WORD = np.array([chr(c).isalnum() or chr(c) == "_" for c in range(128)])


def ngram_counts(texts: list[str], n_features: int) -> sp.csr_matrix:
    """Rows of l2-normalised n-gram counts: word 1-2-grams in columns [0, n_features), character
    2-5-grams in [n_features, 2 * n_features), each block normalised on its own (as two
    HashingVectorizers side by side). `n_features` must be a power of two."""
    if n_features & (n_features - 1):
        raise ValueError(f"n_features must be a power of two, not {n_features}")
    if _ngrams is not None:
        return _compiled_counts(texts, n_features)
    return numpy_ngram_counts(texts, n_features)


def numpy_ngram_counts(texts: list[str], n_features: int) -> sp.csr_matrix:
    """The same rows from the numpy code alone: the fallback without `_ngrams.c`."""
    if len(texts) <= CHUNK:
        return _counts(texts, n_features)
    return sp.vstack([_counts(texts[i : i + CHUNK], n_features) for i in range(0, len(texts), CHUNK)], format="csr")


def _padded(texts: list[str]) -> list[str]:
    """Each text lower-cased, its words joined by single spaces, padded with a space either side:
    the text of the character n-grams, and (collapsing white space changes no word nor their
    order) of the word n-grams too."""
    padded = []
    for text in texts:
        words = text.lower().split()
        padded.append(f" {' '.join(words)} " if words else "")
    return padded


def ngram_scores(
    texts: list[str], n_features: int, present: np.ndarray, before: np.ndarray, values: np.ndarray
) -> np.ndarray | None:
    """A linear head's scores of `ngram_counts(texts, n_features)`'s rows without making them:
    `_ngrams.text_scores`, the head as `stage._Weights` holds it for the compiled product. Each
    text's n-grams are read once, their weights summed as they come and each block's sum divided
    by its norm; no sort, no matrix. None without `_ngrams` (the numpy code makes the rows)."""
    if _ngrams is None:
        return None
    if n_features & (n_features - 1):
        raise ValueError(f"n_features must be a power of two, not {n_features}")
    out = np.empty(len(texts))
    _ngrams.text_scores(_lowered(texts), n_features, present, before, values, out)
    return out


def _lowered(texts: list[str]) -> list[str]:
    """The texts as the C code takes them: it pads each text; an ASCII text goes as it is (it
    lower-cases A-Z), any other lower-cased here (Unicode's full mapping)."""
    return [text if text.isascii() else text.lower() for text in texts]


def _compiled_counts(texts: list[str], n_features: int) -> sp.csr_matrix:
    """`_ngrams.c`: the buffers are made here, room for 5 entries a character of each padded
    text (see there), the texts `_lowered`. Row pointers are int32, as scipy keeps them (from
    int64 its constructor checks every one and copies them): texts that may need more entries
    than int32 counts are split in two."""
    given = _lowered(texts)
    room = 5 * (sum(map(len, given)) + 2 * len(given))
    if room > INT32_ROOM and len(texts) > 1:
        half = len(texts) // 2
        return sp.vstack(
            [_compiled_counts(texts[:half], n_features), _compiled_counts(texts[half:], n_features)], format="csr"
        )
    indices, data = np.empty(room, dtype=np.int32), np.empty(room, dtype=np.float64)
    indptr = np.empty(len(given) + 1, dtype=np.int32)
    entries = _ngrams.counts(given, n_features, indices, data, indptr)
    return _csr_as_made(data[:entries], indices[:entries], indptr, (len(texts), 2 * n_features))


# What scipy's constructor sets on a CSR matrix besides its arrays and shape (its `maxprint`).
_CSR_ARRAYS = ("data", "indices", "indptr", "_shape")
_CSR_DEFAULTS = {name: value for name, value in vars(sp.csr_matrix((0, 0))).items() if name not in _CSR_ARRAYS}


def _csr_as_made(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix of the compiled counts' arrays, which are what scipy's constructor checks
    for (float64 values, int32 columns in order within each row, int32 row pointers from 0 to
    the entries): its attributes set as that constructor sets them, without its checks, which
    were 4% of the lexical case's event loop (a py-spy profile of bench.loop_path) for a
    poll batch's matrix. scipy is pinned (requirements/cascade.txt); a test holds this to the
    constructor's matrix, attribute by attribute, so that a scipy that sets more fails there."""
    matrix = sp.csr_matrix.__new__(sp.csr_matrix)
    vars(matrix).update(_CSR_DEFAULTS, data=data, indices=indices, indptr=indptr, _shape=shape)
    return matrix


def _counts(texts: list[str], n_features: int) -> sp.csr_matrix:
    # The batch is one array of code points and one set of prefix sums.
    cp, breaks = _joined(_padded(texts))
    spans = _Spans(cp)
    word_rows, word_hashes = _word_ngrams(cp, breaks, spans)
    char_rows, char_hashes = _char_ngrams(cp, breaks, spans)
    rows = np.concatenate((word_rows, char_rows))
    columns = _mixed(np.concatenate((word_hashes, char_hashes))) & np.uint64(n_features - 1)
    columns[len(word_rows) :] += np.uint64(n_features)  # the character block
    # Each row's columns sorted, so that equal neighbours are one n-gram counted several times.
    per_row = np.bincount(rows, minlength=len(texts))
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(per_row, out=indptr[1:])
    width = int(per_row.max()) if len(rows) else 0
    if width * len(texts) <= GRID_MAX_WASTE * len(rows):
        rows, columns = _sorted_row_by_row(rows, columns, indptr, width)
    else:  # one text far longer than the others: a matrix padded to it would be mostly padding
        rows, columns = _sorted_together(rows, columns, n_features)
    first = np.empty(len(columns), dtype=bool)
    first[:1] = True
    np.not_equal(columns[1:], columns[:-1], out=first[1:])
    row_starts = indptr[1:-1]
    first[row_starts[row_starts < len(columns)]] = True  # a row's first column, whatever the last row's last
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(columns))).astype(np.float64)
    columns, rows = columns[starts], rows[starts]
    block = rows * 2 + (columns >= n_features)
    norms = np.sqrt(np.bincount(block, weights=counts * counts, minlength=2 * len(texts)))
    counts /= norms[block]
    indptr = np.searchsorted(rows, np.arange(len(texts) + 1))
    return sp.csr_matrix((counts, columns, indptr), shape=(len(texts), 2 * n_features))


def _sorted_row_by_row(
    rows: np.ndarray, columns: np.ndarray, indptr: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows in order, each row's columns in order: each row sorted on its own, in a matrix padded
    to the longest row (one sort call). Small sorts stay in the CPU's caches, where one sort of
    all the batch's (row, column) keys does not (on the bench's chat messages, 1.6 times as
    long as this). The rows come in six runs, each in order (unigrams,
    bigrams, 2- to 5-grams): a stable sort (timsort) merges them."""
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    # Each entry's place: its row's line of the matrix, after the row's entries before it.
    places = rows * width + (np.arange(len(rows)) - indptr[rows])
    grid = np.full((len(indptr) - 1, width), np.iinfo(np.int32).max, dtype=np.int32)  # above every column
    cells = grid.reshape(-1)  # a view: what is written through it is in the matrix
    cells[places] = columns[order]
    grid.sort(axis=1)
    return rows, cells[places]  # row after row, each row's columns in order (its padding after them)


def _sorted_together(rows: np.ndarray, columns: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The same order from one sort of (row, column) keys."""
    shift = np.uint64(n_features.bit_length())  # columns are below 2 * n_features
    keys = (rows.astype(np.uint64) << shift) | columns
    keys.sort()
    return (keys >> shift).astype(np.int64), (keys & np.uint64(2 * n_features - 1)).astype(np.int32)


def _joined(pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The pieces' code points in one array, a `_BREAK` between each two, and for each position
    how many breaks come before it (the row of a span that starts there)."""
    # surrogatepass: a lone surrogate (JSON allows "\ud800") is a code point like any other here.
    cp = np.frombuffer("\x00".join(pieces).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    at = np.cumsum([len(piece) + 1 for piece in pieces[:-1]], dtype=np.int64) - 1
    cp[at] = _BREAK
    breaks = np.zeros(len(cp) + 1, dtype=np.int64)
    breaks[at + 1] = 1
    return cp, np.cumsum(breaks)


class _Spans:
    """Polynomial hashes of any spans of one array of code points, from prefix sums."""

    def __init__(self, cp: np.ndarray):
        size = len(cp)
        powers = np.full(size + 1, _P, dtype=np.uint64)
        powers[:1] = 1
        self.powers = np.cumprod(powers)  # P**i
        inverse = np.full(size, _P_INVERSE, dtype=np.uint64)
        inverse[:1] = 1
        self._prefix = np.zeros(size + 1, dtype=np.uint64)
        np.cumsum(cp * np.cumprod(inverse), out=self._prefix[1:])  # G

    def hashes(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        return self.powers[end - 1] * (self._prefix[end] - self._prefix[start])


def _word_ngrams(cp: np.ndarray, breaks: np.ndarray, spans: _Spans) -> tuple[np.ndarray, np.ndarray]:
    """(row, hash) of each word unigram and bigram of the joined texts. A word is a run of `\\w`
    characters: str.isalnum() or "_", as the `re` module tells them."""
    word = np.zeros(len(cp), dtype=bool)
    ascii_ = cp < 128
    word[ascii_] = _ASCII_WORD[cp[ascii_]]
    others = np.flatnonzero(~ascii_ & (cp != _BREAK))
    if len(others):
        values, inverse = np.unique(cp[others], return_inverse=True)
        word[others] = np.array([chr(value).isalnum() for value in values.tolist()])[inverse]
    before = np.concatenate(([False], word[:-1]))
    after = np.concatenate((word[1:], [False]))
    starts, ends = np.flatnonzero(word & ~before), np.flatnonzero(word & ~after) + 1
    row = breaks[starts]
    unigrams = spans.hashes(starts, ends)
    # "w1 w2" hashes as h(w1) * P**(1 + |w2|) + ord(" ") * P**|w2| + h(w2).
    same_text = row[1:] == row[:-1]
    second_size = (ends - starts)[1:][same_text]
    bigrams = (unigrams[:-1][same_text] * spans.powers[second_size + 1] + _SPACE * spans.powers[second_size]
               + unigrams[1:][same_text])  # fmt: skip
    return np.concatenate((row, row[:-1][same_text])), np.concatenate((unigrams, bigrams))


def _char_ngrams(cp: np.ndarray, breaks: np.ndarray, spans: _Spans) -> tuple[np.ndarray, np.ndarray]:
    """(row, hash) of each character 2-5-gram inside word boundaries of the joined texts (each
    padded, its words joined by single spaces): the spans with no space inside (first and last
    characters apart) and no break between texts anywhere; a padded word shorter than n then
    counts once whole, as scikit-learn counts it."""
    size = len(cp)
    spaces = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(cp == _SPACE, out=spaces[1:])
    rows, hashes = [], []
    for n in range(2, 6):
        count = size - n + 1
        if count <= 0:
            break
        start = np.flatnonzero(
            (spaces[n - 1 : n - 1 + count] == spaces[1 : 1 + count]) & (breaks[n : n + count] == breaks[:count])
        )
        rows.append(breaks[start])
        hashes.append(spans.hashes(start, start + n))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    return np.concatenate(rows), np.concatenate(hashes)


def _mixed(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: every bit of the hash moves the low bits kept."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h
