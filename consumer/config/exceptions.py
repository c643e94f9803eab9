"""The configuration's error, `Fatal` in the consumer's family (`consumer.errors`)."""

from __future__ import annotations

from consumer.errors import Fatal


class ConfigError(Fatal):
    """A configuration that cannot be used; the CLI exits with code 2 and prints this."""
