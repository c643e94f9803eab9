"""The confluent-kafka client types the layers above Kafka I/O use: the consumer, the producer, a
record, a partition and the client's errors, from this one module.

The architecture contract (pyproject.toml) lets only `consumer.kafka` (and the sinks and decoders)
import confluent_kafka, so that what the consumer depends on of its Kafka client is found here and
in the Kafka I/O modules, not spread over review, replay, the console and the pipeline.
"""

from __future__ import annotations

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

# librdkafka's RD_KAFKA_PARTITION_UA, for `Producer.produce` called positionally: "unassigned", the
# configured partitioner picks the partition (by the key).
PARTITION_UA = -1

__all__ = ["PARTITION_UA", "Consumer", "KafkaError", "KafkaException", "Message", "Producer", "TopicPartition"]
