"""Conversation windows and repeat offenders: bounded, pseudonymous, escalating."""

from datetime import datetime, timedelta, timezone

from consumer.config.chat import ChatSettings
from consumer.events import ContentEvent
from consumer.pipeline.chat import Conversations, Offenders

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def msg(i: int, author: str, channel: str = "c1", seconds: float = 0, **metadata) -> ContentEvent:
    return ContentEvent(event_id=f"m{i}", content=f"text {i}", author_id=author, context_id=channel,
                        created_at=T0 + timedelta(seconds=seconds), metadata=metadata)


def test_window_keeps_the_last_messages_with_stable_pseudonyms():
    conversations = Conversations(ChatSettings(context_messages=3, context_seconds=600))
    for i, author in enumerate(["alice", "bob", "alice", "carol"]):
        view = conversations.observe(msg(i, author, seconds=i))
    assert [m.content for m in view.context] == ["text 0", "text 1", "text 2"]  # the 3 before it
    assert [m.author_id for m in view.context] == ["user-1", "user-2", "user-1"]  # alice, bob, alice
    assert view.author_id == "user-3"  # carol
    view = conversations.observe(msg(4, "dave", seconds=4))
    assert [m.content for m in view.context] == ["text 1", "text 2", "text 3"]
    assert "alice" not in view.model_dump_json() and "bob" not in view.model_dump_json()


def test_the_view_is_built_only_when_a_classifier_reads_the_event_and_then_once():
    from consumer.classify import ClassifyRequest
    from consumer.policy import Policy

    conversations = Conversations(ChatSettings(context_messages=3, context_seconds=600))
    conversations.observe_lazily(msg(0, "alice"))
    view = conversations.observe_lazily(msg(1, "bob", seconds=1))
    policies = [Policy(id=p, version="1", text="b") for p in ("a", "b")]
    requests = [ClassifyRequest(view, policy, f"m1/{policy.id}") for policy in policies]
    assert [r.content for r in requests] == ["text 1", "text 1"]  # what cheap stages read
    assert view._built is None  # nothing built for them
    event = requests[0].event
    assert [m.author_id for m in event.context] == ["user-1"] and event.author_id == "user-2"
    assert requests[1].event is event  # one view per event, whichever request builds it
    plain = msg(2, "carol")
    assert Conversations(ChatSettings()).observe_lazily(plain) is plain  # off, no context carried: nothing to hide


def test_old_messages_expire_and_channels_are_separate():
    conversations = Conversations(ChatSettings(context_messages=10, context_seconds=60))
    conversations.observe(msg(0, "a", seconds=0))
    conversations.observe(msg(1, "b", channel="c2", seconds=1))
    view = conversations.observe(msg(2, "c", seconds=120))
    assert view.context == []


def test_memory_stays_bounded_with_100k_channels():
    conversations = Conversations(ChatSettings(context_messages=5, max_channels=1000, max_message_chars=20))
    for i in range(100_000):
        conversations.observe(ContentEvent(event_id=f"e{i}", content="x" * 1000, author_id="a",
                                           context_id=f"channel-{i}", created_at=T0))
    assert len(conversations) == 1000
    assert conversations.stored_messages() == 1000


def test_a_reply_pulls_in_the_message_it_answers_even_outside_the_window():
    far = Conversations(ChatSettings(context_messages=2, context_seconds=600))
    far.observe(msg(0, "alice", channel="thread-a"))
    far.observe(msg(1, "bob", channel="thread-b"))
    view = far.observe(msg(2, "carol", channel="thread-b", reply_to="m0"))
    assert [m.event_id for m in view.context] == ["m0", "m1"]


