"""The Coop bridge against the real broker and a STAND-IN for Coop.

Coop itself cannot run here. `StandInCoop` implements the contract Coop's published
documentation gives (roostorg/coop: docs/api/items.md, docs/api/actions.md,
docs/development/api-auth.md): `POST /api/v1/items/async/` with an `X-API-KEY` header and
`{"items": [{"id", "typeId", "data"}]}` answered 202; Action webhooks POSTed as
`{"item": {"id", "typeId"}, "action": {"id"}, "policies", "rules", "actorEmail", "actorNote"}`,
signed in the `Coop-Signature` header as base64 RSASSA-PKCS1-v1_5 / SHA-256 of the raw body
with the organisation's key. It checks what Coop's documentation says Coop checks, no more.
"""

from __future__ import annotations

import base64
import logging
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from consumer.config import load_settings
from consumer.events import MachineResult, ReviewEvent, ReviewItem, ReviewReason, SourceRecord
from consumer.review.coop import CoopBridge
from tests.kafka_helpers import (committed_offsets, create_topic, create_topics, decoded, produce, read_all, unique,
                                 wait_for)  # fmt: skip

pytestmark = pytest.mark.kafka

API_KEY = "coop-test-key"


class StandInCoop:
    """Coop's Submit Items API as documented; `failures` first requests answer 503."""

    def __init__(self, failures: int = 0):
        self.items: list[dict] = []
        self.failures = failures
        self.requests = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.requests += 1
                if self.path != "/api/v1/items/async/":
                    return self._answer(404)
                if self.headers.get("X-API-KEY") != API_KEY:
                    return self._answer(401)
                if stand_in.failures > 0:
                    stand_in.failures -= 1
                    return self._answer(503)
                payload = orjson.loads(body)
                items = payload.get("items")
                if not isinstance(items, list) or not items or not all(
                    isinstance(i.get("id"), str) and isinstance(i.get("typeId"), str) and isinstance(i.get("data"), dict)
                    for i in items
                ):
                    return self._answer(400)
                stand_in.items.extend(items)
                self._answer(202)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public_key_pem(self) -> str:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def action_body(self, item_id: str, action_id: str, note: str | None = None, **extra) -> bytes:
        return orjson.dumps({"item": {"id": item_id, "typeId": "review-item"}, "action": {"id": action_id},
                             "policies": [{"id": "p1", "name": "Harassment", "penalty": "MEDIUM"}], "rules": [],
                             "custom": {}, "actorEmail": "mod@example.com", **({"actorNote": note} if note else {}),
                             **extra})  # fmt: skip

    def act(self, callback: str, item_id: str, action_id: str, note: str | None = None, tamper: bool = False,
            body: bytes | None = None) -> int:  # fmt: skip
        """A moderator takes an Action in the console: Coop POSTs the signed callback."""
        body = body or self.action_body(item_id, action_id, note)
        signature = base64.b64encode(self.key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")
        if tamper:
            body = body.replace(b"mod@example.com", b"evil@example.com")
        request = urllib.request.Request(callback, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Coop-Signature": signature})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def item(i: int) -> ReviewItem:
    return ReviewItem(
        review_id=f"rv-{i}", reason=ReviewReason.UNDECIDED, created_at=datetime.now(timezone.utc),
        policy_id="chat-harassment", policy_version="v1",
        event=ReviewEvent(event_id=f"e{i}", content=f"hard message {i}", author="user-1"),
        machine=MachineResult(violation=True, confidence="0.61", stage="undecided", model="cascade:lexical:undecided",
                              action="hold"),
        source=SourceRecord(topic="chat", partition=0, offset=i),
    )  # fmt: skip


def test_review_items_reach_coop_and_signed_moderator_actions_come_back_as_decisions(kafka):
    topic = unique("coop")
    reviews, decisions = f"{topic}.reviews", f"{topic}.decisions"
    create_topics(kafka, reviews, decisions)
    produce(kafka, reviews, [orjson.dumps(item(i).model_dump(mode="json")) for i in range(2)], keys=[b"chan"] * 2)
    coop = StandInCoop(failures=1)
    group = unique("group")
    settings = load_settings(None, {
        "kafka.bootstrap_servers": kafka, "kafka.group_id": group,
        "review.enabled": True, "review.topic": reviews, "review.decisions_topic": decisions,
        "review.coop": {"url": coop.url, "api_key": API_KEY, "item_type_id": "review-item",
                        "webhook_public_key": coop.public_key_pem(), "webhook_port": 0,
                        "actions": {"remove": {"violation": True, "category": "harassment", "rule_ids": ["H2"]},
                                    "approve": {"violation": False}}},
    })  # fmt: skip
    bridge = CoopBridge(settings, sleep=lambda s: None)
    bridge.start()
    try:
        wait_for(lambda: len(coop.items) == 2, timeout=60, message="the review items in Coop")
        assert coop.requests >= 2  # the first answer was a 503: sent again, not skipped
        assert [i["id"] for i in coop.items] == ["rv-0", "rv-1"] and {i["typeId"] for i in coop.items} == {"review-item"}
        assert coop.items[0]["data"]["text"] == "hard message 0" and coop.items[0]["data"]["reason"] == "undecided"
        assert coop.items[0]["data"]["machine_violation"] is True
        wait_for(lambda: committed_offsets(kafka, f"{group}.coop", reviews, 1) == {0: 2}, timeout=30,
                 message="the review items' offsets committed after Coop accepted them")  # fmt: skip

        callback = f"http://127.0.0.1:{bridge.port}/coop/actions"
        assert coop.act(callback, "rv-0", "approve", note="banter between friends") == 200
        assert coop.act(callback, "rv-1", "remove") == 200
        assert coop.act(callback, "rv-1", "approve", tamper=True) == 401  # the body was changed after signing
        assert coop.act(callback, "rv-1", "ban-forever") == 422  # an action the configuration does not map
        produced = decoded(read_all(kafka, decisions, 2, timeout=30))
        assert len(produced) == 2
        first, second = produced
        assert first["review_id"] == "rv-0" and first["violation"] is False
        assert first["reviewer_id"] == "mod@example.com" and first["note"] == "banter between friends"
        assert second == second | {"review_id": "rv-1", "violation": True, "category": "harassment", "rule_ids": ["H2"]}
        keys = [m.key() for m in read_all(kafka, decisions, 2, timeout=10)]
        assert keys == [b"rv-0", b"rv-1"]  # keyed by review id, as the review loop expects
    finally:
        bridge.stop()
        coop.close()


def bridge_settings(kafka: str, coop: StandInCoop, decisions: str, **webhook) -> object:
    return load_settings(None, {
        "kafka.bootstrap_servers": kafka, "kafka.group_id": unique("group"),
        "review.enabled": True, "review.topic": f"{decisions}.reviews", "review.decisions_topic": decisions,
        "review.coop": {"url": coop.url, "api_key": API_KEY, "item_type_id": "review-item",
                        "webhook_public_key": coop.public_key_pem(), "webhook_port": 0,
                        "actions": {"remove": {"violation": True}, "approve": {"violation": False}}, **webhook},
    })  # fmt: skip


def raw_request(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send `head` as is, then read until the bridge answers and closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def test_webhook_bodies_are_bounded_and_stalled_requests_time_out_without_a_thread_each(kafka, caplog):
    decisions = unique("coop-limits")
    create_topics(kafka, f"{decisions}.reviews", decisions)
    coop = StandInCoop()
    bridge = CoopBridge(bridge_settings(kafka, coop, decisions, webhook_read_timeout_s=1.0), sleep=lambda s: None)
    bridge.start()
    caplog.set_level(logging.INFO)
    try:
        post = b"POST /coop/actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        for length, status in ((b"-1", b"400"), (b"abc", b"400"), (str(20 << 20).encode(), b"413")):
            answer = raw_request(bridge.port, post + b"Content-Length: " + length + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:60]  # answered without reading a body
        assert raw_request(bridge.port, post + b"\r\n").startswith(b"HTTP/1.1 411")

        threads = threading.active_count()
        started = time.monotonic()
        stalled = [socket.create_connection(("127.0.0.1", bridge.port)) for _ in range(50)]
        for n, sock in enumerate(stalled):  # half of them stop inside the headers, half inside the body
            sock.sendall(post[:20] if n % 2 else post + b"Content-Length: 100\r\n\r\n{")
        assert threading.active_count() == threads  # a stalled request costs no thread
        for sock in stalled:
            sock.settimeout(10)
            while sock.recv(4096):
                pass
            sock.close()
        assert time.monotonic() - started < 8  # all closed by the 1 s read timeout, not held forever

        with socket.create_connection(("127.0.0.1", bridge.port)) as aborted:  # the client gives up mid-body
            aborted.sendall(post + b"Content-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        assert [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()] == []
        assert coop.act(f"http://127.0.0.1:{bridge.port}/coop/actions", "rv-1", "approve") == 200  # still serving
    finally:
        bridge.stop()
        coop.close()


def test_a_replayed_or_stale_action_writes_no_second_decision(kafka):
    decisions = unique("coop-replay")
    create_topics(kafka, f"{decisions}.reviews", decisions)
    coop = StandInCoop()
    bridge = CoopBridge(bridge_settings(kafka, coop, decisions), sleep=lambda s: None)
    bridge.start()
    callback = f"http://127.0.0.1:{bridge.port}/coop/actions"
    try:
        body = coop.action_body("rv-1", "remove")
        assert [coop.act(callback, "", "", body=body) for _ in range(3)] == [200, 200, 200]  # Coop's retries
        old = coop.action_body("rv-2", "remove", createdAt="2001-09-09T01:46:40+00:00")
        assert coop.act(callback, "", "", body=old) == 422
        fresh = coop.action_body("rv-3", "approve", createdAt=datetime.now(timezone.utc).isoformat())
        assert coop.act(callback, "", "", body=fresh) == 200
        assert coop.act(callback, "rv-1", "approve") == 200  # another action on rv-1 is another decision
        produced = decoded(read_all(kafka, decisions, 4, timeout=10))  # waits for a fourth that must not come
        assert [(d["review_id"], d["violation"]) for d in produced] == [("rv-1", True), ("rv-3", False), ("rv-1", False)]
    finally:
        bridge.stop()
        coop.close()


def test_a_decision_too_large_for_the_topic_is_answered_as_final(kafka):
    decisions = unique("coop-large")
    create_topics(kafka, f"{decisions}.reviews")
    create_topic(kafka, decisions, config={"max.message.bytes": "2000"})
    coop = StandInCoop()
    bridge = CoopBridge(bridge_settings(kafka, coop, decisions), sleep=lambda s: None)
    bridge.start()
    callback = f"http://127.0.0.1:{bridge.port}/coop/actions"
    try:
        incompressible = secrets.token_urlsafe(6000)  # the producer compresses: a repeated letter would fit
        assert coop.act(callback, "rv-1", "remove", note=incompressible) == 413  # 4xx: a retry would fail alike
        assert coop.act(callback, "rv-1", "remove", note="short") == 200  # not taken for recorded: this one lands
        (decision,) = decoded(read_all(kafka, decisions, 2, timeout=10))  # waits for a second that must not come
        assert decision["note"] == "short"
    finally:
        bridge.stop()
        coop.close()
