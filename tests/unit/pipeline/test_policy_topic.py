"""The offline pre-flight with `policies.topic`: the files load, and the routes wait for the topic
(`run` checks them once it has read it: tests/integration/test_policy_topic.py)."""

from __future__ import annotations

import yaml

from tests.unit.test_config import run_cli


def test_check_config_with_a_policy_topic_takes_an_empty_folder_and_routes_to_policies_only_the_topic_holds(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        "policies": {"directory": str(folder), "topic": "policies", "default": "chat-harassment",
                     "routes": [{"where": {"community_id": "kids"}, "policies": ["kids/chat-harassment"]}]},
    }))  # fmt: skip
    result = run_cli("check-config", "--quiet", "--config", str(path))
    assert result.returncode == 0, result.stderr

    data = yaml.safe_load(path.read_text())
    del data["policies"]["topic"]
    path.write_text(yaml.safe_dump(data))
    without = run_cli("check-config", "--quiet", "--config", str(path))
    assert without.returncode == 2
    assert f"policies.directory: no policy files (*.md) in {folder}" in without.stderr
