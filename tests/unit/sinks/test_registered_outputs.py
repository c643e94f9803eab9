"""`sinks.registered_outputs`: the settings it is refused with, and which topics it frames."""

from __future__ import annotations

import pytest

from consumer.config import Settings
from consumer.sinks.registry import output_schema, registered_topics

REGISTRY = {"url": "http://registry:8081"}


def test_registered_outputs_without_a_registry_url_are_refused_naming_both_keys():
    with pytest.raises(ValueError, match="sinks.registered_outputs needs schema_registry.url"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdict"]}})


def test_verdicts_and_dead_letters_registered_on_one_topic_are_refused():
    with pytest.raises(ValueError, match="verdict and dead_letter need two topics"):
        Settings.model_validate({"kafka": {"verdict_topic": "out", "dead_letter_topic": "out"},
                                 "sinks": {"registered_outputs": ["verdict", "dead_letter"]},
                                 "schema_registry": REGISTRY})  # fmt: skip


def test_an_output_kind_listed_twice_or_unknown_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdict", "verdict"]}, "schema_registry": REGISTRY})
    with pytest.raises(ValueError, match="registered_outputs"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdicts"]}, "schema_registry": REGISTRY})


def test_review_items_and_our_plain_json_readers_of_the_topics_are_refused_not_yet_supported():
    with pytest.raises(ValueError, match="registered_outputs"):  # the review desk reads them as plain JSON
        Settings.model_validate({"sinks": {"registered_outputs": ["review_item"]}, "schema_registry": REGISTRY})
    with pytest.raises(ValueError, match="not supported with review.enabled yet"):
        Settings.model_validate({"sinks": {"registered_outputs": ["dead_letter"]}, "review": {"enabled": True},
                                 "schema_registry": REGISTRY})  # fmt: skip
    with pytest.raises(ValueError, match="chat.offender_thresholds and chat.rebuild_records"):
        Settings.model_validate({"sinks": {"registered_outputs": ["verdict"]}, "schema_registry": REGISTRY,
                                 "chat": {"offender_thresholds": [{"violations": 3, "action": "ban"}]}})  # fmt: skip


def test_only_the_registered_outputs_topics_are_framed_each_with_its_kinds_schema():
    settings = Settings.model_validate({
        "kafka": {"verdict_topic": "v", "dead_letter_topic": "d"},
        "sinks": {"registered_outputs": ["verdict"]}, "schema_registry": REGISTRY,
    })  # fmt: skip
    assert registered_topics(settings) == {"v": "verdict"}
    assert '"title": "Verdict"' in output_schema("verdict").schema_str
    assert registered_topics(Settings.model_validate({})) == {}  # the default: every output plain JSON
