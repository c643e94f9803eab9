"""The bench's per-stage split (`pipeline_bench --stages`): py-spy samples attributed to stages."""

from bench.stage_split import split, stages_us

RAW = "\n".join([
    # the innermost frame that names a stage wins: the budget's orjson call under the verdict
    "thread (1): MainThread;<module> (bench/cases.py:9);Handle._run (asyncio/events.py:80);"
    "Pipeline._conclude (consumer/pipeline/pipeline.py:609);OutputStep.verdict (consumer/pipeline/output_step.py:85);"
    "OutputBudget.verdict (consumer/kafka/budget.py:187) 6",
    "thread (1): MainThread;<module> (bench/cases.py:9);Handle._run (asyncio/events.py:80);"
    "Pipeline._conclude (consumer/pipeline/pipeline.py:609);OutputStep.verdict (consumer/pipeline/output_step.py:70) 3",
    # no frame names a stage: the loop's own
    "thread (1): MainThread;<module> (bench/cases.py:9);Handle._run (asyncio/events.py:80) 1",
    # set-up, whatever it calls, is outside the window
    "thread (1): MainThread;<module> (bench/cases.py:9);build_pipeline (bench/cases.py:215);"
    "JsonDecoder.decode (consumer/decode/plain_json.py:39) 50",
    # another thread's samples are not the event loop's
    "thread (2): source-poll;PollingSource._run (consumer/kafka/poll.py:91) 40",
    "not a sample line",
])


def test_samples_go_to_the_innermost_stage_and_set_up_is_not_counted():
    samples = split(RAW)
    assert samples["fit + encode output"] == 6
    assert samples["build verdict"] == 3
    assert samples["loop"] == 1
    assert "decode" not in samples
    assert stages_us(samples, cpu_us_main=20.0) == {"fit + encode output": 12.0, "build verdict": 6.0, "loop": 2.0}
