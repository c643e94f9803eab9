"""`policy render` is a policy author's tool: it runs wherever openai_harmony is (the core
environment installs openai-harmony, requirements/harmony.txt; the full one has vLLM's)."""

from tests.conftest import REPO
from tests.unit.test_config import run_cli


def test_policy_render_prints_the_prompt_and_its_token_count():
    result = run_cli("policy", "render", str(REPO / "policies" / "chat-harassment.md"), "--content", "hello there")
    assert result.returncode == 0, result.stderr
    assert "<|start|>user<|message|>hello there<|end|>" in result.stdout
    assert "tokens, of which" in result.stderr


def test_harmony_is_pinned_for_the_core_profile_only():
    bootstrap = (REPO / "scripts" / "bootstrap").read_text()
    core = next(line for line in bootstrap.splitlines() if line.strip().startswith("core)"))
    full = next(line for line in bootstrap.splitlines() if line.strip().startswith("full)"))
    assert "harmony.txt" in core and "harmony.txt" not in full
    assert "openai-harmony==" in (REPO / "requirements" / "harmony.txt").read_text()
    assert "openai-harmony" not in (REPO / "requirements" / "engine-cpu.txt").read_text().replace(
        "openai-harmony must NOT", ""
    )
