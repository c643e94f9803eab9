"""The checkpoint of one replay run: owns "a resumed replay starts after what was delivered"."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field, ValidationError

from consumer.durable import replacing
from consumer.replay import ReplayError
from consumer.replay.bounds import OffsetRange


class Checkpoint(BaseModel):
    """The state of one replay run.

    It records what a resumed run must keep identical (topic, offset ranges, output, policy
    versions) and, per partition, `next`: one past the highest offset below which every
    record's output was delivered (the offset tracker's position). `save` replaces the file
    whole (temporary file, fsync, rename), so a crash leaves either checkpoint.
    """

    run_id: str
    topic: str
    output: str  # "topic:NAME" or "file:PATH"
    policies: list[str]  # id@version of every policy in force
    started_at: datetime
    # per partition; checkpoints written before the offset range had its own name call it "window"
    ranges: dict[int, OffsetRange] = Field(validation_alias=AliasChoices("ranges", "window"))
    complete: bool = False

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
        except ValidationError:
            raise ReplayError(f"{path}: not a replay checkpoint") from None

    def save(self, path: Path) -> None:
        with replacing(path) as out:
            out.write(self.model_dump_json(indent=2).encode())

    def advance(self, positions: dict[int, int]) -> None:
        for partition, position in positions.items():
            offsets = self.ranges[partition]
            offsets.next = max(offsets.next, min(position, offsets.end))

    def finish(self) -> None:
        """Every record of the ranges was delivered (offsets in gaps are transaction markers or compacted)."""
        for offsets in self.ranges.values():
            offsets.next = offsets.end
        self.complete = True

    def records(self) -> int:
        return sum(r.end - r.start for r in self.ranges.values())

    def covers(self, topic: str, partition: int, offset: int) -> bool:
        """True if the output of that record was delivered by this run (before its last save)."""
        offsets = self.ranges.get(partition)
        return topic == self.topic and offsets is not None and offsets.start <= offset < offsets.next
