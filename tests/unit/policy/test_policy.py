"""Policy files: validation with line numbers, versions from content, reloads that never break."""

import re
from pathlib import Path

import pytest

from consumer.policy import PolicyError, PolicyStore, most_severe, parse_policy, validate_policy
from tests.conftest import REPO

GOOD = (REPO / "policies" / "chat-harassment.md").read_text()


def problems(text: str, tmp_path: Path, **kwargs) -> list[str]:
    path = tmp_path / "p.md"
    path.write_text(text)
    return [str(p).removeprefix(f"{path}:") for p in validate_policy(text.encode(), path, **kwargs)]


def test_sample_policies_validate_without_problems():
    for path in sorted((REPO / "policies").glob("*.md")):
        assert validate_policy(path.read_bytes(), path) == [], path


def test_front_matter_errors_name_their_line(tmp_path):
    text = GOOD.replace("reasoning_effort: low", "reasoning_effort: extreme")
    assert problems(text, tmp_path) == ["4: error: `reasoning_effort` must be one of low, medium, high, not 'extreme'"]
    text = GOOD.replace("  harassment: delete", "  harassment: ban")
    assert problems(text, tmp_path) == ["10: error: action 'ban' for 'harassment' is not one of allow, hold, flag, delete, timeout, escalate"]
    assert problems("no front matter\n", tmp_path) == ["1: error: missing YAML front matter (a first line of ---)"]


def test_missing_sections_and_bad_example_labels_are_errors(tmp_path):
    text = GOOD.replace("## DEFINITIONS", "## TERMS")
    assert "error: missing section `## DEFINITIONS`" in " ".join(problems(text, tmp_path))
    lines = GOOD.splitlines()
    bad_line = next(i for i, line in enumerate(lines, 1) if line.startswith('- "gg everyone'))
    text = GOOD.replace('-> {"violation": 0, "policy_category": "safe"}', '-> maybe', 1)
    assert problems(text, tmp_path) == [f"{bad_line}: error: example label 'maybe' is neither 0, 1 nor a JSON object"]
    text = GOOD.replace('"policy_category": "safe"}', '"policy_category": "spam"}', 1)
    assert problems(text, tmp_path) == [f"{bad_line}: error: example label category 'spam' is not one of the policy's categories"]


def test_token_length_warns_outside_the_sweet_spot_and_fails_above_the_maximum(tmp_path):
    short = GOOD.split("## DEFINITIONS")[0] + "## DEFINITIONS\n## VIOLATES\n## SAFE\n## EXAMPLES\n- a -> 1\n- b -> 0\n- c -> 0\n- d -> 1\n"
    found = problems(short, tmp_path)
    assert any("warning:" in p and "tokens; 400-600 works best" in p for p in found)
    assert any(p.endswith("error: 571 tokens; the maximum is 300") for p in problems(GOOD, tmp_path, max_tokens=300))


def test_version_is_the_hash_of_the_file_and_changes_with_it():
    first = parse_policy(GOOD.encode())
    assert first.version == parse_policy(GOOD.encode()).version
    assert parse_policy((GOOD + "\n").encode()).version != first.version


def test_actions_come_from_the_category_and_the_most_severe_wins():
    policy = parse_policy(GOOD.encode())
    assert policy.action_for(True, "harassment") == "delete"
    assert policy.action_for(False, None) == "allow"
    assert most_severe(["allow", "flag", "escalate", "delete"]) == "escalate"


def test_store_keeps_the_last_good_version_of_a_broken_edit(tmp_path):
    policy_file = tmp_path / "chat.md"
    policy_file.write_text(GOOD)
    reloads = []
    store = PolicyStore(tmp_path, on_reload=lambda policies, errors: reloads.append((dict(policies), errors)))
    v1 = store.get()["chat-harassment"].version

    policy_file.write_text(GOOD.replace("## SAFE (0)", "## SAFE (0)\n- S5: Quoting song lyrics."))
    assert store.reload() is True
    v2 = store.get()["chat-harassment"].version
    assert v2 != v1 and reloads[-1][1] == []

    policy_file.write_text(GOOD.replace("reasoning_effort: low", "reasoning_effort: [oops"))
    assert store.reload() is False  # nothing in force changed
    assert store.get()["chat-harassment"].version == v2

    (tmp_path / "spam.md").write_text((REPO / "policies" / "spam-scams.md").read_text())
    assert store.reload() is True
    assert set(store.get()) == {"chat-harassment", "spam-scams"}
    assert store.get()["chat-harassment"].version == v2
    assert any("chat.md" in e for e in reloads[-1][1])  # the broken file is still reported