def test_edits_replace_the_original_and_deletions_leave_the_context():
    conversations = Conversations(ChatSettings(context_messages=10))
    conversations.observe(msg(0, "alice"))
    conversations.observe(msg(1, "bob"))
    edited = ContentEvent(event_id="m0", content="edited text", author_id="alice", context_id="c1",
                          created_at=T0, metadata={"event_type": "edit"})
    view = conversations.observe(edited)
    assert [m.event_id for m in view.context] == ["m1"]
    conversations.observe(ContentEvent(event_id="m1", content="-", context_id="c1", created_at=T0,
                                       metadata={"event_type": "delete"}))
    view = conversations.observe(msg(2, "carol"))
    assert [(m.event_id, m.content) for m in view.context] == [("m0", "edited text")]


def test_repeat_offenders_escalate_across_thresholds_within_the_window():
    offenders = Offenders(ChatSettings(offender_window_s=3600, offender_thresholds=[
        {"violations": 2, "action": "timeout"}, {"violations": 3, "action": "escalate"}]))
    actions = [offenders.record("guild", "troll", True, "delete", at=t)[0] for t in (0, 10, 20)]
    assert actions == ["delete", "timeout", "escalate"]
    assert offenders.record("guild", "troll", False, "allow", at=30) == ("allow", 3)
    assert offenders.record("other-guild", "troll", True, "delete", at=40) == ("delete", 1)
    assert offenders.record("guild", "troll", True, "delete", at=4000)[0] == "delete"  # the window moved on
    assert offenders.record("guild", "troll", True, "flag", at=4001) == ("timeout", 2)


def test_offender_memory_is_bounded():
    offenders = Offenders(ChatSettings(max_authors=100, offender_thresholds=[{"violations": 2, "action": "timeout"}]))
    for i in range(10_000):
        offenders.record("g", f"author-{i}", True, "delete", at=i)
    assert len(offenders) == 100


def test_a_communitys_thresholds_replace_the_configured_ones_for_its_events():
    offenders = Offenders(ChatSettings(offender_thresholds=[{"violations": 2, "action": "timeout"}]))
    lenient = ((5, "timeout"),)
    assert [offenders.record("gamers", "u", True, "delete", at=t, thresholds=lenient)[0] for t in range(5)] == [
        "delete", "delete", "delete", "delete", "timeout"]  # fmt: skip
    assert [offenders.record("kids", "u", True, "delete", at=t)[0] for t in range(2)] == ["delete", "timeout"]
    off = ()  # a community that turns counting off
    assert offenders.record("chill", "u", True, "delete", at=1, thresholds=off) == ("delete", 0)
    assert offenders.count("chill", "u", at=1, thresholds=off) is None and not offenders.counts(off)
    # Configured thresholds off, a community's on: its events are counted all the same.
    unset = Offenders(ChatSettings())
    assert not unset.enabled and unset.counts(lenient)
    assert unset.record("gamers", "u", True, "flag", at=0, thresholds=((1, "timeout"),)) == ("timeout", 1)
    assert unset.count("gamers", "u", at=0, thresholds=lenient) == 1


def test_a_rebuild_counts_earlier_violations_for_a_communitys_own_thresholds_with_none_configured():
    offenders = Offenders(ChatSettings(offender_window_s=3600))
    earlier = [{"violation": True, "author_id": "u", "community_id": "gamers", "source": {"timestamp_ms": t * 1000}}
               for t in (1, 2)]  # fmt: skip
    offenders.replay(earlier)
    own = ((3, "timeout"),)
    assert offenders.count("gamers", "u", at=10, thresholds=own) == 2
    assert offenders.record("gamers", "u", True, "delete", at=10, thresholds=own) == ("timeout", 3)


def test_an_authors_count_for_a_reviewer_is_read_without_counting():
    offenders = Offenders(ChatSettings(offender_window_s=100, offender_thresholds=[{"violations": 3, "action": "timeout"}]))
    assert offenders.count("guild", "troll", at=0) == 0 and offenders.count("guild", None) is None
    for t in (0, 10):
        offenders.record("guild", "troll", True, "delete", at=t)
    assert offenders.count("guild", "troll", at=20) == 2 == offenders.count("guild", "troll", at=20)
    assert offenders.count("guild", "troll", at=105) == 1  # the first left the window
    assert Offenders(ChatSettings()).count("guild", "troll") is None  # counting is off
