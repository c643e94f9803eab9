"""The keyword classifier: a policy's patterns, one search for content that matches none."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.classify import ClassifyRequest
from consumer.classify.keyword import KeywordClassifier
from consumer.events import ContentEvent
from consumer.policy import Policy


def policy(patterns: list[str]) -> Policy:
    # The classifier compiles per policy version: each set of patterns is a version of its own.
    return Policy(id="p", version="|".join(patterns), text="", patterns=tuple(patterns), categories={"harassment": "x"})


def ask(classifier: KeywordClassifier, p: Policy, texts: list[str]) -> list[tuple[bool, str | None]]:
    requests = [ClassifyRequest(ContentEvent(event_id=str(i), content=t), p, str(i)) for i, t in enumerate(texts)]
    return [(c.violation, c.rationale) for c in classifier.classify_now_many(requests)]


def test_the_first_matching_pattern_is_named_whether_or_not_the_patterns_can_be_joined():
    texts = ["you should KYS", "nobody wants you here", "hello there", "abcabc", "kys kys"]
    joined = policy([r"\bkys\b", r"nobody wants you"])
    grouped = policy([r"\bkys\b", r"nobody wants you", r"(abc)\1"])  # a back-reference: not joined
    flagged = policy([r"(?i)\bkys\b"])  # global flags: joining would fail
    k = KeywordClassifier()
    assert ask(k, joined, texts) == [
        (True, "matched pattern /\\bkys\\b/"), (True, "matched pattern /nobody wants you/"),
        (False, "no pattern matched"), (False, "no pattern matched"), (True, "matched pattern /\\bkys\\b/"),
    ]  # fmt: skip
    assert [v for v, _ in ask(k, grouped, texts)] == [True, True, False, True, True]
    assert [v for v, _ in ask(k, flagged, texts)] == [True, False, False, False, True]
    assert ask(k, policy([]), ["kys"]) == [(False, "no pattern matched")]


# Shapes the first-character prefilter reads (literals, classes, ranges, branches, groups,
# repeats, \b) and shapes it must give up on (optional starts, categories, negations, lookarounds,
# inline flags); the Kelvin sign and the dotted I fold to k and i under IGNORECASE.
PREFILTER_PATTERNS = [
    r"\bkys\b", r"nobody wants you", r"[x-z]{2}q", r"(?:ab|c[de])+f", r"(g|h)ij", r"(?>kl)m", r"a?bc",
    r"\wqq", r"[^a-y]zz", r"(?<=o)pp", r"(?-i:Tt)", r"K\u212a", r"^st$", r"(a|)bc",
]  # fmt: skip
ALPHABET = "abcdefghijklmnopqrstuvwxyzKT \u212a\u0130!"


def test_the_prefilter_names_every_first_character_or_gives_up():
    from consumer.classify.keyword import _first_characters

    def firsts(source: str) -> set[str] | None:
        body = _first_characters(source)
        return None if body is None else {c for c in map(chr, range(0x250)) if re.fullmatch(f"[{body}]", c)}

    assert firsts(r"(?:\bkill yourself\b)|(?:\bkys\b)|(?:\bnobody wants you here\b)") == {"k", "n"}
    assert firsts(r"[x-z]{2}q|(g|h)ij|(?>kl)m") == {"x", "y", "z", "g", "h", "k"}
    for source in (r"a?bc", r"\wqq", r"[^a-y]zz", r"(?<=o)pp", r"(?-i:Tt)", r"\b", r"x|.", r"(a|)bc"):
        assert firsts(source) is None, source


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=40),
    chosen=st.sets(st.sampled_from(PREFILTER_PATTERNS), min_size=1),
)
def test_the_prefiltered_search_flags_what_the_patterns_flag(text, chosen):
    chosen = sorted(chosen)
    expected = any(re.search(p, text, re.IGNORECASE) for p in chosen)
    assert ask(KeywordClassifier(), policy(chosen), [text])[0][0] is expected


def test_the_literals_a_match_needs_are_read_from_the_patterns_or_not_at_all():
    from consumer.classify.keyword import _required_literals as needed

    assert needed(r"\bkill yourself\b") == ["kill yourself"]
    assert needed(r"[x-z]{2}qq?ab\.c") == ["ab.c"]  # the longest run of literals a match holds
    assert needed(r"(?x) K Y S ") == ["kys"]  # as `re` reads the pattern, lower-cased
    assert needed(r"cat|(dog)|(?:b(ir)d)") == ["cat", "dog", "b"]  # one from each branch
    assert needed(r"Ke\u212av") == ["ke"]  # ASCII only: the Kelvin sign is no k to `in`
    for source in (r"\w+", r"[ab]c?", r"cat|\d", r"(?-i:Tt)", r"a*", r"(?=kys)"):
        assert needed(source) is None, source


# Patterns with literals of several shapes, and ASCII text made of their pieces: most texts are
# decided by the literals alone, and every answer must be the patterns' own.
LITERAL_PATTERNS = [
    r"\bkys\b", r"nobody wants you", r"(?:ab|c[de])+f", r"(g|h)ij", r"a?bc", r"\wqq", r"k\b",
    r"[^a-y]zz", r"(?<=o)pp", r"^st$", r"cat|dog", r"(?x) b c", r"Ke\u212a", r"(?-i:Tt)x",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["kys", "KyS", "ab", "cdf", "hij", "bc", "qq", "zz", "opp", "st", "CAT", "dog",
                                     "k", "K", "tt", "x", " ", "!", "e", "nobody wants you"]), min_size=1, max_size=8),
    chosen=st.sets(st.sampled_from(LITERAL_PATTERNS), min_size=1),
)  # fmt: skip
def test_on_ascii_text_the_literals_decide_as_the_patterns_do(pieces, chosen):
    text, chosen = "".join(pieces), sorted(chosen)
    expected = any(re.search(p, text, re.IGNORECASE) for p in chosen)
    assert ask(KeywordClassifier(), policy(chosen), [text])[0][0] is expected