def test_store_refuses_to_start_on_a_broken_policy(tmp_path):
    (tmp_path / "bad.md").write_text("---\nid: x\n---\nno sections\n")
    with pytest.raises(PolicyError, match="missing section"):
        PolicyStore(tmp_path)


def test_validate_command_prints_file_line_problems_and_exits_1_on_errors(tmp_path):
    from tests.unit.test_config import run_cli

    broken = tmp_path / "broken.md"
    broken.write_text(GOOD.replace("## SAFE (0)", "## NOT SAFE"))
    result = run_cli("policy", "validate", str(REPO / "policies"), str(broken))
    assert result.returncode == 1
    assert f"{broken}:20: error: missing section `## SAFE`" in result.stdout
    assert "5 policies checked, 1 errors" in result.stderr
    assert run_cli("policy", "validate", str(REPO / "policies")).returncode == 0


def test_validate_reports_every_front_matter_error_at_once(tmp_path):
    from consumer.policy import validate_policy

    text = ("---\nid: ''\nreasoning_effort: extreme\ncategories: [a]\nactions: {violation: nuke}\n"
            "patterns: notalist\noutput: verbose\n---\n## INSTRUCTIONS\nx\n")
    problems = validate_policy(text.encode(), tmp_path / "p.md")
    messages = " | ".join(p.message for p in problems)
    assert len(problems) == 6, messages
    for key in ("`id`", "`reasoning_effort`", "`categories`", "`patterns`", "`output`", "'nuke'"):
        assert key in messages
    assert [p.line for p in problems] == sorted(p.line for p in problems) and problems[0].line == 2


def test_title_and_sensitive_come_from_the_front_matter(tmp_path):
    policy = parse_policy(GOOD.encode())
    assert policy.title == "Harassment and hate in community chat" and policy.sensitive is True
    plain = parse_policy(GOOD.replace("sensitive: true\n", "").encode())
    assert plain.sensitive is False
    assert problems(GOOD.replace("sensitive: true", "sensitive: maybe"), tmp_path) == [
        "18: error: `sensitive` must be true or false"
    ]


def test_a_misspelled_front_matter_key_is_an_error_with_the_key_it_resembles(tmp_path):
    text = GOOD.replace("reasoning_effort: low", "reasoning_efort: low").replace("output: rich", "outptu: rich")
    assert problems(text, tmp_path) == [
        "4: error: unknown front-matter key 'reasoning_efort'; did you mean 'reasoning_effort'?",
        "5: error: unknown front-matter key 'outptu'; did you mean 'output'?",
    ]
    with pytest.raises(PolicyError, match=r":4: unknown front-matter key 'reasoning_efort'; did you mean"):
        parse_policy(text.encode())  # what `run` and `check-config` load through
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "typo.md").write_text(GOOD.replace("id: chat-harassment", "id: chat-harassment\npattern: [kys]"))
    with pytest.raises(PolicyError, match="unknown front-matter key 'pattern'; did you mean 'patterns'"):
        PolicyStore(folder)


def test_a_front_matter_yaml_error_names_the_line_it_is_on(tmp_path):
    text = GOOD.replace("reasoning_effort: low", "reasoning_effort: [low")  # line 4: the unclosed bracket
    assert problems(text, tmp_path)[0].startswith("4: error: front matter is not valid YAML")
    text = GOOD.replace("reasoning_effort: low", "reasoning_effort: low: high")
    assert problems(text, tmp_path)[0].startswith("4: error: front matter is not valid YAML (mapping values")


def test_validate_refuses_a_folder_with_two_files_of_one_id(tmp_path):
    from tests.unit.test_config import run_cli

    (tmp_path / "chat-harassment.md").write_text(GOOD)
    (tmp_path / "chat-harassment.v2.md").write_text(GOOD.replace("## SAFE (0)", "## SAFE (0)\n"))
    result = run_cli("policy", "validate", str(tmp_path))
    assert result.returncode == 1
    assert (f"{tmp_path / 'chat-harassment.v2.md'}:2: error: policy id 'chat-harassment' is also used by "
            f"{tmp_path / 'chat-harassment.md'}") in result.stdout  # fmt: skip
    assert "2 policies checked, 1 errors" in result.stderr


def test_a_store_of_one_file_reads_that_file_and_nothing_beside_it(tmp_path):
    (tmp_path / "chat-harassment.md").write_text(GOOD)
    (tmp_path / "policy-eval.md").write_text("# a report, not a policy\n")
    store = PolicyStore(tmp_path, pattern="chat-harassment.md")
    assert list(store.get()) == ["chat-harassment"]


