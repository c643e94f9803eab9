"""`sinks:` is validated like every settings block: unknown keys and bad values refused by name, and
`run` and `check-config` exit 2 naming the key of a file that cannot be written."""

from __future__ import annotations

import pytest

from consumer.config import ConfigError, load_settings
from tests.conftest import REPO
from tests.unit.test_config import run_cli


def settings_from(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_settings(path)


def test_a_file_takes_verdicts_and_dead_letters_by_default(tmp_path):
    settings = settings_from(tmp_path, f"sinks:\n  files:\n    - path: {tmp_path}/v.jsonl\n")
    (only,) = settings.sinks.files
    assert (only.path, only.outputs, only.sync_interval_s) == (tmp_path / "v.jsonl", ["verdict", "dead_letter"], 0.1)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{path: TMP/v.jsonl, output: [verdict]}", "sinks.files.0.output: unknown key"),
        ("{path: TMP/v.jsonl, outputs: [verdicts]}", "sinks.files.0.outputs.0: Input should be 'verdict'"),
        ("{path: TMP/v.jsonl, outputs: []}", "sinks.files.0.outputs: List should have at least 1 item"),
        ("{path: TMP/v.jsonl, outputs: [verdict, verdict]}", "sinks.files.0.outputs: Value error, an output kind"),
        ("{path: TMP/nowhere/v.jsonl}", "sinks.files.0.path: Value error, the folder of this file does not exist"),
        ("{path: TMP/v.jsonl, sync_interval_s: 0}", "sinks.files.0.sync_interval_s: Input should be greater than 0"),
        ("{outputs: [verdict]}", "sinks.files.0.path: Field required"),
    ],
)
def test_a_bad_file_entry_names_its_key(tmp_path, entry, expected):
    with pytest.raises(ConfigError) as caught:
        settings_from(tmp_path, f"sinks:\n  files:\n    - {entry.replace('TMP', str(tmp_path))}\n")
    assert expected in str(caught.value)


def test_an_unknown_key_of_the_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="sinks.webhooks: unknown key"):
        settings_from(tmp_path, "sinks:\n  webhooks: []\n")


def test_two_entries_for_one_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="sinks.files: Value error, two files have the same path"):
        settings_from(tmp_path, f"sinks:\n  files:\n    - path: {tmp_path}/v.jsonl\n    - path: {tmp_path}/./v.jsonl\n")


def test_files_with_exactly_once_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="sinks.files needs pipeline.delivery at_least_once"):
        settings_from(
            tmp_path, f"pipeline:\n  delivery: exactly_once\nsinks:\n  files:\n    - path: {tmp_path}/v.jsonl\n"
        )


@pytest.mark.parametrize("section", ["consumer", "common"])
def test_exactly_once_refuses_readers_of_uncommitted_outputs(tmp_path, section):
    with pytest.raises(ConfigError, match=f"kafka.{section}.isolation.level: read_uncommitted is not allowed"):
        settings_from(tmp_path, f"pipeline:\n  delivery: exactly_once\nkafka:\n  {section}:\n"
                                "    isolation.level: read_uncommitted\n")  # fmt: skip


def test_review_with_exactly_once_is_accepted(tmp_path):
    # Review items join the verdict's transaction (consumer.sinks.kafka.TransactionalSink).
    settings = settings_from(tmp_path, "pipeline:\n  delivery: exactly_once\nreview:\n  enabled: true\n")
    assert (settings.pipeline.delivery, settings.review.enabled) == ("exactly_once", True)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{path: TMP}", "sinks.files.0.path: TMP is a folder, not a file"),
        ("{path: TMP/nowhere/v.jsonl}", "sinks.files.0.path: Value error, the folder of this file does not exist"),
    ],
)
def test_run_and_check_config_exit_2_for_a_file_that_cannot_be_written(tmp_path, entry, expected):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"policies:\n  directory: {REPO / 'policies'}\n  default: chat-harassment\n"
        # Nothing listens here: `run` must stop on the configuration before it connects.
        "kafka:\n  bootstrap_servers: 127.0.0.1:1\n  startup_timeout_s: 1\n"
        f"sinks:\n  files:\n    - {entry.replace('TMP', str(tmp_path))}\n"
    )
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2, result.stderr
        assert expected.replace("TMP", str(tmp_path)) in result.stderr
        assert "Traceback" not in result.stderr
