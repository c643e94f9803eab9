"""One real vLLM engine on CPU for all engine tests, serving a tiny random-weight GptOss model.

The model is built here with transformers (hidden 64, 2 layers, head_dim 64, the full
201088-token harmony vocabulary, bf16, no tokenizer files) and cached, so no weights are
downloaded. Its output is random tokens: the tests check the engine plumbing (completion,
deadlines, prefix caching, dead letters), not verdict quality.

vLLM's AsyncLLM belongs to the event loop it starts on, so the session owns one loop and the
tests run their coroutines on it through the `run` fixture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from consumer.classify.engine import EngineSettings

T = TypeVar("T")

TINY_MODEL_VERSION = "tiny-gpt-oss-v1"
HARMONY_VOCAB_SIZE = 201088


def _cache_root() -> Path:
    base = os.environ.get("SAFEGUARD_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "safeguard-consumer"


def build_tiny_gpt_oss(target: Path) -> Path:
    """Save a random-weight GptOss checkpoint at `target` (once; later calls reuse it)."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        head_dim=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=HARMONY_VOCAB_SIZE,
        max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=199998,
        eos_token_id=200002,
        pad_token_id=199999,
    )
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging)
    # Rename into place so a half-written checkpoint is never picked up.
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_tiny_gpt_oss(_cache_root() / "models" / TINY_MODEL_VERSION)


def tiny_engine_settings(model: Path, **overrides: object) -> EngineSettings:
    """The CPU settings that run the tiny model (DESIGN.md); the benchmark reuses them."""
    settings: dict[str, object] = {
        "model": str(model),
        "served_model_name": "tiny-gpt-oss",
        "dtype": "bfloat16",
        "max_model_len": 2048,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 2048,
        "kv_cache_memory_bytes": 256 << 20,
        "enforce_eager": True,
        "async_scheduling": False,
        "skip_tokenizer_init": True,
        "max_tokens": 16,
        "temperature": 1.0,
        "request_timeout_s": 60,
        "max_unparseable_retries": 1,
        "max_engine_retries": 1,
        "retry_backoff_s": 0.1,
    }
    return EngineSettings(**(settings | overrides))


@pytest.fixture(scope="session")
def engine_settings(tiny_model: Path) -> EngineSettings:
    return tiny_engine_settings(tiny_model)


@pytest.fixture(scope="session")
def engine_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def run(engine_loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on the loop that owns the shared engine."""
    return engine_loop.run_until_complete


@pytest.fixture(scope="session")
def classifier(engine_settings: EngineSettings, run: Callable[..., Any]) -> Iterator[Any]:
    """The shared, started VllmClassifier."""
    # Part of the CPU configuration recorded as working (DESIGN.md); vLLM 0.32's AsyncLLM
    # still runs its engine core in a spawned child process, whatever the variable says.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from consumer.classify.engine import make_vllm_classifier

    classifier = make_vllm_classifier(engine_settings)
    run(classifier.start())
    yield classifier
    run(classifier.close())
