"""Where the reasoner runs is said once, in `classifier.reasoner`: the one reading, the old
spellings (with a deprecation warning naming the new keys), and the documented served
configurations passing `check-config` as `run` accepts them."""

import logging
import re

import pytest

from consumer.classify.engine import EngineSettings, RemoteSettings, engine_settings
from consumer.config import ClassifierSettings, ConfigError, Settings, load_settings, resolve_reasoner_place
from tests.conftest import REPO
from tests.unit.test_config import run_cli

SERVED_CONFIGS = [REPO / "deploy/compose/config-served.yaml", REPO / "deploy/k8s/served/config.yaml"]
FLEET = {"endpoints": [{"url": "http://vllm-0.vllm:8000/v1"}]}


@pytest.mark.parametrize(
    ("classifier", "engine", "place"),
    [
        ({"kind": "reasoner"}, {}, "in_process"),
        ({"kind": "reasoner", "reasoner": "remote"}, FLEET, "remote"),
        ({"kind": "cascade"}, {}, None),
        ({"kind": "cascade", "reasoner": "remote"}, FLEET, "remote"),
        ({"kind": "keyword"}, {}, None),
        # The old spellings say the same.
        ({"kind": "vllm"}, {}, "in_process"),
        ({"kind": "vllm"}, {"kind": "remote", **FLEET}, "remote"),
        ({"kind": "cascade", "reasoner": "vllm"}, {"kind": "remote", **FLEET}, "remote"),
        ({"kind": "cascade", "reasoner": "vllm"}, {}, "in_process"),
        ({"kind": "cascade"}, {"kind": "remote", **FLEET}, None),  # engine.kind alone never adds a reasoner
    ],
)
def test_one_reading_of_where_the_reasoner_runs(classifier, engine, place):
    settings = Settings(classifier=classifier, engine=engine)
    assert settings.classifier.reasoner_place == place
    assert "kind" not in settings.engine  # the engine section holds only that engine's settings
    if place is not None:
        expected = RemoteSettings if place == "remote" else EngineSettings
        assert isinstance(engine_settings(settings.engine, place), expected)


@pytest.mark.parametrize(
    ("classifier", "engine", "new_keys"),
    [
        ({"kind": "vllm"}, {}, ["classifier.kind: vllm is deprecated: say classifier.kind: reasoner with "
                                "classifier.reasoner: in_process"]),
        ({"kind": "cascade", "reasoner": "vllm"}, {}, ["classifier.reasoner: vllm is deprecated: say "
                                                       "classifier.reasoner: in_process"]),
        ({"kind": "vllm"}, {"kind": "remote"}, ["engine.kind is deprecated: say classifier.reasoner: remote",
                                                "classifier.kind: vllm is deprecated: say classifier.kind: reasoner "
                                                "with classifier.reasoner: remote"]),
        ({"kind": "reasoner", "reasoner": "remote"}, {}, []),
    ],
)
def test_old_keys_warn_naming_the_new_ones(classifier, engine, new_keys, caplog):
    caplog.set_level(logging.WARNING, logger="consumer.config")
    Settings(classifier=classifier, engine=engine)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == new_keys


@pytest.mark.parametrize(
    ("classifier", "engine", "problem"),
    [
        ({"kind": "reasoner", "reasoner": "none"}, {}, "kind reasoner needs in_process or remote"),
        ({"kind": "keyword", "reasoner": "remote"}, {}, "kind keyword has no reasoner"),
        ({"kind": "vllm"}, {"kind": "elsewhere"}, "engine.kind: must be in_process or remote"),
    ],
)
def test_a_pair_that_cannot_run_is_refused(classifier, engine, problem):
    with pytest.raises(ValueError, match=problem):
        resolve_reasoner_place(ClassifierSettings(**classifier), dict(engine))


def _served_block_of_the_engine_docs(tmp_path):
    text = (REPO / "docs/engine.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "reasoner: remote" in b]
    path = tmp_path / "engine-docs.yaml"
    path.write_text(block)
    return path


@pytest.mark.parametrize("name", ["docs/engine.md", *[str(p.relative_to(REPO)) for p in SERVED_CONFIGS]])
def test_check_config_accepts_every_documented_served_configuration(name, tmp_path):
    path = _served_block_of_the_engine_docs(tmp_path) if name == "docs/engine.md" else REPO / name
    env = {"SAFEGUARD_POLICIES__DIRECTORY": str(REPO / "policies"), "PROVIDER_API_KEY": "k"}
    result = run_cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stderr


def test_an_unset_key_variable_is_one_config_error_naming_it(tmp_path):
    path = _served_block_of_the_engine_docs(tmp_path)
    env = {"SAFEGUARD_POLICIES__DIRECTORY": str(REPO / "policies")}
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path), env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert "engine.endpoints[2].api_key_env: the environment variable PROVIDER_API_KEY" in result.stderr


def test_the_served_deployment_sets_no_variable_that_reads_as_a_config_key():
    text = (REPO / "deploy/k8s/served/consumer.yaml").read_text()
    names = re.findall(r"- name: (\S+)", text)
    assert "FLEET_API_KEY" in names
    assert not [n for n in names if n.startswith("SAFEGUARD_")]


def test_load_settings_names_a_bad_old_engine_kind(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classifier:\n  kind: vllm\nengine:\n  kind: elsewhere\n")
    with pytest.raises(ConfigError, match="engine.kind"):
        load_settings(path)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"kind": "vllm"}, {"kind": "reasoner"}),
        ({"kind": "cascade", "reasoner": "vllm"}, {"kind": "cascade", "reasoner": "in_process"}),
    ],
)
def test_the_start_up_line_says_where_the_reasoner_runs_the_same_for_old_and_new_keys(old, new):
    from consumer.pipeline.preflight import Prepared, describe
    from consumer.policy import PolicyStore

    policies = PolicyStore(REPO / "policies")
    lines = [describe(Settings(classifier=c, engine={"model": "m"}), Prepared(policies, None)) for c in (old, new)]
    assert lines[0] == lines[1]
    assert "engine in_process m" in lines[0]
