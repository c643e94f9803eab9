"""Who is reviewing: configured reviewers with tokens, or a header set by the company's proxy.

`Identity` owns "no page answers without a reviewer, and every decision names its reviewer":
the app asks it for the session of every request except the sign-in form and the stylesheet,
and refuses the request (401) when there is none.

- `identity: tokens`: a reviewer signs in with their token (`review.console.reviewers`), once
  per browser; the console keeps the session in memory and gives the browser a random session
  id in an HttpOnly, SameSite=Strict cookie. Tokens are compared in constant time and never
  logged. A restart signs everyone out.
- `identity: header`: a proxy in front (oauth2-proxy, an identity-aware proxy) authenticates
  people and sets `review.console.header` to their name on every request; the console trusts
  it, so it must be reachable only through that proxy (it listens on 127.0.0.1 by default).
  With `reviewers` set, only those names are accepted.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from consumer.config.console import ConsoleSettings

COOKIE = "safeguard_console"


@dataclass
class Session:
    id: str
    reviewer_id: str
    csrf: str
    started: float
    last_seen: float
    decided: int = 0
    skipped: set[str] = field(default_factory=set)

    def form_token_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Identity:
    """Thread-safe; `clock` is wall seconds (injected by the tests)."""

    def __init__(self, settings: ConsoleSettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.mode = settings.identity
        self._tokens = [(r.token.get_secret_value().encode(), r.id) for r in settings.reviewers]
        self._names = {r.id for r in settings.reviewers}
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def check(self) -> str | None:
        """Why the console cannot start with these settings, or None."""
        if self.mode == "tokens" and not self._tokens:
            return "review.console.identity is tokens but review.console.reviewers is empty: nobody could sign in"
        if self.mode == "header" and not self.settings.header.strip():
            return "review.console.header is empty"
        return None

    def reviewer_for_token(self, token: str) -> str | None:
        given = token.strip().encode()
        found = None
        for known, reviewer in self._tokens:  # every token compared: the time says nothing about which matched
            if hmac.compare_digest(given, known):
                found = reviewer
        return found

    def session(self, cookies: Mapping[str, str], headers: Mapping[str, str]) -> Session | None:
        """The reviewer's session for a request, or None: refuse it."""
        now = self._clock()
        session = self._get(cookies.get(COOKIE), now)
        if self.mode == "tokens":
            return session
        name = (headers.get(self.settings.header) or "").strip()
        if not name or (self._names and name not in self._names):
            return None
        if session is not None and session.reviewer_id == name:
            return session
        return self.open(name)  # the proxy's person changed, or a first visit: a session of their own

    def open(self, reviewer_id: str) -> Session:
        now = self._clock()
        session = Session(secrets.token_urlsafe(24), reviewer_id, secrets.token_urlsafe(24), now, now)
        with self._lock:
            self._sessions[session.id] = session
            idle = self.settings.session_idle_s
            for sid in [sid for sid, s in self._sessions.items() if now - s.last_seen > idle]:
                del self._sessions[sid]
        return session

    def close(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)

    def _get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.last_seen > self.settings.session_idle_s:
                del self._sessions[session_id]
                return None
            session.last_seen = now
            return session
