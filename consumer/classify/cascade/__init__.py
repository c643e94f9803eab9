"""The cascade in front of the reasoner: verdict cache, cheap learned stages, escalation.

Importing this package imports neither scikit-learn nor sentence-transformers: the config
loader validates `CascadeSettings` on machines without them. `make_cascade` imports the
stages only when a cascade is actually built. docs/cascade.md says what the cheap stages
can and cannot do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consumer.classify.exceptions import CascadeUnavailable
from consumer.config.cascade import CascadeSettings, PolicyOverrides

if TYPE_CHECKING:
    from consumer.classify import Classifier
    from consumer.classify.cascade.cascade import CascadeClassifier
    from consumer.policy import PolicyStore

__all__ = ["CascadeSettings", "CascadeUnavailable", "PolicyOverrides", "make_cascade"]


def make_cascade(settings: CascadeSettings, reasoner: Classifier | None, policies: PolicyStore) -> CascadeClassifier:
    """A `CascadeClassifier` for `settings` in front of `reasoner` (None: the cheap stages answer).

    Not yet started: `await cascade.start()` starts the reasoner, loads the embedding model
    and trains the heads of the platform's policies (a community's are trained on first use). The cascade owns the reasoner from then on and
    closes it in `close()`.
    """
    # The current policies plus the cascade-wide plan, which policies added later get.
    plans = [settings.plan_for(pid) for pid in policies.get()] + [settings.plan_for("")]
    try:
        from consumer.classify.cascade.cascade import CascadeClassifier
        from consumer.classify.cascade.embedding import EmbeddingFeatures
        from consumer.classify.cascade.lexical import LexicalFeatures
    except ImportError as exc:
        raise CascadeUnavailable(
            f"classifier kind 'cascade' needs scikit-learn ({exc}): install requirements/cascade.txt"
        ) from exc
    lexical = LexicalFeatures() if any(p.lexical for p in plans) else None
    embedding = None
    if any(p.embedding for p in plans):
        try:
            import sentence_transformers  # noqa: F401 - fail at build time, not on the first event
        except ImportError as exc:
            raise CascadeUnavailable(
                "cascade.embedding needs sentence-transformers: install requirements/cascade-embedding.txt"
            ) from exc
        if settings.embedding_runtime == "static":
            from consumer.classify.cascade.static import StaticEmbeddingFeatures

            cache_dir = settings.state_dir / "embedding" if settings.state_dir is not None else None
            embedding = StaticEmbeddingFeatures(settings.embedding_model, cache_dir)
        else:
            embedding = EmbeddingFeatures(
                settings.embedding_model, settings.embedding_device, settings.embedding_batch_size,
                settings.embedding_precision,
            )  # fmt: skip
    return CascadeClassifier(settings, reasoner, policies, lexical=lexical, embedding=embedding)
