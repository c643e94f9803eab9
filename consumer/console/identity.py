"""Who is reviewing: configured reviewers with tokens, or a header set by the company's proxy.

`Identity` owns "no page answers without a reviewer, and every decision names its reviewer":
the app asks it for the session of every request except the sign-in form and the stylesheet,
and refuses the request (401) when there is none.

- `identity: tokens`: a reviewer signs in with their token (`review.console.reviewers`), once
  per browser; the console keeps the session in memory and gives the browser a random session
  id in an HttpOnly, SameSite=Strict cookie. Tokens are compared in constant time and never
  logged. A restart signs everyone out.
- `identity: header`: a proxy in front (oauth2-proxy, an identity-aware proxy) authenticates
  people and sets `review.console.header` to their name on every request; the console believes
  it only from the addresses in `review.console.trusted_proxies` (127.0.0.1 and ::1 by default)
  and refuses a request carrying the header twice (a proxy that appends rather than replaces
  would otherwise let the client choose the name). One session per person: a request without
  the cookie joins that person's session instead of opening another. With `reviewers` set,
  only those names are accepted.

Every session carries its reviewer's role (`review.console.reviewers[*].role`, moderator when
not listed); `consumer.console.roles` says what each role may do.

A session also carries what the page shows of it: how many items were decided in it, and when
it started (reviewers of harmful content need to see how long they have been at it), the items
skipped in it, and a per-session token that every form posts back (requests forged by another
site carry neither the SameSite cookie nor that token).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from consumer.config.console import ConsoleSettings, Role

COOKIE = "safeguard_console"


@dataclass
class Session:
    id: str
    reviewer_id: str
    csrf: str
    started: float
    last_seen: float
    role: Role = "moderator"
    decided: int = 0
    skipped: set[str] = field(default_factory=set)
    closed: bool = False

    def form_token_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Identity:
    """Thread-safe; `clock` is wall seconds (injected by the tests)."""

    def __init__(self, settings: ConsoleSettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.mode = settings.identity
        self._tokens = [(r.token.get_secret_value().strip().encode(), r.id) for r in settings.reviewers
                        if r.token is not None]  # fmt: skip
        self._names = {r.id for r in settings.reviewers}
        self._roles: dict[str, Role] = {r.id: r.role for r in settings.reviewers}
        self._proxies = [ip_network(p) for p in settings.trusted_proxies]
        self._clock = clock
        self._lock = threading.Lock()
        # Least recently seen first: expiry pops from the front, so no request scans every session.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._by_reviewer: dict[str, str] = {}  # header mode: the one session of each person

    def check(self) -> str | None:
        """Why the console cannot start with these settings, or None."""
        if self.mode == "tokens" and not self._tokens:
            return "review.console.identity is tokens but review.console.reviewers is empty: nobody could sign in"
        if self.mode == "header" and not self.settings.header.strip():
            return "review.console.header is empty"
        if self.mode == "header" and not self.settings.trusted_proxies:
            return "review.console.identity is header but review.console.trusted_proxies is empty: nobody could sign in"
        return None

    def reviewer_for_token(self, token: str | None) -> str | None:
        given = (token or "").strip().encode()
        if not given:  # never a match, whatever the configuration held
            return None
        found = None
        for known, reviewer in self._tokens:  # every token compared: the time says nothing about which matched
            if hmac.compare_digest(given, known):
                found = reviewer
        return found

    def from_trusted_proxy(self, client: str | None) -> bool:
        """Header mode: whether the request came from an address in `trusted_proxies`."""
        try:
            address = ip_address(client or "")
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def session(self, cookies: Mapping[str, str], names: Sequence[str] = (),
                client: str | None = None) -> Session | None:  # fmt: skip
        """The reviewer's session for a request, or None: refuse it. `names`: every value of the
        identity header the request carries; `client`: the address it came from."""
        now = self._clock()
        session = self._get(cookies.get(COOKIE), now)
        if self.mode == "tokens":
            return session
        if len(names) != 1 or not self.from_trusted_proxy(client):
            return None
        name = names[0].strip()
        if not name or (self._names and name not in self._names):
            return None
        if session is not None and session.reviewer_id == name:
            return session
        with self._lock:  # a request without the cookie (or another person's) joins the person's session
            known = self._sessions.get(self._by_reviewer.get(name, ""))
            if known is not None and now - known.last_seen <= self.settings.session_idle_s:
                known.last_seen = now
                self._sessions.move_to_end(known.id)
                return known
        return self.open(name)

    def open(self, reviewer_id: str) -> Session:
        now = self._clock()
        session = Session(secrets.token_urlsafe(24), reviewer_id, secrets.token_urlsafe(24), now, now,
                          role=self._roles.get(reviewer_id, "moderator"))  # fmt: skip
        with self._lock:
            self._expire(now)
            self._sessions[session.id] = session
            if self.mode == "header":
                self._by_reviewer[reviewer_id] = session.id
        return session

    def close(self, session: Session) -> None:
        with self._lock:
            self._forget(session.id)

    def live(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._sessions)

    def _get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is None:
                return None
            session.last_seen = now
            self._sessions.move_to_end(session_id)
            return session

    def _expire(self, now: float) -> None:
        # Sessions are kept in the order they were last seen: only the expired ones at the front are visited.
        idle = self.settings.session_idle_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= idle:
                return
            self._forget(oldest.id)

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        session.closed = True
        if self._by_reviewer.get(session.reviewer_id) == session_id:
            del self._by_reviewer[session.reviewer_id]


class SignInLimiter:
    """Owns "a client cannot guess tokens fast": at most `per_minute` refused sign-ins per client
    address in any minute; after that its sign-ins are refused unread until the minute has passed.
    Thread-safe; `clock` is monotonic seconds (injected by the tests)."""

    WINDOW_S = 60.0
    MAX_ADDRESSES = 10_000  # beyond this many recent offenders, the quietest are forgotten first

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._refused: OrderedDict[str, list[float]] = OrderedDict()  # least recently refused first

    def allowed(self, client: str | None) -> bool:
        with self._lock:
            return len(self._recent(client or "", self._clock())) < self.per_minute

    def refused(self, client: str | None) -> None:
        with self._lock:
            now = self._clock()
            key = client or ""
            recent = self._recent(key, now)
            recent.append(now)
            self._refused[key] = recent
            self._refused.move_to_end(key)
            while len(self._refused) > self.MAX_ADDRESSES:
                self._refused.popitem(last=False)

    def _recent(self, key: str, now: float) -> list[float]:
        return [t for t in self._refused.get(key, []) if now - t < self.WINDOW_S]
