"""`check-config` is the pre-flight of `run`: what `run` rejects before its first poll,
`check-config` rejects too, with exit 2 naming the key and never a secret's value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.unit.test_config import run_cli

SECRET = "hunter2-do-not-print"


def config(tmp_path: Path, policies_dir: Path | None = None, **sections: dict) -> Path:
    policies = {"directory": str(policies_dir or REPO / "policies"), "default": "chat-harassment",
                **sections.pop("policies", {})}
    data = {"policies": policies,
            # Nothing listens here: `run` must stop on the configuration before it connects.
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "startup_timeout_s": 1, **sections.pop("kafka", {})},
            **sections}  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def both(path: Path) -> list:
    return [run_cli("check-config", "--config", str(path)), run_cli("run", "--config", str(path))]


def test_a_misspelled_librdkafka_option_is_named_and_its_secret_hidden(tmp_path):
    path = config(tmp_path, kafka={"consumer": {"sasl.pasword": SECRET}})
    for result in both(path):
        assert result.returncode == 2, result.stderr
        assert "kafka.consumer.sasl.pasword: not a librdkafka option" in result.stderr
        assert SECRET not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


def test_a_mistyped_librdkafka_value_is_named(tmp_path):
    path = config(tmp_path, kafka={"consumer": {"fetch.wait.max.ms": "soon"}})
    for result in both(path):
        assert result.returncode == 2
        assert "kafka.consumer.fetch.wait.max.ms" in result.stderr
        assert len(result.stderr.splitlines()) <= 3


def test_an_invalid_policy_file_fails_check_config_as_it_fails_run(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "broken.md").write_text("---\nid: broken\nreasoning_effort: extreme\n---\nno sections\n")
    for result in both(config(tmp_path, policies)):
        assert result.returncode == 2
        assert "policies.directory" in result.stderr and "broken.md" in result.stderr


def test_a_route_naming_an_unknown_policy_fails_check_config(tmp_path):
    path = config(tmp_path, policies={"routes": [{"policies": ["nope"]}]})
    for result in both(path):
        assert result.returncode == 2
        assert "nope" in result.stderr and "policies.routes" in result.stderr


def test_check_config_prints_the_configuration_and_what_run_would_start(tmp_path):
    result = run_cli("check-config", "--config", str(config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert '"bootstrap_servers": "127.0.0.1:1"' in result.stdout
    assert "would start: classifier keyword" in result.stderr and "chat-harassment@" in result.stderr


@pytest.mark.parametrize("command", [("check-config", "--connect"), ("run",)])
def test_unreachable_brokers_exit_1_with_one_line(tmp_path, command):
    result = run_cli(*command, "--config", str(config(tmp_path)))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "unreachable" in line]
    assert len(errors) == 1 and "127.0.0.1:1" in errors[0]


def test_kind_vllm_where_vllm_is_not_installed_fails_the_offline_pre_flight(tmp_path, monkeypatch):
    import sys

    from consumer.config import ConfigError, load_settings
    from consumer.pipeline.preflight import prepare

    monkeypatch.setitem(sys.modules, "vllm", None)  # what find_spec reports where it is not installed
    settings = load_settings(config(tmp_path, classifier={"kind": "vllm"}))
    with pytest.raises(ConfigError, match=r"classifier.reasoner: in_process \(classifier.kind reasoner\) runs vLLM in this process, and vllm is not installed"):
        prepare(settings, build_engine=False)  # check-config's: it does not build the engine, yet says what run would
    cheap = load_settings(config(tmp_path, classifier={"kind": "cascade", "reasoner": "none"}))
    assert prepare(cheap, build_engine=False).policies.get()  # no reasoner: vLLM is not needed


def test_check_config_connect_names_a_busy_metrics_port_before_it_connects(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config(tmp_path, telemetry={"http_port": port})
        result = run_cli("check-config", "-q", "--connect", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: telemetry.http_port: port") and str(port) in result.stderr
    assert "unreachable" not in result.stderr  # the configuration first: the brokers (none here) were not asked


def community_policies(tmp_path: Path, communities: int) -> Path:
    """The sample policies plus one variant of chat-harassment per community."""
    folder = tmp_path / "policies"
    shutil.copytree(REPO / "policies", folder)
    text = (REPO / "policies" / "chat-harassment.md").read_text()
    for n in range(communities):
        own = text.replace("id: chat-harassment\n", f"id: chat-harassment\ncommunity: c{n}\n", 1)
        (folder / f"c{n}.md").write_text(own)
    return folder


def test_check_config_counts_many_policies_rather_than_naming_them(tmp_path):
    result = run_cli("check-config", "--config", str(config(tmp_path, community_policies(tmp_path, 30))))
    assert result.returncode == 0, result.stderr
    started = next(line for line in result.stderr.splitlines() if "would start:" in line)
    assert "policies 4 platform policies, 30 community policies in 30 communities; input" in started
    assert "c0/" not in started


def test_a_route_naming_a_community_policy_fails_check_config_with_its_key(tmp_path):
    routes = [{"policies": ["c0/chat-harassment"]}]
    path = config(tmp_path, community_policies(tmp_path, 1), policies={"routes": routes})
    for result in both(path):
        assert result.returncode == 2
        assert "policies.routes/default name community policies: c0/chat-harassment" in result.stderr
