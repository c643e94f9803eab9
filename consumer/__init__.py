"""safeguard-consumer: a streaming moderation consumer for Kafka event pipelines."""

__version__ = "0.1.0"
