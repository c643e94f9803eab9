"""A bad config exits 2 naming the key and the problem, and never prints a secret."""

import os
import subprocess
import sys

import pytest

from consumer.config import ConfigError, load_settings, redact
from tests.conftest import REPO


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_environment_overrides_the_file_with_nested_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  bootstrap_servers: file:9092\n  group_id: from-file\n")
    monkeypatch.setenv("SAFEGUARD_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("SAFEGUARD_KAFKA__INPUT_TOPICS", "a,b")
    monkeypatch.setenv("SAFEGUARD_PIPELINE__MAX_IN_FLIGHT_EVENTS", "77")
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert settings.kafka.group_id == "from-file"
    assert settings.kafka.input_topics == ["a", "b"]
    assert settings.pipeline.max_in_flight_events == 77


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("pipeline:\n  max_in_flight_events: 0\n", "pipeline.max_in_flight_events: Input should be greater than"),
        ("kafka:\n  bootstrap_server: x\n", "kafka.bootstrap_server: unknown key"),
        ("kafka:\n  input_topics: ['^(bad']\n", "kafka.input_topics"),
        ("classifier:\n  kind: plugin\n", "classifier: Value error, kind 'plugin' needs classifier.factory"),
        ("decode:\n  field_mapping: {nope: a.b}\n", "decode.field_mapping: Value error, 'nope' is not a ContentEvent field"),
        ("kafka: [1, 2\n", "not valid YAML"),
        ("telemetry:\n  community_labels: -1\n", "telemetry.community_labels: Input should be greater than or equal"),
        ("telemetry:\n  community_rank_interval_s: 0\n", "telemetry.community_rank_interval_s: Input should be greater"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert expected in str(caught.value)


def test_cli_exits_2_naming_the_key_without_the_secret(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "kafka:\n  consumer:\n    sasl.password: hunter2-secret\n"
        "pipeline:\n  commit_interval_s: -1\n"
    )
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2
    assert "pipeline.commit_interval_s" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_cli_exits_2_for_a_missing_policies_directory(tmp_path, command):
    path = tmp_path / "c.yaml"
    path.write_text(f"policies:\n  directory: {tmp_path / 'nowhere'}\n")
    result = run_cli(command, "--config", str(path))
    assert result.returncode == 2
    assert "policies.directory" in result.stderr and "does not exist" in result.stderr


def test_a_misspelled_environment_section_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SAFEGUARD_KAFAK__GROUP_ID", "x")
    with pytest.raises(ConfigError) as error:
        load_settings(None)
    assert "SAFEGUARD_KAFAK__GROUP_ID" in str(error.value)
    assert "'kafak'" in str(error.value)


def test_a_misspelled_environment_key_is_blamed_on_the_variable_not_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  group_id: from-file\n")
    monkeypatch.setenv("SAFEGUARD_KAFKA__GROUPID", "x")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    message = str(error.value)
    assert "SAFEGUARD_KAFKA__GROUPID" in message and "kafka.groupid" in message
    assert str(path) not in message


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline:\n  commit_interval_s: 1\n")
    monkeypatch.setenv("SAFEGUARD_PIPELINE__COMMIT_INTERVAL_S", "soon")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert "environment variable SAFEGUARD_PIPELINE__COMMIT_INTERVAL_S: pipeline.commit_interval_s" in str(error.value)


def test_the_scripts_own_variables_are_not_settings(monkeypatch):
    monkeypatch.setenv("SAFEGUARD_CACHE_DIR", "/tmp/x")
    monkeypatch.setenv("SAFEGUARD_KEEP_KAFKA_DATA", "1")
    load_settings(None)


def test_check_config_hides_secrets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  producer:\n    sasl.password: hunter2-secret\n    ssl.key.password: k\n    linger.ms: 7\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout
    assert '"linger.ms": 7' in result.stdout


def test_redact_hides_misspelled_and_nested_secrets_but_not_token_budgets():
    data = {"kafka": {"consumer": {"sasl.pasword": "hunter2", "sasl.jaas.config": "j", "fetch.wait.max.ms": 5}},
            "classifier": {"options": {"api_key": "k", "nested": {"client_secret": "s"}}},
            "policies": {"max_tokens": 1500}, "pipeline": {"max_batch_tokens": 8192}}
    assert redact(data) == {
        "kafka": {"consumer": {"sasl.pasword": "***", "sasl.jaas.config": "***", "fetch.wait.max.ms": 5}},
        "classifier": {"options": {"api_key": "***", "nested": {"client_secret": "***"}}},
        "policies": {"max_tokens": 1500}, "pipeline": {"max_batch_tokens": 8192},
    }  # fmt: skip


def test_redact_keeps_ordinary_options():
    assert redact({"sasl.password": "x", "ssl.key.pem": "y", "sasl.oauthbearer.client.secret": "z", "acks": "all"}) == {
        "sasl.password": "***", "ssl.key.pem": "***", "sasl.oauthbearer.client.secret": "***", "acks": "all",
    }  # fmt: skip


def test_redact_shows_the_oauth_options_an_operator_checks_and_hides_the_free_form_ones():
    shown = {"sasl.oauthbearer.method": "oidc", "sasl.oauthbearer.client.id": "app", "sasl.oauthbearer.scope": "kafka",
             "client.id": "safeguard"}  # fmt: skip
    hidden = {"sasl.oauthbearer.config": "principal=x", "sasl.oauthbearer.extensions": "k=v"}
    assert redact({**shown, **hidden}) == {**shown, **dict.fromkeys(hidden, "***")}


def test_the_example_config_is_valid_and_routes_to_real_policies():
    from consumer.policy import PolicyStore
    from consumer.policy.route import Router

    settings = load_settings(REPO / "deploy" / "config.example.yaml")
    Router(settings.policies, PolicyStore(settings.policies.directory).get)  # raises if a route names a missing policy
    assert settings.policies.directory == (REPO / "policies").resolve()
