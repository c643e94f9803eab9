"""The `safeguard-consumer` command line: every command, each importing what it needs inside it,
so that `--help` and the light commands start fast and need none of the engine stack."""

from consumer.cli import kafka_topics, policies, replays, reviews  # noqa: F401 - importing registers their commands
from consumer.cli.app import app, main
from consumer.cli.replays import replay

__all__ = ["app", "main", "replay"]
