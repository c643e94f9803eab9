"""The console's security promises over real HTTP: the application served by the web server the
console command runs (`consumer.review.web.WebServer`: uvicorn, h11) on a real socket, asked
with a plain HTTP client. The decision writer is the test's (the topic is in
tests/integration/test_console_security.py)."""

from __future__ import annotations

import http.client
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import pytest
from pydantic import SecretStr

from consumer.config.console import ConsoleSettings
from consumer.console.app import ConsoleApp
from consumer.console.identity import COOKIE
from consumer.policy import PolicyStore
from consumer.review.state import ReviewState
from consumer.review.web import WebServer
from tests.conftest import REPO
from tests.unit.console.test_console import Writer, item

REVIEWERS = [{"id": "alice", "token": "t-alice"}, {"id": "bob", "token": "t-bob"}]


class Served:
    """A console app on 127.0.0.1 and a tiny client that keeps one cookie jar per name."""

    def __init__(self, settings: ConsoleSettings, *items, writer: Writer | None = None):
        self.state = ReviewState()
        for i in items:
            self.state.add_item(i)
        self.writer = writer or Writer()
        policies = PolicyStore(REPO / "policies").get
        self.app = ConsoleApp(settings, self.state, policies, self.writer)  # type: ignore[arg-type]
        self.server = WebServer(self.app.asgi, "127.0.0.1", 0, settings.read_timeout_s, "test-console")
        self.server.start()
        self.jars: dict[str, dict[str, str]] = {}

    def request(self, method: str, path: str, form: dict | None = None, headers: dict | None = None,
                jar: str | None = None, source: str | None = None
                ) -> tuple[int, dict[str, list[str]], str]:  # fmt: skip
        # `source`: the client's own address (any of 127.0.0.0/8 reaches the server on Linux)
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10,
                                                source_address=(source, 0) if source else None)  # fmt: skip
        sent = dict(headers or {})
        cookies = self.jars.setdefault(jar, {}) if jar else {}
        if cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        body = urlencode(form, doseq=True).encode() if form is not None else None
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
        answer: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            answer.setdefault(name.lower(), []).append(value)
        for cookie in answer.get("set-cookie", []):
            name, value = cookie.split(";")[0].split("=", 1)
            if jar is not None:
                cookies[name] = value.strip('"')
        connection.close()
        return response.status, answer, text

    def sign_in(self, jar: str, token: str | None, headers: dict | None = None, source: str | None = None) -> int:
        _, _, page = self.request("GET", "/login", jar=jar, source=source)
        form = {"form_token": re.search(r'name="form_token" value="([^"]+)"', page).group(1), "next": "/"}
        if token is not None:
            form["token"] = token
        return self.request("POST", "/login", form=form, headers=headers, jar=jar, source=source)[0]

    def csrf(self, jar: str) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.request("GET", "/", jar=jar)[2]).group(1)

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def served() -> Iterator[Served]:
    made: list[Served] = []

    def make(*items, writer: Writer | None = None, **settings) -> Served:
        settings.setdefault("reviewers", REVIEWERS)
        made.append(Served(ConsoleSettings(**settings), *items, writer=writer))
        return made[-1]

    yield make  # type: ignore[misc]
    for one in made:
        one.close()


def test_an_empty_blank_or_missing_token_never_signs_in(served):
    console = served(item(1))
    for token in ("", " ", "\n", None):
        assert console.sign_in("mallory", token) == 401
        assert console.request("GET", "/", jar="mallory")[0] == 401
    assert COOKIE not in console.jars["mallory"]
    # Config refuses a blank token; the sign-in does not lean on that: a blank one that got
    # through anyway (settings built without validation) still matches nothing.
    unchecked = ConsoleSettings(reviewers=REVIEWERS)
    unchecked.reviewers[1] = unchecked.reviewers[1].model_copy(update={"token": SecretStr("")})
    blank = Served(unchecked, item(1))
    try:
        for token in ("", " ", None):
            assert blank.sign_in("mallory", token) == 401
        assert blank.sign_in("alice", "t-alice") == 303
    finally:
        blank.close()
    # Both sides normalised alike: a token kept in a file with its newline, typed with a space.
    from_file = served(item(1), reviewers=[{"id": "carol", "token": "t-carol\n"}])
    assert from_file.sign_in("carol", " t-carol") == 303
    assert from_file.request("GET", "/", jar="carol")[0] == 200


