"""The verdict cache: repeated content under the same policy version is answered once.

Spam floods and copy-pasted raids repeat the same text with cosmetic changes (case, extra
spaces, zero-width characters), so the key hashes a normalised form of the content. The
policy version is part of the key: an edited policy never answers from verdicts of the old
text. Only the hash is kept, never the content.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable

from consumer.classify import Classification
from consumer.classify.cascade.hashing import _ngrams  # None where _ngrams.c was not compiled: Python's join
from consumer.classify.cascade.kept import KeptByDigest
from consumer.classify.cascade.verdicts import as_cached
from consumer.policy import Policy

CacheKey = tuple[str, str, bytes]  # Policy.key (the id, scoped by its community), policy version, content hash
# Answers an `UndecidedAnswers` holds, all states together (about 100 bytes each: 6.5 MB).
UNDECIDED_ANSWERS = 65_536

_words_joined = _ngrams.normalised if _ngrams is not None else None

_INVISIBLE = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad]")
# A 16-byte BLAKE2b with nothing hashed yet: each key's hash starts as a copy of it, which costs
# less than making one (0.24 against 0.40 µs for a chat message with the hex digest it kept before).
_EMPTY_DIGEST = hashlib.blake2b(digest_size=16)


def normalise(content: str) -> str:
    """NFKC, case-folded, without invisible characters, white space collapsed."""
    if content.isascii():  # its own NFKC form, no invisible characters; case-folding it is A-Z's lower case
        folded = content if _words_joined is not None else content.lower()
    else:
        folded = _INVISIBLE.sub("", unicodedata.normalize("NFKC", content)).casefold()
    if _words_joined is not None:  # A-Z lower-cased, the words joined by single spaces: one pass in C
        return _words_joined(folded)  # type: ignore[no-any-return]
    # str.split() splits where `\s+` matches (both ask str.isspace), and drops the ends.
    return " ".join(folded.split())


def cache_key(policy: Policy, content: str) -> CacheKey:
    digest = _EMPTY_DIGEST.copy()
    digest.update(normalise(content).encode("utf-8"))
    return (policy.key, policy.version, digest.digest())


def cache_keys(policy: Policy, contents: list[str]) -> list[CacheKey]:
    """`cache_key` of each content, for a poll batch: a loop here rather than a call or two a
    content (ASCII content normalised without `normalise`'s call, as it would be there)."""
    scope, version, fresh, joined = policy.key, policy.version, _EMPTY_DIGEST.copy, _words_joined
    keys = []
    for content in contents:
        digest = fresh()
        digest.update((joined(content) if joined is not None and content.isascii() else normalise(content)).encode())
        keys.append((scope, version, digest.digest()))
    return keys


class VerdictCache:
    """Holds at most `max_entries` verdicts, each for at most `ttl_s` seconds.

    Least recently used entries go first when full; an expired entry is never returned.
    A returned verdict is a copy marked `model="cascade:cache"` with no token counts: the
    cache spent none.

    A person's decision is pinned (`pin`): it answers before any machine verdict, never
    expires, and is never replaced by one (`model="cascade:cache:human"`); pinned entries are
    bounded by `max_entries` too, least recently used first.
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, Classification]] = OrderedDict()
        self._pinned: OrderedDict[CacheKey, Classification] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> Classification | None:
        if self._pinned:
            human = self._pinned.get(key)
            if human is not None:
                self._pinned.move_to_end(key)
                return as_cached(human, model="cascade:cache:human")
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, verdict = entry
        if self._clock() - stored_at > self._ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return as_cached(verdict)

    def pin(self, key: CacheKey, verdict: Classification) -> None:
        """A person's answer for this content: it wins over every machine verdict from now on."""
        self._pinned[key] = verdict
        self._pinned.move_to_end(key)
        self._entries.pop(key, None)
        while len(self._pinned) > self._max_entries:
            self._pinned.popitem(last=False)

    def put(self, key: CacheKey, verdict: Classification) -> None:
        if key in self._pinned:
            return  # a person decided this content
        self._entries[key] = (self._clock(), verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class UndecidedAnswers(KeptByDigest[Classification]):
    """Answers to texts that no stage decided where no reasoner is configured (the most confident
    stage's guess, marked undecided), by the digest of the text's cache key, per state: the
    policy's key and version and the weights in force of each stage its plan asks (the cascade
    makes the state). The verdict cache keeps no such answer (it is not a verdict), and a chat
    stream repeats its texts, so each copy was decided again from its scores; in the same state it
    is the same answer, bit for bit.

    The cascade keeps an answer only where the digest stands for the features of every stage asked
    (ASCII text and the compiled n-grams alone, as for `ScoreMemo`), and reads one only for ASCII
    text. At most `max_entries` answers and states are held.
    """

    def __init__(self, max_entries: int = UNDECIDED_ANSWERS):
        super().__init__(max_entries)
