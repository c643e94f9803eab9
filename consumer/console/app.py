"""The review console's web application: queues, one item at a time, decisions, a dashboard.

Server-rendered HTML (Starlette routes, Jinja2 templates with autoescaping on for every
template), a stylesheet and a dozen lines of JavaScript for the keyboard shortcuts; no build
step. Every page but the sign-in form needs a reviewer (`consumer.console.identity`); a page
shows one item to one session at a time (`consumer.console.leases`); a decision is on the
decisions topic before the next item shows (`consumer.console.writer`).

Content is data: it reaches the page only through Jinja2's escaping (a review item whose
content is `<script>` or a harmony control string shows as that text), the Content-Security-
Policy allows scripts and styles from the console itself only (nothing inline), and no content,
note or token is ever logged: log lines name review ids and reviewers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumer.config.console import ConsoleSettings
from consumer.console.identity import COOKIE, Identity, Session
from consumer.console.leases import Leases
from consumer.console.queue import author_decided_violations, dashboard, in_queue, policy_view, queues
from consumer.console.writer import DecisionNotRecorded, DecisionWriter
from consumer.events import ReviewDecision, ReviewReason
from consumer.policy import Policy
from consumer.review.state import ReviewState

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 64 * 1024
MAX_NOTE_CHARS = 2000
REASONS = [r.value for r in ReviewReason]
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),  # review content must not linger in a browser's cache
]  # fmt: skip

Handler = Callable[[Request, Session], Awaitable[Response]]


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "unknown"
    seconds = max(0, int(((now or datetime.now(timezone.utc)) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


class ConsoleApp:
    """The ASGI application; its collaborators are injected (the tests pass their own clock)."""

    def __init__(
        self,
        settings: ConsoleSettings,
        state: ReviewState,
        policies: Callable[[], dict[str, Policy]],
        writer: DecisionWriter,
        identity: Identity | None = None,
        leases: Leases | None = None,
        stale: Callable[[], str | None] = lambda: None,
    ):
        self.settings = settings
        self.state = state
        self.policies = policies
        self.writer = writer
        self.identity = identity or Identity(settings)
        self.leases = leases or Leases(settings.lease_s)
        self._stale = stale
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))  # fmt: skip
        self.templates.filters["ago"] = ago
        app = Starlette(routes=[
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self._authenticated(self.logout), methods=["POST"]),
            Route("/", self._authenticated(self.queue_page), methods=["GET"]),
            Route("/next", self._authenticated(self.next_item), methods=["GET"]),
            Route("/item/{review_id}", self._authenticated(self.item_page), methods=["GET"]),
            Route("/item/{review_id}", self._authenticated(self.decide), methods=["POST"]),
            Route("/dashboard", self._authenticated(self.dashboard_page), methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ])  # fmt: skip
        self.asgi: ASGIApp = _SecurityHeaders(app)

    # -- identity ------------------------------------------------------------------------------

    def _authenticated(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self.identity.session(request.cookies, request.headers)
            if session is None:
                return self._refuse(request)
            response = await handler(request, session)
            if request.cookies.get(COOKIE) != session.id:
                self._set_cookie(response, session)
            return response

        return endpoint

    def _refuse(self, request: Request) -> Response:
        wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if self.identity.mode == "tokens":
            return self._render("login.html", None, status=401, next=wanted, problem=None)
        return self._render("refused.html", None, status=401, header=self.settings.header)

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="strict", secure=self.settings.secure_cookie,
                            path="/", max_age=int(self.settings.session_idle_s))  # fmt: skip

    async def login_form(self, request: Request) -> Response:
        if self.identity.mode != "tokens":
            return self._refuse(request)
        return self._render("login.html", None, next=_local(request.query_params.get("next")), problem=None)

    async def login(self, request: Request) -> Response:
        if self.identity.mode != "tokens":
            return self._refuse(request)
        form = await _form(request)
        wanted = _local(_one(form, "next"))
        reviewer = self.identity.reviewer_for_token(_one(form, "token") or "")
        if reviewer is None:
            log.info("review console: a sign-in with an unknown token was refused")
            return self._render("login.html", None, status=401, next=wanted, problem="That token is not known.")
        session = self.identity.open(reviewer)
        log.info("review console: %s signed in", reviewer)
        response = RedirectResponse(wanted, status_code=303)
        self._set_cookie(response, session)
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        form = await _form(request)
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        self.identity.close(session)
        response = RedirectResponse("/login" if self.identity.mode == "tokens" else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def queue_page(self, request: Request, session: Session) -> Response:
        policies = self.policies()
        return self._render("queue.html", session, queues=queues(self.state, policies),
                            leased=self.leases.live(), decisions=self.state.decisions)  # fmt: skip

    async def next_item(self, request: Request, session: Session) -> Response:
        policy_id, reason = _queue_of(request)
        if request.query_params.get("again"):
            session.skipped.clear()
        items = in_queue(self.state, policy_id, reason)
        candidates = [i.review_id for i in items if i.review_id not in session.skipped]
        review_id = self.leases.claim_first(candidates, session.id, session.reviewer_id)
        if review_id is None:
            others = len(self.leases.held_by_others(session.id) & {i.review_id for i in items})
            skipped = sum(1 for i in items if i.review_id in session.skipped)
            return self._render("empty.html", session, policy_id=policy_id, reason=reason, others=others,
                                skipped=skipped, queue=_query(policy_id, reason))  # fmt: skip
        return RedirectResponse(f"/item/{review_id}{_query(policy_id, reason, lead='?')}", status_code=303)

    async def item_page(self, request: Request, session: Session) -> Response:
        review_id = request.path_params["review_id"]
        policy_id, reason = _queue_of(request)
        item = self.state.item(review_id)
        if item is None:
            return self._render("message.html", session, status=404, title="No such review",
                                message="This review is not (or no longer) held by the console.")  # fmt: skip
        applied = self.state.applied(review_id)
        if applied is not None:
            return self._render("message.html", session, status=409, title="Decided already",
                                message=f"This review was decided by {applied.decision.reviewer_id}.",
                                next_url="/next" + _query(policy_id, reason, lead="?"))  # fmt: skip
        if not self.leases.claim(review_id, session.id, session.reviewer_id):
            return self._render("message.html", session, status=409, title="Someone is on it",
                                message="Another reviewer has this item open. It comes back to the queue if "
                                        "they leave it.",
                                next_url="/next" + _query(policy_id, reason, lead="?"))  # fmt: skip
        policy = self.policies().get(item.policy_id)
        view = policy_view(policy, item)
        return self._render(
            "item.html", session, item=item, view=view, queue=_query(policy_id, reason, lead="?"),
            policy_id=policy_id, reason=reason, waiting=len(in_queue(self.state, policy_id, reason)),
            confirmed=author_decided_violations(self.state, item), lease_s=int(self.leases.lease_s),
            problem=None,
        )  # fmt: skip

    async def decide(self, request: Request, session: Session) -> Response:
        review_id = request.path_params["review_id"]
        form = await _form(request)
        policy_id, reason = _one(form, "policy") or None, _one(form, "reason") or None
        back = "/next" + _query(policy_id, reason, lead="?")
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        item = self.state.item(review_id)
        if item is None:
            return self._render("message.html", session, status=404, title="No such review",
                                message="This review is not (or no longer) held by the console.", next_url=back)  # fmt: skip
        if self.state.applied(review_id) is not None:
            self.leases.release(review_id, session.id)
            return self._render("message.html", session, status=409, title="Decided already",
                                message="Someone decided this review while it was open here.", next_url=back)  # fmt: skip
        holder = self.leases.holder(review_id)
        if holder is not None and holder.session_id != session.id:
            return self._render("message.html", session, status=409, title="Someone is on it",
                                message="Your hold on this item ran out and another reviewer has it now. "
                                        "Nothing was recorded.", next_url=back)  # fmt: skip
        verdict = _one(form, "verdict")
        if verdict == "skip":
            self.leases.release(review_id, session.id)
            session.skipped.add(review_id)
            return RedirectResponse(back, status_code=303)
        if verdict not in ("violation", "safe"):
            return self._render("message.html", session, status=400, title="No answer",
                                message="Choose violation, safe or skip.", next_url=f"/item/{review_id}")  # fmt: skip
        policy = self.policies().get(item.policy_id)
        view = policy_view(policy, item)
        violation = verdict == "violation"
        category = _one(form, "category") or None
        if not violation or category not in view.categories:
            category = None
        known_rules = {r.id for r in view.rules}
        rule_ids = [r for r in form.get("rule_id", []) if r in known_rules] if violation else []
        note = (_one(form, "note") or "").strip()[:MAX_NOTE_CHARS] or None
        decision = ReviewDecision(review_id=review_id, violation=violation, category=category, rule_ids=rule_ids,
                                  note=note, reviewer_id=session.reviewer_id,
                                  decided_at=datetime.now(timezone.utc))  # fmt: skip
        try:
            at = await run_in_threadpool(self.writer.write, decision)
        except DecisionNotRecorded as exc:
            log.warning("review console: the decision on %s by %s was not recorded: %s", review_id,
                        session.reviewer_id, exc)  # fmt: skip
            return self._render(
                "item.html", session, status=503, item=item, view=view, queue=_query(policy_id, reason, lead="?"),
                policy_id=policy_id, reason=reason, waiting=len(in_queue(self.state, policy_id, reason)),
                confirmed=author_decided_violations(self.state, item), lease_s=int(self.leases.lease_s),
                problem="The decision was not recorded (the broker did not acknowledge it). Try again.",
            )  # fmt: skip
        # The state learns it now, at the coordinates it landed on: the feed reading it back changes nothing.
        self.state.add_decision(decision, at)
        self.leases.release(review_id, session.id)
        session.decided += 1
        log.info("review console: %s decided %s (%s)", session.reviewer_id, review_id, verdict)
        return RedirectResponse(back, status_code=303)

    async def dashboard_page(self, request: Request, session: Session) -> Response:
        return self._render("dashboard.html", session, board=dashboard(self.state, self.policies()))

    # -- rendering -----------------------------------------------------------------------------

    def _render(self, template: str, session: Session | None, status: int = 200, **context: Any) -> HTMLResponse:
        page = self.templates.get_template(template).render(
            session=session, minutes=int((time.time() - session.started) // 60) if session else 0,
            mode=self.identity.mode, stale=self._stale(), reasons=REASONS, **context,
        )  # fmt: skip
        return HTMLResponse(page, status_code=status)


class _SecurityHeaders:
    """Adds the security headers to every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _form(request: Request) -> dict[str, list[str]]:
    """An url-encoded form (the only kind the console's pages send); a larger body is cut off."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _one(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _local(path: str | None) -> str:
    """Only a path on this console (no open redirect to another site)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def _queue_of(request: Request) -> tuple[str | None, str | None]:
    policy_id = request.query_params.get("policy") or None
    reason = request.query_params.get("reason") or None
    return policy_id, reason if reason in REASONS else None


def _query(policy_id: str | None, reason: str | None, lead: str = "&") -> str:
    params = {k: v for k, v in (("policy", policy_id), ("reason", reason)) if v}
    return (lead + urlencode(params)) if params else ""
