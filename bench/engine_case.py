"""Case 6: the real vLLM engine on CPU (the tiny random-weight GptOss model), ours vs the engine alone.

`python -m bench.engine_case SPEC_JSON`. One process, one engine, one event loop (AsyncLLM
belongs to the loop it starts on):

1. warm-up: a few requests, so both measurements find the policy prefix cached;
2. engine alone: the same events' prompts rendered by our PromptRenderer and submitted
   straight to AsyncLLM.generate with the sampling parameters ours uses, no Kafka: once all
   at once, once at most max_num_seqs at a time; the faster is the engine's limit;
3. ours: the Pipeline reading the same events from Kafka through the VllmClassifier.

The random weights never write a parseable answer, so `max_unparseable_retries` is 0 (one
engine request per event, as in 2) and every event ends as an `unparseable_output` dead
letter carrying the raw completion: the full output path, measured.
The engine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 and its code under `__main__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import Any

from bench.cases import batcher_figures, build_pipeline, run_until_done
from bench.workload import REPO, Spec, chat_events, report
from consumer.classify.engine import EngineSettings, make_vllm_classifier
from consumer.events import ContentEvent
from consumer.policy import load_policy
from tests.engine.conftest import TINY_MODEL_VERSION, _cache_root, build_tiny_gpt_oss, tiny_engine_settings
from tests.engine.shared import SharedEngine

WARM_UP = 8


def engine_settings() -> EngineSettings:
    """tests/engine/conftest.py's settings, but one engine request per event."""
    model = build_tiny_gpt_oss(_cache_root() / "models" / TINY_MODEL_VERSION)
    return tiny_engine_settings(model, request_timeout_s=600, max_unparseable_retries=0, max_engine_retries=0)


async def engine_alone(classifier: Any, prompts: list[list[int]], concurrency: int | None = None) -> float:
    """Seconds the engine takes for `prompts`, outputs streamed as ours are.

    `concurrency` None submits everything at once (vLLM queues what it cannot run);
    otherwise at most that many requests are submitted at a time.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from consumer.classify.engine.vocab import harmony_encoding

    sampling = SamplingParams(
        max_tokens=classifier.settings.max_tokens,
        temperature=classifier.settings.temperature,
        stop_token_ids=harmony_encoding().stop_tokens_for_assistant_actions(),
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
        skip_special_tokens=False,
    )
    engine = classifier._engine  # the same AsyncLLM the classifier drives: the engine alone, no wrapper

    slots = asyncio.Semaphore(concurrency or len(prompts))

    async def one(i: int, prompt: list[int]) -> int:
        tokens = 0
        async with slots:
            stream = engine.generate(TokensPrompt(prompt_token_ids=prompt), sampling, f"alone-{i}-{time.monotonic_ns()}")
            async with contextlib.aclosing(stream):
                async for output in stream:
                    tokens += len(output.outputs[0].token_ids)
        return tokens

    began = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - began


async def run(spec: Spec) -> dict[str, Any]:
    classifier = make_vllm_classifier(engine_settings())
    await classifier.start()
    try:
        policy = load_policy(REPO / "policies" / "chat-harassment.md")
        events = [ContentEvent.model_validate_json(value) for _, value in chat_events(spec.events, seed=5)]
        prompts = [classifier.renderer.render(policy, event) for event in events]
        await engine_alone(classifier, prompts[:WARM_UP])
        all_at_once_s = await engine_alone(classifier, prompts)
        bounded_s = await engine_alone(classifier, prompts, classifier.capacity().max_sequences)
        meter, pipeline = build_pipeline(spec, SharedEngine(classifier))
        await run_until_done(spec, meter, pipeline)
    finally:
        await classifier.close()
    result = meter.result(spec.events, **batcher_figures(pipeline))
    # The engine's limit is the better of the two ways of feeding it.
    result.update(
        engine_alone_per_s=round(spec.events / min(all_at_once_s, bounded_s), 2),
        engine_alone_all_at_once_per_s=round(spec.events / all_at_once_s, 2),
        engine_alone_bounded_per_s=round(spec.events / bounded_s, 2),
        ours_per_s=result["events_per_s"],
        max_num_seqs=classifier.capacity().max_sequences,
        kv_cache_tokens=classifier.capacity().max_tokens,
        dead_letters=pipeline.sink.dead_letters_delivered,
    )
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    report(asyncio.run(run(Spec.from_json(sys.argv[1]))))