def test_sign_in_needs_the_consoles_own_form_and_origin(served):
    console = served(item(1))
    status, _, _ = console.request("POST", "/login", form={"token": "t-alice", "next": "/"}, jar="victim")
    assert status == 403  # a form from another site has no form token (login CSRF)
    assert console.sign_in("victim", "t-alice", headers={"Origin": "http://127.0.0.1:1"}) == 403
    assert console.sign_in("victim", "t-alice", headers={"Origin": "null"}) == 403  # another origin, hidden
    assert COOKIE not in console.jars["victim"]
    assert console.sign_in("victim", "t-alice", headers={"Origin": f"http://127.0.0.1:{console.server.port}"}) == 303


def test_guessing_tokens_is_rate_limited_and_the_refusal_names_the_client(served, caplog):
    console = served(item(1), sign_in_attempts_per_minute=5)
    caplog.set_level(logging.INFO, logger="consumer.console.app")
    assert [console.sign_in("guesser", f"guess-{n}") for n in range(6)] == [401] * 5 + [429]
    assert console.sign_in("guesser", "t-alice") == 429  # even the right token, until the minute has passed
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 7 and all("127.0.0.1" in r for r in refusals)
    assert all("guess-" not in r and "t-alice" not in r for r in refusals)  # tokens never logged
    # The limit is the guesser's address's, not everyone's: a guesser cannot lock the team out.
    assert console.sign_in("alice", "t-alice", source="127.0.0.2") == 303


def test_every_answer_renews_the_session_cookie(served):
    console = served(item(1), session_idle_s=600)
    console.sign_in("alice", "t-alice")
    for path in ("/", "/dashboard"):
        _, headers, _ = console.request("GET", path, jar="alice")
        (cookie,) = [c for c in headers["set-cookie"] if c.startswith(COOKIE)]
        assert "Max-Age=600" in cookie


def test_looking_at_an_item_takes_nothing_only_its_open_button_does(served):
    console = served(item(1))
    console.sign_in("alice", "t-alice")
    console.sign_in("bob", "t-bob")
    status, _, page = console.request("GET", "/item/rv-1", jar="alice")  # what an <img> from elsewhere sends
    assert status == 200 and 'id="open-item"' in page and 'id="decide"' not in page
    assert console.app.leases.holder("rv-1") is None
    as_image = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Dest": "image"}
    assert console.request("GET", "/next", headers=as_image, jar="alice")[0] == 403
    assert console.app.leases.holder("rv-1") is None
    status, headers, _ = console.request("POST", "/open/rv-1", form={"csrf": console.csrf("bob")}, jar="bob")
    assert status == 303 and headers["location"] == ["/item/rv-1"]
    assert console.app.leases.holder("rv-1").reviewer_id == "bob"
    assert console.request("GET", "/item/rv-1", jar="alice")[0] == 409


def test_two_decisions_posted_at_once_on_one_item_write_one(served):
    class SlowWriter(Writer):
        def write(self, decision):
            time.sleep(0.5)  # the broker's acknowledgement takes a while: both requests are in flight
            return super().write(decision)

    console = served(item(1), writer=SlowWriter())
    console.sign_in("alice", "t-alice")
    console.sign_in("bob", "t-bob")
    console.request("POST", "/open/rv-1", form={"csrf": console.csrf("alice")}, jar="alice")
    answers: dict[str, int] = {}

    def decide(jar: str, verdict: str) -> None:
        answers[jar] = console.request("POST", "/item/rv-1", form={"csrf": console.csrf(jar), "verdict": verdict},
                                       jar=jar)[0]  # fmt: skip

    # alice twice (a double-click) and bob (whose page is stale): one decision, two refusals.
    threads = [threading.Thread(target=decide, args=(jar, v)) for jar, v in (("alice", "safe"), ("bob", "violation"))]
    second = threading.Thread(target=lambda: answers.__setitem__("again", console.request(
        "POST", "/item/rv-1", form={"csrf": console.csrf("alice"), "verdict": "violation"}, jar="alice")[0]))
    for t in [*threads, second]:
        t.start()
    for t in [*threads, second]:
        t.join(10)
    assert len(console.writer.written) == 1 and console.writer.written[0].reviewer_id == "alice"
    assert sorted(answers.values()) == [303, 409, 409]
    status, _, page = console.request("POST", "/item/rv-1", form={"csrf": console.csrf("bob"), "verdict": "safe"},
                                      jar="bob")  # fmt: skip
    assert status == 409 and "Decided already" in page
    assert len(console.writer.written) == 1


