"""Every configuration the documentation shows passes `check-config`: the YAML blocks of
README.md and docs/*.md that are whole or partial configurations (their top-level keys are
settings sections), and the deploy/ configuration files. A reader copies them as written."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from consumer.cli import app
from consumer.config import Settings
from tests.conftest import REPO

_FENCE = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
SECTIONS = set(Settings.model_fields)


class _StrictLoader(yaml.SafeLoader):
    """YAML as a reader means it: a key given twice in one mapping (four `kafka:` maps in one
    block) is an error, not the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"keys given twice: {', '.join(twice)}", node.start_mark)
        return super().construct_mapping(node, deep)


def yaml_blocks() -> list[tuple[str, str]]:
    """(where, text) of every YAML block in README.md and docs/*.md."""
    blocks = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            blocks.append((f"{doc.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}", match.group(1)))
    return blocks


def documented_blocks() -> list[tuple[str, str]]:
    """The YAML blocks whose top-level keys are settings sections: whole or partial configurations."""
    blocks = []
    for where, text in yaml_blocks():
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError:
            continue  # test_every_yaml_block_is_yaml says so
        if isinstance(data, dict) and data and set(data) <= SECTIONS:
            blocks.append((where, text))
    return blocks


DEPLOY_CONFIGS = sorted(p for p in (REPO / "deploy").rglob("config*.yaml"))
# What docs/kafka.md says to keep in the environment rather than in the file.
SECRETS = {"sasl.password": "from-the-environment", "sasl.oauthbearer.client.secret": "from-the-environment"}


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(scope="module")
def mounted(tmp_path_factory) -> Path:
    """What the blocks expect under /etc/safeguard: a CA, a client certificate and its key."""
    directory = tmp_path_factory.mktemp("etc-safeguard")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=docs-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=docs")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "2")  # fmt: skip
    return directory


@pytest.mark.parametrize(("where", "text"), yaml_blocks(), ids=[where for where, _ in yaml_blocks()])
def test_every_yaml_block_is_yaml_with_each_key_once(where, text):
    yaml.load(text, Loader=_StrictLoader)


def test_the_docs_show_configuration_blocks_at_all():
    # The selection below must find something, or the parametrised test passes vacuously.
    assert len(documented_blocks()) >= 7 and len(DEPLOY_CONFIGS) >= 4


@pytest.mark.parametrize(("where", "text"), documented_blocks(), ids=[where for where, _ in documented_blocks()])
def test_every_documented_configuration_block_passes_check_config(where, text, tmp_path, monkeypatch, mounted):
    config = tmp_path / "config.yaml"
    # Paths the blocks name on a host: the mounted files, and a folder for output files.
    config.write_text(text.replace("/etc/safeguard/", f"{mounted}/").replace("/var/lib/safeguard/", f"{tmp_path}/"))
    _check(config, monkeypatch)


@pytest.mark.parametrize("path", DEPLOY_CONFIGS, ids=[_name(p) for p in DEPLOY_CONFIGS])
def test_every_deploy_configuration_passes_check_config(path: Path, monkeypatch):
    _check(path, monkeypatch)


def _check(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The files name where the container mounts the policies; here they are the repository's.
    monkeypatch.setenv("SAFEGUARD_POLICIES__DIRECTORY", str(REPO / "policies"))
    monkeypatch.setenv("SAFEGUARD_KAFKA__COMMON", json.dumps(SECRETS))
    monkeypatch.setenv("PROVIDER_API_KEY", "from-the-environment")  # docs/engine.md's provider key, as it says
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["check-config", "--quiet", "--config", str(config)])
    if "decode.message_type: cannot load 'shop.listings_pb2:Listing'" in result.output:
        # docs/registry.md's Protobuf topic names the class a user's producers generate; all else passes.
        assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
        return
    if importlib.util.find_spec("vllm") is None and "vllm is not installed here" in result.output:
        # `scripts/bootstrap core` has no vLLM: a `kind: vllm` block may say only that.
        assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
        return
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet: only problems, not even the "would start:" line
