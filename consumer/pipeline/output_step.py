"""The output step: a record's verdict (with its review items) or its dead letter, built,
traced, counted and handed to the sink; the sink owns delivery, the tracker the commit.

Verdicts are counted a batch at a time: each verdict appends its counter keys and its latency,
and `observe` (the pipeline calls it after each poll batch and whenever it serves the sink)
adds them to the counters in one `Counter.update` and to the latency histogram in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry.trace import Span, Status, StatusCode

from consumer import stages
from consumer.events import ContentEvent, Document, ErrorType, ReviewItem
from consumer.kafka import records
from consumer.kafka.client import Message
from consumer.kafka.offsets import OutputJoin, Ticket
from consumer.pipeline import outputs
from consumer.pipeline.chat import Offenders
from consumer.pipeline.telemetry import Telemetry
from consumer.pipeline.telemetry.drift import OTHER
from consumer.pipeline.telemetry.tracing import UnsampledSpan, inject
from consumer.policy import Policy, most_severe
from consumer.policy.communities import Community
from consumer.sinks.roles import CarriesReviewItems, OutputSink


class Record:
    """One record on its way through the pipeline."""

    __slots__ = ("message", "ticket", "span", "traced", "started", "event")

    def __init__(self, message: Message, ticket: Ticket, span: Span):
        self.message = message
        self.ticket = ticket
        self.span = span
        self.traced = type(span) is not UnsampledSpan and span.is_recording()  # most records: no call
        self.started = time.monotonic()
        self.event: ContentEvent | None = None


class OutputStep:
    def __init__(
        self,
        sink: OutputSink,
        offenders: Offenders,
        telemetry: Telemetry,
        outputs_done: OutputJoin,
        review_topic: str,
        sent: Callable[[], None],
    ):
        """`sent`: called after each output is handed to the sink (its reports are to be served)."""
        self._sink = sink
        self._review_sink = sink if isinstance(sink, CarriesReviewItems) else None
        self._offenders = offenders
        self._telemetry = telemetry
        self._outputs_done = outputs_done
        self._review_topic = review_topic
        self._sent = sent
        self._counted: list[tuple[str, bool, str, str, str | None, str | None]] = []  # verdict counter keys
        self._latencies: list[float] = []  # of the verdicts, in seconds

    def observe(self) -> None:
        """Count the verdicts sent since the last call: one update of each metric per batch."""
        if self._latencies:
            self._telemetry.verdicts.update(self._counted)
            self._telemetry.e2e_latency.record_many(self._latencies, "verdict")
            self._counted, self._latencies = [], []

    def verdict(
        self, record: Record, results: list[Document], note: str | None = None, community: Community | None = None
    ) -> None:
        """The record's verdict from its policies' results (none for a deletion, with `note`);
        `community`: what the event's community's own policies add (its offender thresholds)."""
        event, message, span = record.event, record.message, record.span
        assert event is not None
        violation, actions = False, []
        for result in results:  # one loop, no comprehensions: this runs for every record
            # An undecided result is a guess awaiting a person: it holds, and it is no found violation.
            if result["violation"] and result["stage"] != stages.UNDECIDED:
                violation = True
            actions.append(result["action"])
        thresholds = community.offender_thresholds if community is not None else None
        action, offences = self._offenders.record(event.community_id, event.author_id, violation, most_severe(actions),
                                                  thresholds=thresholds)  # fmt: skip
        now = time.monotonic()
        latency_ms = (now - record.started) * 1000
        document = outputs.verdict(
            event.event_id,
            records.source_of(message),
            violation,
            action,
            results,
            author_id=event.author_id,
            community_id=event.community_id,
            context_id=event.context_id,
            offender_violations=offences if self._offenders.counts(thresholds) and event.author_id else None,
            note=note,
            latency_ms=latency_ms,
        )
        if record.traced:
            span.set_attributes({"safeguard.violation": violation, "safeguard.action": action})
        self._sink.send_verdict(document, message, record.ticket, inject(span))
        self._sent()
        if results:  # a deletion decides nothing: it counts towards no rate
            counted = self._counted
            label = self._telemetry.communities.count(event.community_id, now)
            for result in results:
                owner = result["policy_community"]
                if owner is None:
                    key, version = result["policy_id"], result["policy_version"]
                elif owner == label:  # a labelled community's own policy, by key: two communities may use one id
                    key, version = f"{owner}/{result['policy_id']}", result["policy_version"]
                else:  # the other communities' own policies, together (CommunityLabels.policy_series)
                    key = version = OTHER
                counted.append((key, result["violation"], result["action"], version, result["stage"], label))
        self._latencies.append(latency_ms / 1000)

    def review_items(self, record: Record, items: list[ReviewItem]) -> None:
        """Review items go with the verdict under the record's ticket: done when all are delivered."""
        self._outputs_done.expect(record.ticket, 1 + len(items))
        headers = inject(record.span)
        sink = self._review_sink
        assert sink is not None  # the review desk is enabled only with a sink that carries review items
        for item in items:
            sink.send_review_item(self._review_topic, item.model_dump(mode="json"), record.message,
                                  record.ticket, headers)  # fmt: skip

    def dead_letter(
        self,
        record: Record,
        error_type: ErrorType,
        reason: str,
        raw_output: str | None = None,
        attempts: int = 1,
        policy: Policy | None = None,
    ) -> None:
        """`policy`: the one whose classification failed, when one did (the drift watch counts it)."""
        event_id = record.event.event_id if record.event is not None else None
        letter = records.dead_letter(record.message, error_type, reason, event_id, raw_output, attempts)
        span = record.span
        if record.traced:
            span.set_status(Status(StatusCode.ERROR, error_type.value))
            span.set_attribute("error.type", error_type.value)
        self._sink.send_dead_letter(letter, record.message, record.ticket, inject(span))
        self._sent()
        telemetry = self._telemetry
        community = telemetry.communities.label(record.event.community_id if record.event is not None else None)
        if policy is None:
            policy_id, version = "", ""
        else:
            policy_id = telemetry.communities.policy_series(policy.key, policy.community)
            version = policy.version if policy_id != OTHER else OTHER
        telemetry.dead_letters[(error_type.value, policy_id, version, community)] += 1
        telemetry.e2e_latency.record(time.monotonic() - record.started, "dead_letter")
