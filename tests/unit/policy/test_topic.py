"""The policy topic's records merged with the files: checked as a file is, the topic winning, a
bad record counted and the last good version kept. (The broker side: tests/integration/test_policy_topic.py.)"""

from dataclasses import dataclass, field

import pytest

from consumer.policy import PolicyError, parse_policy
from consumer.policy.topic import PUBLISHED_BY, TopicPolicyStore, check_record, latest, with_front_matter
from tests.conftest import REPO

GOOD = (REPO / "policies" / "chat-harassment.md").read_text()
SPAM = (REPO / "policies" / "spam-scams.md").read_text()


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    where: str = "policies[0]@7"


def record(key: str, text: str | None, **headers: str) -> Record:
    return Record(key.encode(), None if text is None else text.encode(), headers)


@pytest.fixture
def reloads() -> list[tuple[dict, list[str]]]:
    return []


@pytest.fixture
def store(tmp_path, reloads):
    (tmp_path / "chat.md").write_text(GOOD)
    return TopicPolicyStore(tmp_path, on_reload=lambda policies, errors: reloads.append((dict(policies), errors)))


def test_a_topic_record_takes_the_key_from_the_file_and_its_tombstone_gives_it_back(store, reloads):
    file_version = store.get()["chat-harassment"].version
    edited = GOOD.replace("## SAFE (0)", "## SAFE (0)\n- S5: Quoting song lyrics.")
    assert store.apply([record("chat-harassment", edited, **{PUBLISHED_BY: "ana@host"})]) is True
    in_force = store.get()["chat-harassment"]
    assert in_force.version == parse_policy(edited.encode()).version != file_version
    assert in_force.path is None  # from the topic: no examples file beside it
    assert store.published()["chat-harassment"].published_by == "ana@host"
    assert store.reloads == 1 and reloads[-1][1] == []

    assert store.apply([record("chat-harassment", None)]) is True
    assert store.get()["chat-harassment"].version == file_version
    assert store.published() == {} and store.reloads == 2
    assert reloads[-1][0]["chat-harassment"].version == file_version  # the callbacks hear a retirement too


def test_a_community_policy_is_in_force_under_community_and_id(store):
    text = with_front_matter(SPAM.encode(), "spam.md", community="kids-club").decode()
    store.apply([record("kids-club/spam-scams", text)])
    assert set(store.get()) == {"chat-harassment", "kids-club/spam-scams"}
    assert store.get()["kids-club/spam-scams"].community == "kids-club"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (Record(b"chat-harassment", GOOD.replace("## VIOLATES (1)", "## BROKEN").encode()), "missing section"),
        (Record(b"chat-harassment", b"\xff\xfe not text"), "not UTF-8"),
        (Record(b"someone-else", GOOD.encode()), "is not the policy's own key 'chat-harassment'"),
        (Record(b"\xff", GOOD.encode()), "key is not UTF-8"),
        (Record(None, GOOD.encode()), "record has no key"),
    ],
)
def test_a_bad_record_is_counted_and_logged_without_its_text_and_the_last_good_version_stays(store, caplog, bad, why):
    edited = GOOD.replace("## SAFE (0)", "## SAFE (0)\n- S5: Quoting song lyrics.")
    store.apply([record("chat-harassment", edited)])
    good_version = store.get()["chat-harassment"].version
    assert store.apply([bad]) is False
    assert store.get()["chat-harassment"].version == good_version
    assert store.rejected == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "consumer.policy.topic"]
    assert len(logged) == 1 and why in logged[0] and "policies[0]@7" in logged[0]
    assert "Targeted insults" not in logged[0]  # the policy's text is not logged


def test_check_record_names_where_the_record_is():
    with pytest.raises(PolicyError, match=r"^policies\[0\]@7:\d+: error: missing section"):
        check_record(Record(b"chat-harassment", GOOD.replace("## SAFE (0)", "## NOT SAFE").encode()))


def test_latest_keeps_the_last_record_of_each_key_and_drops_tombstoned_keys():
    records = [record("a", "one"), record("b", "two"), record("a", "three"), record("b", None)]
    assert {key: r.value for key, r in latest(records).items()} == {"a": b"three"}


def test_front_matter_is_set_and_removed_keeping_every_other_byte():
    candidate = GOOD.replace("id: chat-harassment\n", "id: chat-harassment-v2\nshadow_of: chat-harassment\n")
    promoted = with_front_matter(candidate.encode(), "c.md", id="chat-harassment", shadow_of=None)
    assert promoted == GOOD.encode()
    scoped = with_front_matter(GOOD.encode(), "c.md", community="kids club").decode()
    assert scoped.splitlines()[1:3] == ["id: chat-harassment", 'community: "kids club"']
    assert parse_policy(scoped.encode()).community == "kids club"
    with pytest.raises(PolicyError, match="missing YAML front matter"):
        with_front_matter(b"# no front matter\n", "c.md", community="x")
