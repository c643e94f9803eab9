r"""The keyword classifier: each policy's `patterns` as case-insensitive regular expressions.

Most content matches no pattern, so the search for none is what a keyword-decided record pays.
Two prefilters make it cheap without changing an answer: for ASCII content (most chat), the
literal text every match must contain (`_required_literals`: "kys" in `\bkys\b`), looked for in
the lower-cased content by `in`; and for the rest, the characters a match can start with, as a
lookahead on the joined patterns (`_first_characters`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

try:  # the parser `re` compiles with; private, so the prefilter below is skipped if it moves
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a Python whose `re` is laid out differently
    sre = sre_parse = None

from consumer.classify import Capacity, Classification, ClassifyRequest

_NO_MATCH = Classification(violation=False, rationale="no pattern matched", model="keyword")


class KeywordClassifier:
    """Flags content matching any of a policy's `patterns` (case-insensitive regular expressions).

    Deterministic and instant: for pipelines without a model, for tests, and as a baseline.
    A policy without patterns never flags anything.
    """

    name = "keyword"

    def __init__(self, max_concurrency: int = 1024) -> None:
        self._max_concurrency = max_concurrency
        self._compiled: dict[str, _Compiled] = {}  # by policy ref

    async def start(self) -> None:
        return None

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self._max_concurrency)

    async def classify(self, request: ClassifyRequest) -> Classification:
        return self.classify_now(request)

    def classify_now_many(self, requests: Sequence[ClassifyRequest]) -> list[Classification]:
        return [self.classify_now(request) for request in requests]

    def classify_now(self, request: ClassifyRequest) -> Classification:
        policy = request.policy
        compiled = self._compiled.get(policy.ref)
        if compiled is None:
            compiled = self._compiled[policy.ref] = _compile(policy.patterns)
        any_pattern, patterns, literals = compiled
        content = request.content
        if literals is not None and content.isascii():  # isascii: a flag of the string, no scan
            lowered = content.lower()
            for literal in literals:
                if literal in lowered:
                    break
            else:
                return _NO_MATCH  # no literal a match needs (docs/benchmark.md, issue 31, thirteenth round)
        if any_pattern is not None and any_pattern.search(content) is None:
            return _NO_MATCH  # most content: one search instead of one per pattern
        for pattern in patterns:
            if pattern.search(content):
                return Classification(
                    violation=True,
                    category=next(iter(policy.categories), None),
                    confidence="high",
                    rationale=f"matched pattern /{pattern.pattern}/",  # as written, not repr's doubled backslashes
                    model=self.name,
                )
        return _NO_MATCH

    async def close(self) -> None:
        return None


# A policy's patterns compiled: all of them as one alternation (None when they cannot be joined),
# each of them, and the literals of which every match on ASCII content contains one (None: unknown).
_Compiled = tuple[re.Pattern[str] | None, list[re.Pattern[str]], tuple[str, ...] | None]


def _compile(sources: Sequence[str]) -> _Compiled:
    """Each pattern, all of them as one alternation where that means the same (no groups, whose
    numbers a join would shift), and the literals a match needs."""
    patterns = [re.compile(p, re.IGNORECASE) for p in sources]
    literals: list[str] | None = []
    for source in sources:
        needed = _required_literals(source)
        if needed is None or literals is None:
            literals = None
        else:
            literals.extend(needed)
    required = tuple(literals) if literals else None
    if not patterns or any(p.groups for p in patterns):
        return None, patterns, required
    joined = "|".join(f"(?:{p})" for p in sources)
    firsts = _first_characters(joined)
    if firsts is not None:
        # Every match starts with one of these characters: a lookahead for them lets the search
        # skip most positions at one class test each, instead of trying every pattern there (a
        # leading \b keeps `re` from finding that prefix itself). 1.8 against 2.7 µs a request for
        # the bench's chat messages and policy (docs/benchmark.md, issue 31, eighth round).
        joined = f"(?=[{firsts}])(?:{joined})"
    try:
        return re.compile(joined, re.IGNORECASE), patterns, required
    except re.error:  # e.g. a pattern's leading global flags, which only work at the start
        return None, patterns, required


def _required_literals(source: str) -> list[str] | None:
    r"""Lower-case ASCII strings of which every case-insensitive match of `source` on ASCII text
    contains one ("kill yourself" for `\bkill yourself\b`, "cat" or "dog" for `cat|dog`), or None
    when that cannot be told simply. On ASCII text a case-insensitive ASCII literal matches just
    where its lower case is in the text's: the other characters `re` folds together (the Kelvin
    sign with k, the dotless i with i) are not ASCII, which is why non-ASCII content is searched."""
    if sre_parse is None:
        return None
    try:
        return _literals(list(sre_parse.parse(source, re.IGNORECASE)))
    except Exception:  # noqa: BLE001 - a parser that changed shape: no prefilter, same answers
        return None


def _literals(items: list[tuple[Any, Any]]) -> list[str] | None:
    """The longest run of ASCII literals at the top of `items` (a match holds all of it), else one
    from each branch of an alternation that is all of `items`."""
    longest, run = "", []
    for op, av in items:
        if op is sre.LITERAL and av < 128:
            run.append(chr(av))
            continue
        if len(run) > len(longest):
            longest = "".join(run)
        run = []
    if len(run) > len(longest):
        longest = "".join(run)
    if longest:
        return [longest.lower()]
    if len(items) != 1:
        return None
    op, av = items[0]
    if op is sre.SUBPATTERN:
        _group, add_flags, del_flags, pattern = av
        return None if add_flags or del_flags else _literals(list(pattern))
    if op is sre.BRANCH:
        found: list[str] = []
        for branch in av[1]:
            literals = _literals(list(branch))
            if literals is None:
                return None
            found.extend(literals)
        return found
    return None


def _first_characters(source: str) -> str | None:
    """A character class's body holding every character a match of `source` can start with, or
    None when that cannot be told simply (a pattern that may match the empty string, starts with
    any character, a category, a negated class, a lookaround or a change of flags)."""
    if sre_parse is None:
        return None
    try:
        parsed = sre_parse.parse(source, re.IGNORECASE)
        items = _firsts(list(parsed))
    except Exception:  # noqa: BLE001 - a parser that changed shape: no prefilter, same answers
        return None
    if not items:
        return None
    return "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in sorted(items))


def _firsts(items: list[tuple[Any, Any]]) -> set[tuple[int, int]] | None:
    """The (lowest, highest) code point ranges the first consumed character of `items` lies in."""
    for op, av in items:
        if op is sre.AT:  # zero-width (\b, ^): the next item consumes the first character
            continue
        if op is sre.LITERAL:
            return {(av, av)}
        if op is sre.IN:
            ranges = set()
            for kind, value in av:
                if kind is sre.LITERAL:
                    ranges.add((value, value))
                elif kind is sre.RANGE:
                    ranges.add(value)
                else:  # a negation or a category (\w, \d): not worth spelling out
                    return None
            return ranges
        if op is sre.BRANCH:
            union: set[tuple[int, int]] = set()
            for branch in av[1]:
                firsts = _firsts(list(branch))
                if firsts is None:
                    return None
                union |= firsts
            return union
        if op is sre.SUBPATTERN:
            _group, add_flags, del_flags, pattern = av
            return None if add_flags or del_flags else _firsts(list(pattern))
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, _high, pattern = av
            return _firsts(list(pattern)) if low > 0 else None
        if op is sre.ATOMIC_GROUP:
            return _firsts(list(av))
        return None  # anything else (., a lookaround, a back-reference): no prefilter
    return None  # nothing consumed: the pattern can match the empty string
