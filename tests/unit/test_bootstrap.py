"""scripts/bootstrap never silently re-points a shared environment to a second checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import venv

from tests.conftest import REPO


def test_bootstrap_refuses_to_take_over_an_environment_of_another_checkout(tmp_path):
    other = tmp_path / "other-checkout"
    other.mkdir()
    (other / "pyproject.toml").write_text("")
    (other / "consumer").mkdir()
    (other / "consumer" / "__init__.py").write_text("")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    (env_dir / ".complete").touch()
    site = next(env_dir.glob("lib/python3*/site-packages"))
    (site / "other.pth").write_text(str(other) + "\n")  # as an editable install of that checkout
    # CI's own run sets SAFEGUARD_BOOTSTRAP_REPOINT for the suite: this bootstrap must not inherit it.
    environment = {k: v for k, v in os.environ.items() if k != "SAFEGUARD_BOOTSTRAP_REPOINT"}
    environment.update(SAFEGUARD_CACHE_DIR=str(tmp_path / "cache"), SAFEGUARD_VENV=str(env_dir), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap"), "core"], capture_output=True, text=True, timeout=120,
        env=environment,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"runs the checkout {other}" in result.stderr
    assert "SAFEGUARD_BOOTSTRAP_REPOINT=1" in result.stderr
    assert (site / "other.pth").read_text().strip() == str(other)  # untouched
