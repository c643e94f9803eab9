"""Settings of the outputs' destinations besides plain JSON on Kafka (`sinks:`): files that take
some of the outputs the Kafka topics take, each output then counting as delivered only when every
destination has it; and the outputs whose Kafka records carry a registered JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Every kind of output the pipeline sends (`consumer.sinks.roles` uses this one list).
OutputKind = Literal["verdict", "dead_letter", "review_item"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("verdict", "dead_letter", "review_item")
# The outputs that may carry a registered schema: review items are read back as plain JSON by the
# review desk and console, so not yet them.
RegisteredOutput = Literal["verdict", "dead_letter"]


class FileSinkSettings(BaseModel):
    """One JSON Lines file: one output a line, appended."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="the file; its folder must exist")
    outputs: list[OutputKind] = Field(
        default_factory=lambda: ["verdict", "dead_letter"], min_length=1, description="the outputs it takes"
    )
    sync_interval_s: float = Field(
        default=0.1, gt=0, description="how often the file is fsynced; an output counts delivered only after"
    )

    @field_validator("path")
    @classmethod
    def _folder_exists(cls, path: Path) -> Path:
        if not path.parent.is_dir():
            raise ValueError("the folder of this file does not exist")
        return path

    @field_validator("outputs")
    @classmethod
    def _each_once(cls, outputs: list[OutputKind]) -> list[OutputKind]:
        if len(set(outputs)) != len(outputs):
            raise ValueError("an output kind is listed twice")
        return outputs


class SinksSettings(BaseModel):
    """Where outputs go besides the Kafka topics (`kafka.verdict_topic`, `dead_letter_topic`, `review.topic`)."""

    model_config = ConfigDict(extra="forbid")

    files: list[FileSinkSettings] = Field(
        default_factory=list, description="JSON Lines files, e.g. [{path: verdicts.jsonl, outputs: [verdict]}]"
    )

    registered_outputs: list[RegisteredOutput] = Field(
        default_factory=list,
        description="outputs written to Kafka in Confluent's wire format with a registered JSON Schema "
        "(needs schema_registry.url; docs/registry.md); the others stay plain JSON",
    )

    @field_validator("registered_outputs")
    @classmethod
    def _registered_once(cls, outputs: list[RegisteredOutput]) -> list[RegisteredOutput]:
        if len(set(outputs)) != len(outputs):
            raise ValueError("an output kind is listed twice")
        return outputs

    @field_validator("files")
    @classmethod
    def _distinct_paths(cls, files: list[FileSinkSettings]) -> list[FileSinkSettings]:
        paths = [f.path.resolve() for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("two files have the same path")
        return files
