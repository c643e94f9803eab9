"""The drift watch's Prometheus rules (deploy/prometheus/drift-rules.yaml): valid for promtool,
firing on a violation-rate jump, an undecided climb and new dead letters in promtool's own rule
unit tests (drift-rules.test.yaml), silent on a steady version, and loaded by the compose
Prometheus. That the series they read are the ones the consumer exports is checked against a
real scrape in tests/integration/test_drift_watch.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "drift-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "drift-rules.test.yaml"
ALERTS = {"SafeguardViolationRateJump", "SafeguardUndecidedShareClimb", "SafeguardDeadLetters"}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: scripts/bootstrap installs Debian's prometheus package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_drift_rules_pass_promtool_check_rules() -> None:
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout


def test_the_drift_alerts_fire_on_a_jump_and_stay_silent_on_a_steady_version() -> None:
    run = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout
    # Every alert is tested firing, and silent on the steady day.
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == ALERTS
    assert {case["alertname"] for case in cases if not case["exp_alerts"]} == ALERTS


def test_a_broken_threshold_fails_the_rule_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: a jump threshold raised tenfold no longer fires on the jump."""
    broken = RULES.read_text(encoding="utf-8").replace(
        "clamp_min(safeguard:policy_violation_ratio:rate1d_offset10m, 0.05)",
        "clamp_min(safeguard:policy_violation_ratio:rate1d_offset10m, 0.5)",
    )
    assert broken != RULES.read_text(encoding="utf-8")
    (tmp_path / RULES.name).write_text(broken, encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    run = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert run.returncode != 0 and "SafeguardViolationRateJump" in run.stdout + run.stderr


def test_the_compose_prometheus_loads_the_drift_rules() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    mounts = {}
    for volume in compose["services"]["prometheus"]["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = ROOT / source
    (rule_file,) = config["rule_files"]
    resolved = [source / rule_file.removeprefix(target + "/") for target, source in mounts.items()
                if rule_file.startswith(target + "/")]  # fmt: skip
    assert resolved == [RULES]
