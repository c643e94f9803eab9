"""The bench's judgement of issue 31's targets (`pipeline_bench.issue_targets`): ratios paired round by round."""

from bench.pipeline_bench import issue_targets


def run(cpu: float, rate: float) -> dict[str, float]:
    return {"cpu_us_per_event": cpu, "events_per_s": rate}


def test_ratios_pair_the_cases_of_one_round_and_the_median_is_judged():
    rounds = {
        # Round 2 is slow for every case: paired, its ratio is like the others'.
        "peer": [run(25.0, 40_000), run(24.0, 41_000), run(50.0, 20_000)],
        "keyword": [run(30.0, 30_000), run(24.0, 32_000), run(55.0, 16_000)],
        "cascade-lexical": [run(40.0, 27_000), run(40.0, 24_000), run(70.0, 12_000)],
    }
    targets = issue_targets(rounds)
    cpu = targets["keyword CPU / Quix Streams CPU"]
    assert cpu["rounds"] == [1.2, 1.0, 1.1]
    assert cpu["median"] == 1.1 and cpu["met"] is False and cpu["target"] == "<= 1.0"
    lexical = targets["cascade-lexical / keyword events/s"]
    assert lexical["rounds"] == [0.9, 0.75, 0.75]
    assert lexical["median"] == 0.75 and lexical["met"] is False
    assert "cascade-embedding / keyword events/s" not in targets  # not run: nothing to judge
    assert targets["peer_cpu_spread"] == round((50.0 - 24.0) / 25.0, 3)


def test_a_failed_round_drops_its_pair_only_and_a_met_line_counts():
    rounds = {
        "peer": [run(30.0, 30_000), {"error": "timed out"}, run(30.0, 30_000)],
        "keyword": [run(27.0, 35_000), run(20.0, 40_000), run(30.0, 30_000)],
    }
    cpu = issue_targets(rounds)["keyword CPU / Quix Streams CPU"]
    assert cpu["rounds"] == [0.9, 1.0]
    assert cpu["median"] == 0.95 and cpu["met"] is True