def test_bidi_controls_show_as_marked_text(served):
    console = served(item(1, content="I love this \u202eevil\u202c reversed"))
    console.sign_in("alice", "t-alice")
    console.request("POST", "/open/rv-1", form={"csrf": console.csrf("alice")}, jar="alice")
    _, _, page = console.request("GET", "/item/rv-1", jar="alice")
    assert "I love this [U+202E]evil[U+202C] reversed" in page and "\u202e" not in page


def test_a_review_id_with_a_slash_is_reviewed_like_any_other(served):
    odd = item(1).model_copy(update={"review_id": "chat/rv 1?x#y"})
    console = served(odd, item(2, minutes_ago=-1))
    console.sign_in("alice", "t-alice")
    status, headers, _ = console.request("GET", "/next", jar="alice")
    (location,) = headers["location"]
    assert status == 303 and location == f"/item/{quote('chat/rv 1?x#y', safe='')}"
    _, _, page = console.request("GET", location, jar="alice")
    assert 'data-review-id="chat/rv 1?x#y"' in page
    action = re.search(r'action="([^"]+)" id="decide"', page).group(1)
    status, headers, _ = console.request("POST", action, form={"csrf": console.csrf("alice"), "verdict": "safe"},
                                         jar="alice")  # fmt: skip
    assert status == 303 and [d.review_id for d in console.writer.written] == ["chat/rv 1?x#y"]
    assert console.request("GET", "/next", jar="alice")[1]["location"] == ["/item/rv-2"]  # the queue moved on


def test_half_sent_headers_and_stalled_bodies_time_out(served):
    console = served(item(1), read_timeout_s=1.0)
    half = socket.create_connection(("127.0.0.1", console.server.port))
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    stalled = socket.create_connection(("127.0.0.1", console.server.port))
    stalled.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 100\r\n\r\ntoken=")  # fmt: skip
    started = time.monotonic()
    for sock in (half, stalled):
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        sock.close()
        if sock is stalled:
            assert answer.startswith(b"HTTP/1.1 408")
        else:
            assert answer == b""  # closed, unanswered
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("length", "status"), [(None, 411), ("-1", 400), ("abc", 400), (str(1 << 20), 413)])
def test_a_body_without_a_sane_length_is_refused_unread(served, length, status):
    console = served(item(1))
    connection = http.client.HTTPConnection("127.0.0.1", console.server.port, timeout=10)
    connection.putrequest("POST", "/login")
    if length is not None:
        connection.putheader("Content-Length", length)
    connection.endheaders()
    assert connection.getresponse().status == status


def test_behind_a_proxy_only_the_proxys_addresses_and_one_header_are_believed(served):
    console = served(item(1), identity="header", trusted_proxies=["10.0.0.0/8"])
    assert console.request("GET", "/", headers={"X-Forwarded-User": "alice"})[0] == 401  # 127.0.0.1: not the proxy
    trusting = served(item(1), identity="header")  # the default: a proxy on this host
    assert trusting.request("GET", "/", headers={"X-Forwarded-User": "alice"})[0] == 200
    connection = http.client.HTTPConnection("127.0.0.1", trusting.server.port, timeout=10)
    connection.putrequest("GET", "/")
    connection.putheader("X-Forwarded-User", "bob")  # the client's, naming a reviewer, before a proxy that appends
    connection.putheader("X-Forwarded-User", "alice")
    connection.endheaders()
    assert connection.getresponse().status == 401
    for _ in range(300):
        assert trusting.request("GET", "/", headers={"X-Forwarded-User": "alice"})[0] == 200
    assert trusting.app.identity.live() == 1  # one session for alice, not one per request
