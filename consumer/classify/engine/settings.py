"""Settings of the in-process vLLM engine that serves gpt-oss-safeguard.

Plain pydantic, no vLLM import: the config loader validates the `engine:` section with this
model on machines that do not have vLLM installed.

The defaults are for openai/gpt-oss-safeguard-20b on one GPU and follow vLLM's gpt-oss
recipe (vllm-project/recipes, OpenAI/GPT-OSS.md): tensor parallel size 1 for the best
throughput per GPU, `max_num_batched_tokens` 8192, asynchronous scheduling. Unlike the
recipe's benchmark configuration, prefix caching stays on: every request of a policy
shares the policy's tokens as a prefix, and reusing their KV cache is most of our speed.
docs/engine.md has the settings for -120b and for the CPU test engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineSettings(BaseModel):
    """Validated engine configuration; rejects unknown keys so a misspelt option fails at startup."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        default="openai/gpt-oss-safeguard-20b",
        description="local directory or Hugging Face id of the weights (-20b fits a 16 GB GPU, -120b an 80 GB one)",
    )
    served_model_name: str | None = Field(
        default=None, description="name written into verdicts as `model`; defaults to `model`"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="activation dtype; 'auto' takes the checkpoint's (bf16 with MXFP4 experts)"
    )
    max_model_len: int = Field(
        default=10240,
        gt=0,
        description="prompt + completion tokens per request; the recipe's Hopper config uses 10240, "
        "enough for a 600-token policy, long content and high-effort reasoning",
    )
    max_num_seqs: int = Field(
        default=256,
        gt=0,
        description="sequences the engine runs at once; the batcher keeps at most this many in flight",
    )
    max_num_batched_tokens: int = Field(
        default=8192, gt=0, description="tokens per forward step; the recipe recommends 8192"
    )
    gpu_memory_utilization: float = Field(
        default=0.90, gt=0, le=1, description="share of GPU memory for weights, activations and KV cache"
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None, gt=0, description="exact KV-cache size; overrides gpu_memory_utilization (CPU engines need it)"
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per model; 1 gives the best throughput per GPU, 2-8 lower latency"
    )
    enable_prefix_caching: bool = Field(
        default=True, description="reuse the KV cache of the shared policy prefix across requests"
    )
    enforce_eager: bool = Field(
        default=False, description="skip CUDA graphs and torch.compile (faster start, slower steps)"
    )
    async_scheduling: bool = Field(
        default=True, description="overlap CPU scheduling with GPU work, as the recipe recommends"
    )
    skip_tokenizer_init: bool = Field(
        default=True,
        description="prompts arrive as harmony token ids and completions are decoded by harmony, "
        "so the engine needs no Hugging Face tokenizer",
    )
    max_tokens: int = Field(
        default=2048, gt=0, description="completion cap per request: analysis (reasoning) plus the final answer"
    )
    temperature: float = Field(
        default=1.0,
        ge=0,
        description="sampling temperature; gpt-oss is tuned for 1.0, and 0 makes an unparseable answer "
        "repeat identically on retry",
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="longest one attempt may run when the request carries no earlier deadline"
    )
    max_unparseable_retries: int = Field(
        default=1, ge=0, description="new attempts after a completion whose final answer cannot be parsed"
    )
    max_engine_retries: int = Field(
        default=2, ge=0, description="new attempts after an engine error or a timed-out attempt"
    )
    retry_backoff_s: float = Field(
        default=0.5, ge=0, description="first wait before an engine retry; doubles each retry, at most 8 s"
    )
    keep_reasoning: bool = Field(
        default=False, description="copy the analysis channel into `reasoning` (for audit, never for end users)"
    )

    @model_validator(mode="after")
    def _completion_fits(self) -> EngineSettings:
        if self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be below max_model_len ({self.max_model_len}) "
                "to leave room for the prompt"
            )
        return self

    @property
    def model_name(self) -> str:
        """The name verdicts carry."""
        return self.served_model_name or self.model
