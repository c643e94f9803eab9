"""safeguard-consumer: a streaming moderation consumer for Kafka event pipelines."""

from consumer import compiled as _compiled

__version__ = "0.1.0"

# The hot path's compiled modules, where this environment has them (consumer/compiled).
_compiled.install()
