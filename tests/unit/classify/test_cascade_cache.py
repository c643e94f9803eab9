"""The verdict cache: repeated content hits, an edited policy misses, size and age are bounded."""

import pytest

from consumer.classify import Classification
from consumer.classify.cascade.cache import VerdictCache, cache_key, cache_keys, normalise
from consumer.policy import parse_policy
from tests.conftest import REPO

POLICY_BYTES = (REPO / "policies" / "spam-scams.md").read_bytes()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def verdict(violation: bool = True) -> Classification:
    return Classification(violation=violation, confidence="high", model="gpt-oss-safeguard-20b",
                          prompt_tokens=600, cached_tokens=500, completion_tokens=40, reasoning="audit text")


def test_copies_that_differ_only_in_case_spacing_and_invisible_characters_share_a_key():
    policy = parse_policy(POLICY_BYTES)
    original = "FREE NITRO for everyone -> discord-gift.xyz/claim"
    copies = [
        "free nitro   for everyone -> DISCORD-GIFT.xyz/claim",
        "FREE\u200bNITRO for everyone -> discord-gift.xyz/claim",
    ]
    assert cache_key(policy, copies[0]) == cache_key(policy, original)
    assert normalise(copies[1]) == "freenitro for everyone -> discord-gift.xyz/claim"  # zero-width space removed
    assert cache_key(policy, "free nitro for nobody") != cache_key(policy, original)


def test_a_batchs_keys_are_each_contents_own():
    """`cache_keys` (a poll batch's, with ASCII content normalised inline) gives `cache_key`'s keys."""
    policy = parse_policy(POLICY_BYTES)
    contents = ["FREE NITRO  for\teveryone ", "free nitro for everyone", "ＦＲＥＥ nitro", "FREE\u200bNITRO",
                "", "   ", "\x1c a \x1f b", "ñandú\u00a0Straße", "😂 lol", "a\u2028b"]
    assert cache_keys(policy, contents) == [cache_key(policy, content) for content in contents]
    keys = cache_keys(policy, contents)
    assert keys[0] == keys[1] and keys[4] == keys[5]  # one content each way, written differently
    assert len(set(keys)) == len(set(map(normalise, contents)))


def test_a_repeated_message_hits_and_the_hit_says_it_came_from_the_cache():
    cache = VerdictCache(max_entries=10, ttl_s=60)
    key = cache_key(parse_policy(POLICY_BYTES), "dm me to get 10x profit on crypto")
    assert cache.get(key) is None
    cache.put(key, verdict())
    hit = cache.get(key)
    assert hit is not None and hit.violation is True and hit.confidence == "high"
    assert hit.model == "cascade:cache"
    assert (hit.prompt_tokens, hit.cached_tokens, hit.completion_tokens, hit.reasoning) == (0, 0, 0, None)


def test_an_edited_policy_misses_the_verdicts_of_its_previous_version():
    cache = VerdictCache(max_entries=10, ttl_s=60)
    before = parse_policy(POLICY_BYTES)
    after = parse_policy(POLICY_BYTES.replace(b"repeated advertising", b"repeated or off-topic advertising"))
    assert before.id == after.id and before.version != after.version
    cache.put(cache_key(before, "join my server"), verdict())
    assert cache.get(cache_key(before, "join my server")) is not None
    assert cache.get(cache_key(after, "join my server")) is None


def test_entries_expire_after_the_ttl_and_the_least_recently_used_go_first():
    clock = Clock()
    cache = VerdictCache(max_entries=2, ttl_s=10, clock=clock)
    policy = parse_policy(POLICY_BYTES)
    a, b, c = (cache_key(policy, text) for text in ("a", "b", "c"))
    cache.put(a, verdict())
    cache.put(b, verdict(False))
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, verdict())
    assert len(cache) == 2 and cache.get(b) is None and cache.get(a) is not None
    clock.now = 10.5
    assert cache.get(a) is None and cache.get(c) is None


def test_normalising_ascii_text_the_short_way_gives_what_the_full_way_gives():
    import re
    import unicodedata

    def full_way(content: str) -> str:  # NFKC, invisible characters out, case-folded, `\s+` collapsed
        text = re.sub("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad]", "", unicodedata.normalize("NFKC", content))
        return re.sub(r"\s+", " ", text.casefold()).strip()

    texts = ["  Free NITRO\t\tnow \n", "a\x1cb\x1fc\x0bd\x0ce", "", " ", "ﬁne ＦＵＬＬ\u00a0width\u3000space\u2028line",
             "Straße İstanbul", "zero\u200bwidth\u00adsoft", "ok"]  # fmt: skip
    for text in texts:
        assert normalise(text) == full_way(text), repr(text)


def test_the_compiled_normalising_is_pythons_on_any_text(monkeypatch):
    """`_ngrams.normalised` (C) against the Python way on fuzzed text: ASCII, every white space
    kind (ASCII's and Unicode's), every plane, lone surrogates, texts past its 512-byte stack
    buffer. Its strings are of the narrowest kind their characters allow (a wider space taken
    out), as Python's are: else equal text would compare unequal."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from consumer.classify.cascade import cache

    if cache._words_joined is None:
        pytest.skip("consumer/classify/cascade/_ngrams.c was not compiled here (no C compiler at install)")
    compiled = cache._words_joined

    def python_way(text: str) -> str:
        monkeypatch.setattr(cache, "_words_joined", None)
        try:
            return normalise(text)
        finally:
            monkeypatch.setattr(cache, "_words_joined", compiled)

    spaces = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u202f\u3000"
    texts = st.one_of(
        st.text(st.characters(max_codepoint=127), max_size=60),
        st.text(st.sampled_from(spaces + "aAzZ09_!-"), min_size=500, max_size=700),
        st.text(st.characters(blacklist_categories=()), max_size=60),  # surrogates too
        st.text(st.sampled_from(spaces + "ÀßİǅΣς€😂\u200b"), min_size=100, max_size=300),
    )

    @settings(max_examples=400, deadline=None)
    @given(texts)
    def same(text: str) -> None:
        assert normalise(text) == python_way(text)

    same()
    assert normalise("  Ünïcode \u3000 X ") == "ünïcode x" and compiled("Fr\u3000EE  nitro") == "fr ee nitro"
    assert compiled("é\u3000\u3000x😂") == "é x😂" and compiled("é\u3000\u3000x") == "é x"  # str's kinds compare first
