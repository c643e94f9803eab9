"""The backtest report counts flips each way, by category and action, on crafted verdict sets."""

from rich.console import Console

from consumer.replay.backtest import Outputs, compare, markdown, tables

TOPIC = "chat"


def verdict(offset: int, *results: tuple, topic: str = TOPIC) -> dict:
    """results: (policy_id, version, violation, category, action, rationale)."""
    return {
        "kind": "verdict",
        "event_id": f"e{offset}",
        "source": {"topic": topic, "partition": 0, "offset": offset, "timestamp_ms": 1_000 + offset},
        "violation": any(r[2] for r in results),
        "results": [
            {"policy_id": p, "policy_version": v, "violation": bool(x), "category": c, "action": a, "rationale": why}
            for p, v, x, c, a, why in results
        ],
    }


def dead_letter(offset: int) -> dict:
    return {"kind": "dead_letter", "source": {"topic": TOPIC, "partition": 0, "offset": offset},
            "error": {"type": "classifier_error", "message": "timed out"}}  # fmt: skip


def old(violation: int, category: str | None = None, action: str = "allow", why: str = "old says so") -> tuple:
    return ("chat-harassment", "v1", violation, category, action, why)


def new(violation: int, category: str | None = None, action: str = "allow", why: str = "new says so") -> tuple:
    return ("chat-harassment", "v2", violation, category, action, why)


BASELINE = [
    verdict(0, old(1, "harassment", "delete")),
    verdict(1, old(0)),
    verdict(2, old(0)),
    verdict(3, old(1, "harassment", "delete", why="insult at a member")),
    verdict(4, old(0)),
    dead_letter(5),
    verdict(6, old(0)),  # only in the baseline
    # A second policy the replay did not run is not compared; its flip never counts.
    verdict(8, old(0), ("spam-scams", "s1", 1, "spam", "delete", "a link")),
    verdict(9, old(1, "harassment", "delete")),
    verdict(9, old(0)),  # a later output for the same record: the last word stands
    verdict(10, old(1, "harassment", "delete")),
    verdict(11, old(0), topic="elsewhere"),  # outside the window
]
CANDIDATE = [
    verdict(0, new(1, "harassment", "delete")),
    verdict(1, new(1, "harassment", "delete", why="threat in new rule H2")),
    verdict(2, new(1, "hate", "delete")),
    verdict(3, new(0, why="banter between friends")),
    verdict(4, new(0)),
    verdict(5, new(0)),
    verdict(7, new(1, "harassment", "delete")),  # only in the candidate
    verdict(8, new(0)),
    verdict(9, new(1, "harassment", "delete")),
    verdict(10, new(1, "hate", "escalate")),  # same violation, other category and action: not a flip
    verdict(11, new(1, "hate", "delete"), topic="elsewhere"),
]


def backtest():
    in_window = lambda key: key[0] == TOPIC  # noqa: E731
    return compare(Outputs.collect(BASELINE, in_window), Outputs.collect(CANDIDATE, in_window))


def test_flips_are_counted_each_way_by_category_and_action():
    result = backtest()
    assert dict(result.compared) == {"chat-harassment": 8}  # offsets 0-4, 8, 9, 10
    assert dict(result.flip_counts()) == {
        ("flagged", "chat-harassment", "harassment", "allow", "delete"): 2,  # offsets 1 and 9
        ("flagged", "chat-harassment", "hate", "allow", "delete"): 1,  # offset 2
        ("cleared", "chat-harassment", "harassment", "delete", "allow"): 1,  # offset 3
    }
    assert (result.flipped("chat-harassment", "flagged"), result.flipped("chat-harassment", "cleared")) == (3, 1)
    assert dict(result.action_changes) == {
        ("chat-harassment", "allow", "delete"): 3,
        ("chat-harassment", "delete", "allow"): 1,
        ("chat-harassment", "delete", "escalate"): 1,
    }
    assert (result.only_baseline, result.only_candidate) == (1, 1)
    assert (result.failed_baseline, result.failed_candidate) == (1, 0)
    assert result.versions == {"chat-harassment": ({"v1"}, {"v2"})}


def test_the_markdown_report_has_the_counts_and_both_rationales_of_each_example():
    report = markdown(backtest(), "verdicts", "replay r1", examples=1)
    assert "8 (record, policy) decisions compared; 4 flipped: 3 newly flagged (0→1), 1 cleared (1→0)." in report
    assert "| chat-harassment | v1 | v2 | 8 | 4 | 3 | 1 |" in report
    assert "| flagged | chat-harassment | harassment | allow | delete | 2 |" in report
    assert "| cleared | chat-harassment | harassment | delete | allow | 1 |" in report
    assert "| chat-harassment | delete | escalate | 1 |" in report
    assert "- only in the baseline: 1" in report and "- a dead letter in the baseline: 1" in report
    # One example per (direction, policy, category), in record order, with both rationales.
    assert "### flagged: chat-harassment, harassment" in report
    assert "- `e1` (chat[0]@1): allow → delete" in report and "`e9`" not in report
    assert "  - before (`v1`): old says so\n  - after (`v2`): threat in new rule H2" in report
    assert "  - before (`v1`): insult at a member\n  - after (`v2`): banter between friends" in report


def test_the_tables_print_the_same_counts():
    console = Console(record=True, width=200)
    for table in tables(backtest()):
        console.print(table)
    text = console.export_text()
    assert "Flips by category and action (4 in all)" in text
    assert "│ flagged   │ chat-harassment │ harassment │ allow         │ delete       │     2 │" in text