def test_policy_eval_evaluates_the_file_it_is_given_and_nothing_beside_it(tmp_path):
    from tests.unit.test_config import run_cli

    policy = tmp_path / "chat-harassment.md"
    policy.write_text(GOOD)
    (tmp_path / "notes.md").write_text("scratch notes, no front matter\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "a", "content": "kys", "label": 1}\n{"id": "b", "content": "nice build", "label": 0}\n')
    env = {"SAFEGUARD_CLASSIFIER__KIND": "keyword"}
    for run in (1, 2):  # the second run meets the first one's report in the folder
        result = run_cli("policy", "eval", str(policy), "--data", str(data),
                         "--report", str(tmp_path / "policy-eval.md"), env=env)  # fmt: skip
        assert result.returncode == 0, (run, result.stdout + result.stderr)
        assert "on 2 examples" in result.stdout


# -- per-community overrides ---------------------------------------------------------------------

COMMUNITY = GOOD.replace("id: chat-harassment\n", "id: chat-harassment\ncommunity: gamers\n", 1)


def test_a_community_policy_carries_its_overrides():
    text = COMMUNITY.replace("output: rich\n", "output: rich\ntarget_precision: 0.8\nbaseline_actions:\n"
                             "  chat-harassment:\n    harassment: allow\n    violation: flag\n"
                             "offender_thresholds:\n  - {violations: 5, action: timeout}\n"
                             "  - {violations: 2, action: flag}\n", 1)  # fmt: skip
    policy = parse_policy(text.encode())
    assert policy.key == "gamers/chat-harassment" and policy.target_precision == 0.8
    assert policy.baseline_actions == {"chat-harassment": {"harassment": "allow", "violation": "flag"}}
    assert policy.offender_thresholds == ((2, "flag"), (5, "timeout"))  # by rising count
    plain = parse_policy(GOOD.encode())
    assert (plain.target_precision, plain.baseline_actions, plain.offender_thresholds) == (None, {}, None)


@pytest.mark.parametrize(("extra", "problem"), [
    ("target_precision: 1.0\n", "7: error: `target_precision` must be a number between 0 and 1 (exclusive)"),
    ("target_precision: high\n", "7: error: `target_precision` must be a number between 0 and 1 (exclusive)"),
    ("baseline_actions: [allow]\n", "7: error: `baseline_actions` must be a mapping of platform policy id -> "
                                    "{category, violation, safe or review: action}"),
    ("baseline_actions:\n  spam-scams:\n    spam: ban\n",
     "8: error: `baseline_actions` of 'spam-scams': action 'ban' for 'spam' is not one of allow, hold, flag, delete, "
     "timeout, escalate"),
    ("offender_thresholds:\n  - {violations: 0, action: timeout}\n",
     "7: error: `offender_thresholds`: violations must be a whole number >= 1, not 0"),
    ("offender_thresholds:\n  - {violations: 2, action: ban}\n",
     "7: error: `offender_thresholds`: action 'ban' is not one of allow, hold, flag, delete, timeout, escalate"),
    ("offender_thresholds:\n  - {count: 2, action: flag}\n",
     "7: error: each of `offender_thresholds` must be {violations: N, action: ACTION}, those two keys"),
])  # fmt: skip
def test_bad_overrides_are_errors_on_their_line(tmp_path, extra, problem):
    text = COMMUNITY.replace("output: rich\n", "output: rich\n" + extra, 1)
    assert problems(text, tmp_path) == [problem]
    with pytest.raises(PolicyError, match=re.escape(problem.replace(": error", ""))):  # the parser says it too
        parse_policy(text.encode(), tmp_path / "p.md")


@pytest.mark.parametrize("key", ["baseline_actions:\n  spam-scams: {spam: allow}\n",
                                 "offender_thresholds:\n  - {violations: 2, action: timeout}\n"])
def test_only_a_community_policy_may_override_the_platform(tmp_path, key):
    text = GOOD.replace("output: rich\n", "output: rich\n" + key, 1)
    name = key.split(":", 1)[0]
    assert problems(text, tmp_path) == [f"6: error: `{name}` overrides the platform's settings for one community: "
                                        "only a community policy (`community:`) may carry it"]  # fmt: skip


def test_libyaml_reads_the_front_matter_where_pyyaml_has_it():
    import yaml

    from consumer.policy import parse

    assert parse._YAML_LOADER is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    assert parse.load_yaml("a: [1, 2]\n") == {"a": [1, 2]}
    with pytest.raises(yaml.YAMLError):  # still the safe subset: no Python objects
        parse.load_yaml("b: !!python/name:os.system\n")
