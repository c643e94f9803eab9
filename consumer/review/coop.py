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
  Coop retries a failed delivery up to five times with exponential back-off).
- **What each failure answers.** Coop's documentation says failed deliveries are retried, not
  which statuses count as failed; the bridge answers as HTTP means it: 5xx (503: the broker
  did not take it) for "try again", 4xx for "the same request will fail the same way": 401
  (signature), 422 (not an action the bridge knows, or a `createdAt` outside
  `review.coop.webhook_max_age_s`), 413 (a body over `MAX_BODY_BYTES`, or a decision record
  larger than the decisions topic takes), 411/400/408 (no, a malformed or a late body).
- **Replays.** A signed body can be sent again by anyone who saw it. Each Coop action on an item
  (item id + action id) is recorded once: the same action again is answered 200 without a
  second record (Coop's own retry after a lost answer, or a replay), and while the first is
  being written, 409. Coop's documented body carries no timestamp; when one does
  (`createdAt`), it must be within `review.coop.webhook_max_age_s` of now. The keys live in the
  bridge's memory (the last `REPLAY_KEYS`): a replay after a restart writes a second record
  with the same answer, which the review loop ignores (the first decision read counts).
- **Limits.** The webhook server is `consumer.review.web.WebServer`: headers and body within
  `review.coop.webhook_read_timeout_s`, the body's length declared and at most `MAX_BODY_BYTES`
  before a byte is read, no thread per connection, one log line per refused request.

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
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from consumer.config import Settings
from consumer.config.review import CoopAction, CoopSettings
from consumer.events import ReviewDecision, ReviewItem
from consumer.kafka.client import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from consumer.kafka.client_logs import client_options
from consumer.kafka.options import PRODUCER_DEFAULTS
from consumer.review.web import BodyRefused, WebServer, read_body

log = logging.getLogger(__name__)

ITEMS_PATH = "/api/v1/items/async/"
SIGNATURE_HEADER = "Coop-Signature"
# The Coop Item Type fields a review item is sent as (all strings, booleans or ISO datetimes).
ITEM_FIELDS = ("text", "reason", "policy_id", "policy_version", "event_id", "author", "context", "created_at",
               "machine_violation", "machine_category", "machine_confidence", "machine_stage", "machine_rationale",
               "appeal")  # fmt: skip
MAX_BODY_BYTES = 1 << 20
REPLAY_KEYS = 100_000  # Coop actions remembered as recorded: far more than a day of a team's decisions


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
        "text": e.content, "reason": item.reason.value, "policy_id": item.policy_key,
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


def stale(payload: dict[str, Any], max_age_s: float, now: datetime | None = None) -> str | None:
    """Why a signed webhook's `createdAt` is refused (unreadable, or further than `max_age_s` from
    now), or None (within the window, or no timestamp, as in Coop's documented body)."""
    created = payload.get("createdAt")
    if created is None:
        return None
    try:
        moment = datetime.fromisoformat(created) if isinstance(created, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        return "createdAt is not an ISO 8601 time with a zone"
    age = ((now or datetime.now(timezone.utc)) - moment).total_seconds()
    if abs(age) > max_age_s:
        return f"createdAt {created} is outside the accepted window of {max_age_s:g} s (a replay?)"
    return None


class ActionLedger:
    """Owns "each Coop action on an item is recorded once": `reserve` before writing, then
    `recorded` or `failed`. Thread-safe; remembers the last `REPLAY_KEYS` recorded actions."""

    def __init__(self, capacity: int = REPLAY_KEYS):
        self._capacity = capacity
        self._lock = threading.Lock()
        self._recorded: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._writing: set[tuple[str, str]] = set()

    def reserve(self, key: tuple[str, str]) -> Literal["recorded", "writing"] | None:
        """None: the caller writes it now; otherwise what became of the earlier one."""
        with self._lock:
            if key in self._recorded:
                return "recorded"
            if key in self._writing:
                return "writing"
            self._writing.add(key)
            return None

    def recorded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._writing.discard(key)
            self._recorded[key] = None
            while len(self._recorded) > self._capacity:
                self._recorded.popitem(last=False)

    def failed(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._writing.discard(key)


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
        self.ledger = ActionLedger()
        self._server: WebServer | None = None
        self._threads: list[threading.Thread] = []
        self.sent = 0
        self.decisions = 0
        self.rejected = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    def start(self) -> None:
        app = Starlette(routes=[Route("/{path:path}", self._webhook, methods=["POST"])])
        self._server = WebServer(app, self.coop.webhook_host, self.coop.webhook_port, self.coop.webhook_read_timeout_s,
                                 "coop-webhooks")  # fmt: skip
        self._server.start()
        self._threads = [threading.Thread(target=self._send_items, name="coop-items", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop()
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

    async def _webhook(self, request: Request) -> JSONResponse:
        try:
            body = await read_body(request, MAX_BODY_BYTES, self.coop.webhook_read_timeout_s)
        except BodyRefused as exc:
            self.rejected += 1
            client = request.client.host if request.client else "unknown"
            log.info("coop webhook from %s refused (%d): %s", client, exc.status, exc)
            return _answer(exc.status, str(exc))
        status, message = await run_in_threadpool(self.receive, body, request.headers.get(SIGNATURE_HEADER))
        return _answer(status, message)

    def receive(self, body: bytes, signature: str | None) -> tuple[int, str]:
        """One webhook: (HTTP status, message). 200 only once the decision is on the topic."""
        if not verify_signature(self._public_key, body, signature):
            self.rejected += 1
            return 401, "the Coop-Signature does not verify"
        try:
            payload = orjson.loads(body)
            decision = decision_from_action(payload, self.coop.actions)
        except (orjson.JSONDecodeError, ValueError) as exc:
            self.rejected += 1
            return 422, str(exc)
        problem = stale(payload, self.coop.webhook_max_age_s)
        if problem:
            self.rejected += 1
            log.warning("coop webhook for %s refused: %s", decision.review_id, problem)
            return 422, problem
        key = (payload["item"]["id"], payload["action"]["id"])
        earlier = self.ledger.reserve(key)
        if earlier == "recorded":
            return 200, f"action {key[1]} on {key[0]} was recorded before; not recorded twice"
        if earlier == "writing":
            return 409, f"action {key[1]} on {key[0]} is being recorded; ask again for its outcome"
        status, message = self._produce(decision)
        if status == 200:
            self.ledger.recorded(key)
            self.decisions += 1
        else:
            self.ledger.failed(key)
        return status, message

    def _produce(self, decision: ReviewDecision) -> tuple[int, str]:
        errors: list[KafkaError] = []

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        with self._producer_lock:
            try:
                self._producer.produce(self.settings.review.decisions_topic, key=decision.review_id.encode(),
                                       value=orjson.dumps(decision.model_dump(mode="json")), on_delivery=report)  # fmt: skip
            except KafkaException as exc:  # refused before sending: too large for the producer, or its queue full
                errors.append(exc.args[0])
            except BufferError:
                return 503, "the bridge's producer queue is full; try again"
            left = self._producer.flush(15) if not errors else 0
        if errors and errors[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
            log.warning("coop webhook for %s refused: the decision record is too large for %s", decision.review_id,
                        self.settings.review.decisions_topic)  # fmt: skip
            return 413, "the decision record is larger than the decisions topic takes; sending it again will not help"
        if left or errors:
            log.warning("coop webhook for %s: the decision was not delivered: %s", decision.review_id,
                        errors[0].str() if errors else "not acknowledged in time")  # fmt: skip
            return 503, "the decision could not be delivered; try again"
        return 200, f"decision for {decision.review_id} recorded"


def _answer(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)
