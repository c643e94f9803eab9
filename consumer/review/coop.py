"""A bridge to ROOST's Coop review console: review items out, moderators' actions back as decisions.

Written against Coop's published API documentation (github.com/roostorg/coop, docs/api/items.md,
docs/api/actions.md, docs/development/api-auth.md, read 2026-12):

- **Review items -> Coop.** `POST {url}/api/v1/items/async/` with the `X-API-KEY` header and
  `{"items": [{"id", "typeId", "data"}]}`; Coop answers `202 Accepted`. The item id is the
  review id, `typeId` is `review.coop.item_type_id`, and `data` holds the review item's fields
  flattened (`ITEM_FIELDS`): the Item Type configured in Coop must define them. Coop runs its
  rules on submitted items; a rule (or routing rule) that sends them to a review queue puts
  them in front of moderators. The bridge reads the review topic in its own consumer group
  and commits an item's offset only after Coop accepted it (a failed request is retried with
  back-off, never skipped).
- **Coop's action webhooks -> decisions.** When a moderator takes an Action, Coop POSTs
  `{"item": {"id", "typeId"}, "action": {"id"}, "policies", "rules", "actorEmail", "actorNote", ...}`
  to the Action's callback URL, signed: the `Coop-Signature` header is the base64 of an
  RSASSA-PKCS1-v1_5 / SHA-256 signature of the raw body, verified with the organisation's
  webhook signature verification key (a PEM public key, `review.coop.webhook_public_key`).
  The bridge verifies the signature (401 when it fails), maps the action id to a decision
  (`review.coop.actions`: e.g. `{remove: {violation: true}, approve: {violation: false}}`;
  an unknown action is a 422), produces the `ReviewDecision` to `review.decisions_topic`
  keyed by review id, and answers 200 only after the broker acknowledged it (503 otherwise:
  Coop retries a failed delivery up to five times).

Coop itself cannot run here; the tests run the bridge against a stand-in that implements the
documented contract above (tests/integration/test_coop_bridge.py). Not bridged: appeals
(Coop's appeal API and appeal decision callback) and Partial Items.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from consumer.config import Settings
from consumer.config.review import CoopAction, CoopSettings
from consumer.events import ReviewDecision, ReviewItem
from consumer.kafka.client_logs import client_options
from consumer.kafka.sink import PRODUCER_DEFAULTS

log = logging.getLogger(__name__)

ITEMS_PATH = "/api/v1/items/async/"
SIGNATURE_HEADER = "Coop-Signature"
# The Coop Item Type fields a review item is sent as (all strings, booleans or ISO datetimes).
ITEM_FIELDS = ("text", "reason", "policy_id", "policy_version", "event_id", "author", "context", "created_at",
               "machine_violation", "machine_category", "machine_confidence", "machine_stage", "machine_rationale",
               "appeal")  # fmt: skip
MAX_BODY_BYTES = 1 << 20


class CoopError(Exception):
    """Coop did not accept a request; `retriable` when trying again may help."""

    def __init__(self, message: str, retriable: bool):
        super().__init__(message)
        self.retriable = retriable


def coop_item(item: ReviewItem, type_id: str) -> dict[str, Any]:
    """A review item as a Coop item: id = review id, data = the fields a moderator needs."""
    e, m = item.event, item.machine
    context = "\n".join(f"{c.author or 'someone'}: {c.content}" for c in e.context)
    data = {
        "text": e.content, "reason": item.reason.value, "policy_id": item.policy_id,
        "policy_version": item.policy_version, "event_id": e.event_id, "author": e.author or "",
        "context": context, "created_at": item.created_at.isoformat(), "machine_violation": m.violation,
        "machine_category": m.category or "", "machine_confidence": m.confidence or "",
        "machine_stage": m.stage or "", "machine_rationale": m.rationale or "", "appeal": item.appeal or "",
    }  # fmt: skip
    return {"id": item.review_id, "typeId": type_id, "data": data}


def verify_signature(public_key_pem: bytes, body: bytes, signature: str | None) -> bool:
    """Coop's webhook signature: base64 RSASSA-PKCS1-v1_5 over SHA-256 of the raw body."""
    if not signature:
        return False
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(raw, body, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def decision_from_action(payload: Any, actions: dict[str, CoopAction], now: datetime | None = None) -> ReviewDecision:
    """A Coop action webhook as a decision; ValueError names what is missing or unmapped."""
    if not isinstance(payload, dict):
        raise ValueError("the body is not a JSON object")
    item, action = payload.get("item"), payload.get("action")
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        raise ValueError("item.id is missing")
    if not isinstance(action, dict) or not isinstance(action.get("id"), str):
        raise ValueError("action.id is missing")
    meaning = actions.get(action["id"])
    if meaning is None:
        raise ValueError(f"action {action['id']!r} is not mapped in review.coop.actions")
    note = payload.get("actorNote")
    return ReviewDecision(
        review_id=item["id"],
        violation=meaning.violation,
        category=meaning.category,
        rule_ids=meaning.rule_ids,
        note=note if isinstance(note, str) else None,
        reviewer_id=payload.get("actorEmail") or "coop",
        decided_at=now or datetime.now(timezone.utc),
    )


class CoopClient:
    """Coop's Submit Items API."""

    def __init__(self, url: str, api_key: str, timeout_s: float = 10.0):
        self._url = url.rstrip("/") + ITEMS_PATH
        self._api_key = api_key
        self._timeout = timeout_s

    def submit(self, items: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(
            self._url, data=orjson.dumps({"items": items}), method="POST",
            headers={"X-API-KEY": self._api_key, "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise CoopError(f"Coop unreachable: {exc}", retriable=True) from None
        if not 200 <= status < 300:
            # 400: the items do not match the Item Type (a configuration error); 401/403: the key.
            raise CoopError(f"Coop answered {status} to {ITEMS_PATH}", retriable=status >= 500 or status == 429)


def check_coop_settings(coop: CoopSettings) -> None:
    """ValueError naming what the bridge needs and `review.coop` lacks."""
    missing = [k for k in ("url", "api_key", "item_type_id", "webhook_public_key") if getattr(coop, k) is None]
    if missing:
        raise ValueError(f"review.coop needs {', '.join(missing)}")


class CoopBridge:
    """Runs both directions until `stop()`: an item's offset is committed only after Coop accepted
    it; a webhook is answered 200 only after its decision is on the decisions topic."""

    def __init__(self, settings: Settings, client: CoopClient | None = None, sleep: Callable[[float], None] = time.sleep):
        coop = settings.review.coop
        check_coop_settings(coop)
        self.settings = settings
        self.coop = coop
        assert coop.url and coop.api_key and coop.item_type_id and coop.webhook_public_key
        self.client = client or CoopClient(coop.url, coop.api_key.get_secret_value())
        self._public_key = coop.webhook_public_key.encode("ascii")
        kafka = settings.kafka
        logs = client_options("coop-bridge")
        self._client_config = kafka.consumer_options | {"bootstrap.servers": kafka.bootstrap_servers, **logs}
        self._producer = Producer({**PRODUCER_DEFAULTS, **kafka.producer_options,
                                   "bootstrap.servers": kafka.bootstrap_servers, **logs})  # fmt: skip
        self._producer_lock = threading.Lock()
        self._sleep = sleep
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.sent = 0
        self.decisions = 0
        self.rejected = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self) -> None:
        self._server = ThreadingHTTPServer((self.coop.webhook_host, self.coop.webhook_port), self._handler())
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="coop-webhooks", daemon=True),
            threading.Thread(target=self._send_items, name="coop-items", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(30)
        self._producer.flush(10)

    # -- review items -> Coop ------------------------------------------------------------------

    def _send_items(self) -> None:
        consumer = Consumer({**self._client_config, "group.id": self.coop.group_id or f"{self.settings.kafka.group_id}.coop",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})  # fmt: skip
        consumer.subscribe([self.settings.review.topic])
        try:
            while not self._stopping.is_set():
                messages = [m for m in consumer.consume(100, timeout=0.5) if m.error() is None]
                if not messages:
                    continue
                items = []
                for message in messages:
                    try:
                        items.append(coop_item(ReviewItem.model_validate_json(message.value() or b""),
                                               self.coop.item_type_id or ""))  # fmt: skip
                    except ValueError:
                        log.warning("skipping an unreadable review item at offset %d", message.offset())
                if items and not self._submit(items):
                    return
                positions: dict[tuple[str, int], int] = {}
                for m in messages:
                    positions[(m.topic(), m.partition())] = max(positions.get((m.topic(), m.partition()), 0), m.offset() + 1)
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()], asynchronous=False)
        finally:
            consumer.close()

    def _submit(self, items: list[dict[str, Any]]) -> bool:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                self.client.submit(items)
                self.sent += len(items)
                return True
            except CoopError as exc:
                log.warning("%s; retrying in %.0fs%s", exc, delay, "" if exc.retriable else " (check the configuration)")
                self._sleep(delay)
                delay = min(delay * 2, 60.0)
        return False

    # -- Coop's webhooks -> decisions ----------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    return self._answer(413, "body too large")
                body = self.rfile.read(length)
                status, message = bridge.receive(body, self.headers.get(SIGNATURE_HEADER))
                self._answer(status, message)

            def _answer(self, status: int, message: str) -> None:
                data = orjson.dumps({"status": status, "message": message})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server signature
                log.debug("coop webhook: " + format, *args)

        return Handler

    def receive(self, body: bytes, signature: str | None) -> tuple[int, str]:
        """One webhook: (HTTP status, message). 200 only once the decision is on the topic."""
        if not verify_signature(self._public_key, body, signature):
            self.rejected += 1
            return 401, "the Coop-Signature does not verify"
        try:
            decision = decision_from_action(orjson.loads(body), self.coop.actions)
        except (orjson.JSONDecodeError, ValueError) as exc:
            self.rejected += 1
            return 422, str(exc)
        errors: list[str] = []

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err.str())

        with self._producer_lock:
            self._producer.produce(self.settings.review.decisions_topic, key=decision.review_id.encode(),
                                   value=orjson.dumps(decision.model_dump(mode="json")), on_delivery=report)  # fmt: skip
            left = self._producer.flush(15)
        if left or errors:
            return 503, "the decision could not be delivered; try again"
        self.decisions += 1
        return 200, f"decision for {decision.review_id} recorded"
