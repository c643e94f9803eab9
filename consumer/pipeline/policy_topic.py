"""The policy topic followed by a running consumer (`policies.topic`): owns "the topic's policies
are in force before the first event is classified, and every later record applies live".

`read` reads the topic whole before intake starts. While it cannot be read, that is an outage
(`consumer.errors.Unavailable`, dependency "policy topic"): nothing is consumed yet, `/readyz`
fails with the reason, and the read is tried again (backing off) until it answers or the run
stops. `start` then follows the topic on a thread of its own; each batch of records is applied
to the `TopicPolicyStore`, whose reload callbacks fire as a file reload's do. Rejected records
are counted in `safeguard.policy_topic.rejected` (Prometheus
`safeguard_policy_topic_rejected_total`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from consumer.config import Settings
from consumer.errors import Unavailable
from consumer.kafka.client_logs import BrokerLink, ClientLogger
from consumer.kafka.policy_topic import DEPENDENCY, PolicyTopicReader
from consumer.pipeline.outage import Outage
from consumer.policy.topic import TopicPolicyStore

log = logging.getLogger(__name__)


class PolicyTopic:
    """Reads `policies.topic` into a `TopicPolicyStore`, then follows it."""

    def __init__(self, settings: Settings, store: TopicPolicyStore, link: BrokerLink, meter: Meter):
        assert settings.policies.topic is not None
        k = settings.kafka
        self._store = store
        self._timeout_s = k.startup_timeout_s
        client = k.consumer_options | {"bootstrap.servers": k.bootstrap_servers,
                                       "logger": ClientLogger("policies", link)}  # fmt: skip
        self.reader = PolicyTopicReader(client, settings.policies.topic, store.apply)
        meter.create_observable_counter(
            "safeguard.policy_topic.rejected", [self._observe_rejected],
            description="policy topic records refused (invalid, not UTF-8, key not the policy's); the last good "
            "version of their key stays in force",
        )  # fmt: skip

    async def read(self, outage: Outage, stopping: asyncio.Event) -> bool:
        """Read the whole topic, outages waited out; False if the run was stopped first."""
        down = False
        while not stopping.is_set():
            try:
                read = await asyncio.to_thread(self.reader.catch_up, self._timeout_s)
            except Unavailable as exc:
                outage.report(exc)
                down = True
                waiting = asyncio.ensure_future(outage.wait(DEPENDENCY))
                stopped = asyncio.ensure_future(stopping.wait())
                await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
                for task in (waiting, stopped):
                    task.cancel()
                continue
            if down:
                outage.answered(DEPENDENCY)
            log.info("policy topic %s read: %d records, %d policies from it in force, %d rejected",
                     self.reader.topic, read, len(self._store.published()), self._store.rejected)  # fmt: skip
            return True
        return False

    def start(self) -> None:
        self.reader.follow()

    def stop(self) -> None:
        self.reader.close()

    def _observe_rejected(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._store.rejected, {"topic": self.reader.topic})
