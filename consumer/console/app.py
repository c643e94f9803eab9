"""The review console's web application: queues, one item at a time, decisions, a dashboard.

Server-rendered HTML (Starlette routes, Jinja2 templates with autoescaping on for every
template), a stylesheet and a dozen lines of JavaScript for the keyboard shortcuts; no build
step. Every page but the sign-in form needs a reviewer (`consumer.console.identity`); a page
shows one item to one session at a time (`consumer.console.leases`); a decision is on the
decisions topic before the next item shows (`consumer.console.writer`).

Content is data: it reaches the page only through Jinja2's escaping (a review item whose
content is `<script>` or a harmony control string shows as that text; a bidirectional control
character such as U+202E shows as the text `[U+202E]` instead of reordering the text around it),
the Content-Security-Policy allows scripts and styles from the console itself only (nothing
inline), and no content, note or token is ever logged: log lines name review ids and reviewers.

Requests another site could make the browser send change nothing: every form carries a token
(the sign-in form a pre-session one, checked against a SameSite cookie, and its Origin when the
browser sends one); an item is taken (leased) only by a POST from its page or by `/next` when
the browser says the reviewer navigated there (`Sec-Fetch-Site`/`Sec-Fetch-Dest`), never by an
image or frame. A decision needs the item's lease, and the check that nobody decided it is
atomic with the write (`Leases.begin_decision`).

Roles (`consumer.console.roles`) are checked on every route before anything is read: an analyst
gets the dashboard and the audit trail and nothing is leased to them; a moderator takes items from
the queues and the appeals queue, decides (uphold or overturn, on an appeal), escalates to a lead
with a reason and leaves comments; a lead also works the lead queue (escalated items, which leave
the moderators' queues) and overturns decided items with a reason; an admin may do everything.
Escalations and comments are records on the decisions topic (`ReviewNote`), shown on the item to
whoever opens it next.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumer.config.console import ConsoleSettings
from consumer.console.health import read_policy_health
from consumer.console.identity import COOKIE, Identity, Session, SignInLimiter
from consumer.console.leases import Leases
from consumer.console.roles import Can, allows
from consumer.console.queue import author_decided_violations, dashboard, in_queue, policy_view, queues
from consumer.console.writer import DecisionNotRecorded, DecisionWriter
from consumer.events import ReviewDecision, ReviewItem, ReviewNote, ReviewReason
from consumer.policy import Policy
from consumer.review.audit import audit_rows, render
from consumer.review.state import ReviewState
from consumer.review.web import BodyRefused, read_body

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 64 * 1024
MAX_NOTE_CHARS = 2000
NOT_RECORDED = "It was not recorded (the broker did not acknowledge it). Try again."
AUDIT_PAGE_ROWS = 500  # the page shows the newest; the downloads hold every row
LOGIN_COOKIE = "safeguard_console_login"  # the sign-in form's token, before there is a session
# Characters that reorder the text around them (Unicode's Bidi_Control): shown, never obeyed.
BIDI_MARKS = {c: f"[U+{c:04X}]" for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
REASONS = [r.value for r in ReviewReason]
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer a browser sends `Origin: null` even on the console's own
    # forms, and the sign-in's Origin check needs the real one; other sites still get no Referer.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),  # review content must not linger in a browser's cache
]  # fmt: skip

Handler = Callable[[Request, Session], Awaitable[Response]]


def visible_controls(value: Any) -> Any:
    """Every value a template prints: bidirectional controls as the text `[U+202E]` (plain text, so
    it is as safe in an attribute as in a paragraph; autoescaping then applies as to any text)."""
    if not isinstance(value, str) or isinstance(value, Markup):
        return value
    return value.translate(BIDI_MARKS)


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
        self.sign_ins = SignInLimiter(settings.sign_in_attempts_per_minute)
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), finalize=visible_controls,
                                     autoescape=select_autoescape(default=True, default_for_string=True))  # fmt: skip
        self.templates.filters["ago"] = ago
        app = Starlette(routes=[
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self._authenticated(self.logout), methods=["POST"]),
            Route("/", self._authenticated(self.queue_page), methods=["GET"]),
            Route("/next", self._authenticated(self.next_item, Can.DECIDE), methods=["GET"]),
            # `:path`: a review id is the producer's string and may hold a `/`.
            Route("/item/{review_id:path}", self._authenticated(self.item_page, Can.DECIDE), methods=["GET"]),
            Route("/item/{review_id:path}", self._authenticated(self.decide, Can.DECIDE), methods=["POST"]),
            Route("/open/{review_id:path}", self._authenticated(self.open_item, Can.DECIDE), methods=["POST"]),
            Route("/escalate/{review_id:path}", self._authenticated(self.escalate, Can.DECIDE), methods=["POST"]),
            Route("/comment/{review_id:path}", self._authenticated(self.comment, Can.DECIDE), methods=["POST"]),
            Route("/overturn/{review_id:path}", self._authenticated(self.overturn, Can.LEAD), methods=["POST"]),
            Route("/dashboard", self._authenticated(self.dashboard_page), methods=["GET"]),
            Route("/audit", self._authenticated(self.audit_page, Can.AUDIT), methods=["GET"]),
            Route("/audit.csv", self._authenticated(self.audit_csv, Can.AUDIT), methods=["GET"]),
            Route("/audit.jsonl", self._authenticated(self.audit_jsonl, Can.AUDIT), methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ], exception_handlers={BodyRefused: self._body_refused})  # fmt: skip
        self.asgi: ASGIApp = _SecurityHeaders(app)

    # -- identity ------------------------------------------------------------------------------

    def _authenticated(self, handler: Handler, need: Can | None = None) -> Callable[[Request], Awaitable[Response]]:
        """`need`: what the session's role must allow; checked before the handler reads anything."""

        async def endpoint(request: Request) -> Response:
            session = self.identity.session(request.cookies, request.headers.getlist(self.settings.header),
                                            _client(request))  # fmt: skip
            if session is None:
                return self._refuse(request)
            if need is not None and not allows(session.role, need):
                log.info("review console: %s (%s) was refused %s %s", session.reviewer_id, session.role,
                         request.method, request.url.path)  # fmt: skip
                response = self._not_for_role(session)
            else:
                response = await handler(request, session)
            if not session.closed:  # every answer renews the cookie: it lives as long as the sliding session
                self._set_cookie(response, session)
            return response

        return endpoint

    def _refuse(self, request: Request) -> Response:
        wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if self.identity.mode == "tokens":
            return self._login_page(401, wanted, None)
        return self._render("refused.html", None, status=401, header=self.settings.header)

    def _login_page(self, status: int, wanted: str, problem: str | None) -> Response:
        form_token = secrets.token_urlsafe(24)
        response = self._render("login.html", None, status=status, next=wanted, problem=problem, form_token=form_token)
        response.set_cookie(LOGIN_COOKIE, form_token, httponly=True, samesite="strict",
                            secure=self.settings.secure_cookie, path="/", max_age=3600)  # fmt: skip
        return response

    async def _body_refused(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BodyRefused)
        log.info("review console: a request from %s was refused: %s", _client(request), exc)
        return Response(str(exc), status_code=exc.status, media_type="text/plain")

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="strict", secure=self.settings.secure_cookie,
                            path="/", max_age=int(self.settings.session_idle_s))  # fmt: skip

    async def login_form(self, request: Request) -> Response:
        if self.identity.mode != "tokens":
            return self._refuse(request)
        return self._login_page(200, _local(request.query_params.get("next")), None)

    async def login(self, request: Request) -> Response:
        if self.identity.mode != "tokens":
            return self._refuse(request)
        client = _client(request)
        form = await self._form(request)
        wanted = _local(_one(form, "next"))
        expected, given = request.cookies.get(LOGIN_COOKIE), _one(form, "form_token")
        if (not _same_origin(request) or not expected or not given
                or not hmac.compare_digest(expected.encode(), given.encode())):  # fmt: skip
            log.info("review console: a sign-in from %s without this console's form was refused", client)
            return self._login_page(403, wanted, "This form was not sent from this console. Sign in here.")
        if not self.sign_ins.allowed(client):
            log.warning("review console: sign-ins from %s refused: too many unknown tokens in the last minute", client)
            return self._login_page(429, wanted, "Too many attempts. Wait a minute.")
        reviewer = self.identity.reviewer_for_token(_one(form, "token"))
        if reviewer is None:
            self.sign_ins.refused(client)
            log.info("review console: a sign-in from %s with an unknown token was refused", client)
            return self._login_page(401, wanted, "That token is not known.")
        session = self.identity.open(reviewer)
        log.info("review console: %s signed in", reviewer)
        response = RedirectResponse(wanted, status_code=303)
        self._set_cookie(response, session)
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        form = await self._form(request)
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        self.identity.close(session)
        response = RedirectResponse("/login" if self.identity.mode == "tokens" else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def queue_page(self, request: Request, session: Session) -> Response:
        if not allows(session.role, Can.DECIDE):  # an analyst reviews nothing: their front page is the dashboard
            return RedirectResponse("/dashboard", status_code=303)
        policies = self.policies()
        found = queues(self.state, policies)
        lead = queues(self.state, policies, escalated=True) if allows(session.role, Can.LEAD) else []
        return self._render("queue.html", session, queues=[q for q in found if q.reason != ReviewReason.APPEAL.value],
                            appeals=[q for q in found if q.reason == ReviewReason.APPEAL.value], lead=lead,
                            leased=self.leases.live(), decisions=self.state.decisions)  # fmt: skip

    async def next_item(self, request: Request, session: Session) -> Response:
        policy_id, reason = _queue_of(request)
        if not _navigated(request):
            return self._render("message.html", session, status=403, title="Refused",
                                message="Items are handed out to pages opened in this console only.")  # fmt: skip
        escalated = request.query_params.get("lane") == "lead"
        if escalated and not allows(session.role, Can.LEAD):
            return self._not_for_role(session)
        if request.query_params.get("again"):
            session.skipped.clear()
        items = in_queue(self.state, policy_id, reason, escalated)
        candidates = [i.review_id for i in items if i.review_id not in session.skipped]
        review_id = self.leases.claim_first(candidates, session.id, session.reviewer_id)
        if review_id is None:
            others = len(self.leases.held_by_others(session.id) & {i.review_id for i in items})
            skipped = sum(1 for i in items if i.review_id in session.skipped)
            return self._render("empty.html", session, policy_id=policy_id, reason=reason, others=others,
                                skipped=skipped, queue=_query(policy_id, reason))  # fmt: skip
        return RedirectResponse(_item_url(review_id, policy_id, reason), status_code=303)

    async def item_page(self, request: Request, session: Session) -> Response:
        review_id = request.path_params["review_id"]
        policy_id, reason = _queue_of(request)
        item = self.state.item(review_id)
        if item is None:
            return self._render("message.html", session, status=404, title="No such review",
                                message="This review is not (or no longer) held by the console.")  # fmt: skip
        applied = self.state.applied(review_id)
        if applied is not None:
            if allows(session.role, Can.LEAD):  # a lead may overturn it
                return self._decided_page(session, item)
            return self._render("message.html", session, status=409, title="Decided already",
                                message=f"This review was decided by {applied.decision.reviewer_id}.",
                                next_url="/next" + _query(policy_id, reason, lead="?"))  # fmt: skip
        if (away := self._escalated_away(session, review_id)) is not None:
            return away
        holder = self.leases.holder(review_id)
        if holder is not None and holder.session_id != session.id:
            return self._render("message.html", session, status=409, title="Someone is on it",
                                message="Another reviewer has this item open. It comes back to the queue if "
                                        "they leave it.",
                                next_url="/next" + _query(policy_id, reason, lead="?"))  # fmt: skip
        if holder is None:  # a GET takes nothing (an image or a link from elsewhere could send it): ask
            return self._render("open.html", session, item=item, queue=_query(policy_id, reason, lead="?"),
                                policy_id=policy_id, reason=reason)  # fmt: skip
        self.leases.claim(review_id, session.id, session.reviewer_id)  # looking again renews this session's hold
        return self._item_page(session, item, policy_id, reason)

    def _item_page(self, session: Session, item: ReviewItem, policy_id: str | None, reason: str | None,
                   status: int = 200, problem: str | None = None) -> Response:  # fmt: skip
        escalated = self.state.escalation(item.review_id) is not None
        return self._render(
            "item.html", session, status=status, item=item, view=policy_view(self.policies().get(item.policy_key), item),
            queue=_query(policy_id, reason, lead="?"), policy_id=policy_id, reason=reason,
            waiting=len(in_queue(self.state, policy_id, reason, escalated)), escalated=escalated,
            notes=self.state.notes(item.review_id), confirmed=author_decided_violations(self.state, item),
            lease_s=int(self.leases.lease_s), problem=problem,
        )  # fmt: skip

    def _decided_page(self, session: Session, item: ReviewItem, status: int = 200,
                      problem: str | None = None) -> Response:  # fmt: skip
        """A decided item as a lead sees it: what people did on it, and the overturn form."""
        standing = self.state.standing(item.review_id)
        assert standing is not None
        return self._render("decided.html", session, status=status, item=item, standing=standing.decision,
                            standing_at=_where(standing.at), history=self.state.actions(item.review_id),
                            problem=problem,
                            view=policy_view(self.policies().get(item.policy_key), item))  # fmt: skip

    def _escalated_away(self, session: Session, review_id: str) -> Response | None:
        """An escalated item is for leads (and admins) only."""
        if self.state.escalation(review_id) is None or allows(session.role, Can.LEAD):
            return None
        return self._render("message.html", session, status=403, title="Escalated",
                            message="This item was escalated to a lead.", next_url="/next")  # fmt: skip

    def _not_for_role(self, session: Session) -> Response:
        return self._render("message.html", session, status=403, title="Not for your role",
                            message=f"A {session.role} cannot do this here.")  # fmt: skip

    async def open_item(self, request: Request, session: Session) -> Response:
        """Take the lease on one item, from the page that asked (a POST with the session's form token)."""
        review_id = request.path_params["review_id"]
        form = await self._form(request)
        policy_id, reason = _one(form, "policy") or None, _one(form, "reason") or None
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        if (away := self._escalated_away(session, review_id)) is not None:
            return away
        if self.state.item(review_id) is not None and not self.leases.claim(review_id, session.id, session.reviewer_id):
            return self._render("message.html", session, status=409, title="Someone is on it",
                                message="Another reviewer has this item open. It comes back to the queue if "
                                        "they leave it.",
                                next_url="/next" + _query(policy_id, reason, lead="?"))  # fmt: skip
        return RedirectResponse(_item_url(review_id, policy_id, reason), status_code=303)

    async def decide(self, request: Request, session: Session) -> Response:
        review_id = request.path_params["review_id"]
        form = await self._form(request)
        policy_id, reason = _one(form, "policy") or None, _one(form, "reason") or None
        back = "/next" + _query(policy_id, reason, lead="?")
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        item = self.state.item(review_id)
        if item is None:
            return self._render("message.html", session, status=404, title="No such review",
                                message="This review is not (or no longer) held by the console.", next_url=back)  # fmt: skip
        if (away := self._escalated_away(session, review_id)) is not None:
            return away
        if self.state.escalation(review_id) is not None:
            back = "/next?lane=lead"
        verdict = _one(form, "verdict")
        if verdict not in ("violation", "safe", "skip"):
            return self._render("message.html", session, status=400, title="No answer",
                                message="Choose violation, safe or skip.", next_url=_item_url(review_id, None, None))  # fmt: skip
        if verdict == "skip":
            self.leases.release(review_id, session.id)
            session.skipped.add(review_id)
            return RedirectResponse(back, status_code=303)
        # From here until `end_decision` this session alone may write a decision on the review.
        refused = self.leases.begin_decision(review_id, session.id, lambda: self.state.applied(review_id) is not None)
        if refused == "decided":
            self.leases.release(review_id, session.id)
            return self._render("message.html", session, status=409, title="Decided already",
                                message="Someone decided this review while it was open here. Nothing was recorded.",
                                next_url=back)  # fmt: skip
        if refused == "not held":
            return self._render("message.html", session, status=409, title="Not yours",
                                message="This item is not held for you (your hold ran out, or another reviewer "
                                        "has it). Nothing was recorded.", next_url=back)  # fmt: skip
        try:
            return await self._record(session, item, form, verdict, policy_id, reason, back)
        finally:
            self.leases.end_decision(review_id)

    async def _record(self, session: Session, item: ReviewItem, form: dict[str, list[str]], verdict: str,
                      policy_id: str | None, reason: str | None, back: str) -> Response:  # fmt: skip
        review_id = item.review_id
        policy = self.policies().get(item.policy_key)
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
            return self._item_page(session, item, policy_id, reason, status=503, problem=NOT_RECORDED)
        # The state learns it now, at the coordinates it landed on: the feed reading it back changes nothing.
        self.state.add_decision(decision, at)
        self.leases.release(review_id, session.id)
        session.decided += 1
        log.info("review console: %s decided %s (%s)", session.reviewer_id, review_id, verdict)
        return RedirectResponse(back, status_code=303)

    async def escalate(self, request: Request, session: Session) -> Response:
        """Hand the item to the lead queue, with a reason; it leaves the moderators' queues."""
        return await self._note(request, session, "escalation")

    async def comment(self, request: Request, session: Session) -> Response:
        """An internal comment on the item, shown to whoever opens it next; the item stays with this session."""
        return await self._note(request, session, "comment")

    async def _note(self, request: Request, session: Session, kind: Literal["escalation", "comment"]) -> Response:
        review_id = request.path_params["review_id"]
        form = await self._form(request)
        policy_id, reason = _one(form, "policy") or None, _one(form, "reason") or None
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        item = self.state.item(review_id)
        if item is None or self.state.applied(review_id) is not None:
            return self._render("message.html", session, status=409, title="Not open",
                                message="This review is decided or no longer held. Nothing was recorded.",
                                next_url="/next")  # fmt: skip
        if (away := self._escalated_away(session, review_id)) is not None:
            return away
        if kind == "escalation" and self.state.escalation(review_id) is not None:
            return self._render("message.html", session, status=409, title="Escalated already",
                                message="This item waits in the lead queue already.", next_url="/next")  # fmt: skip
        holder = self.leases.holder(review_id)
        if holder is None or holder.session_id != session.id:
            return self._render("message.html", session, status=409, title="Not yours",
                                message="This item is not held for you. Nothing was recorded.",
                                next_url="/next")  # fmt: skip
        text = (_one(form, "text") or "").strip()[:MAX_NOTE_CHARS]
        if not text:
            empty = "Say why you escalate it." if kind == "escalation" else "The comment is empty."
            return self._item_page(session, item, policy_id, reason, status=400, problem=empty)
        note = ReviewNote(kind=kind, review_id=review_id, text=text, reviewer_id=session.reviewer_id,
                          written_at=datetime.now(timezone.utc))  # fmt: skip
        try:
            at = await run_in_threadpool(self.writer.write, note)
        except DecisionNotRecorded as exc:
            log.warning("review console: the %s on %s by %s was not recorded: %s", kind, review_id,
                        session.reviewer_id, exc)  # fmt: skip
            return self._item_page(session, item, policy_id, reason, status=503, problem=NOT_RECORDED)
        self.state.add_note(note, at)
        log.info("review console: %s wrote a %s on %s", session.reviewer_id, kind, review_id)
        if kind == "escalation":  # off this moderator's desk: the next item
            self.leases.release(review_id, session.id)
            return RedirectResponse("/next" + _query(policy_id, reason, lead="?"), status_code=303)
        return RedirectResponse(_item_url(review_id, policy_id, reason), status_code=303)

    async def overturn(self, request: Request, session: Session) -> Response:
        """A lead replaces the answer in force on a decided item, with a reason."""
        review_id = request.path_params["review_id"]
        form = await self._form(request)
        if not session.form_token_ok(_one(form, "csrf")):
            return self._render("message.html", session, status=403, title="Refused",
                                message="This form was not sent from this console.")  # fmt: skip
        item, standing = self.state.item(review_id), self.state.standing(review_id)
        if item is None or standing is None:
            return self._render("message.html", session, status=409, title="Not decided",
                                message="Only a decided review held by the console can be overturned. "
                                        "Nothing was recorded.")  # fmt: skip
        verdict = _one(form, "verdict")
        note = (_one(form, "note") or "").strip()[:MAX_NOTE_CHARS]
        view = policy_view(self.policies().get(item.policy_key), item)
        violation = verdict == "violation"
        category = _one(form, "category") or None
        if not violation or category not in view.categories:
            category = None
        if verdict not in ("violation", "safe") or not note:
            return self._decided_page(session, item, 400, "Choose violation or safe and say why.")
        if (violation, category) == (standing.decision.violation, standing.decision.category):
            return self._decided_page(session, item, 400, "That is the answer in force already.")
        seen = _one(form, "standing")

        def changed() -> bool:
            now = self.state.standing(review_id)
            return now is None or _where(now.at) != seen

        refused = self.leases.begin_overturn(review_id, changed)
        if refused:
            return self._decided_page(session, item, 409, "The answer changed while this page was open. "
                                                           "Nothing was recorded: look again.")  # fmt: skip
        try:
            overturn = ReviewDecision(kind="overturn", review_id=review_id, violation=violation, category=category,
                                      note=note, reviewer_id=session.reviewer_id,
                                      decided_at=datetime.now(timezone.utc))  # fmt: skip
            try:
                at = await run_in_threadpool(self.writer.write, overturn)
            except DecisionNotRecorded as exc:
                log.warning("review console: the overturn of %s by %s was not recorded: %s", review_id,
                            session.reviewer_id, exc)  # fmt: skip
                return self._decided_page(session, item, 503, NOT_RECORDED)
            self.state.add_decision(overturn, at)
        finally:
            self.leases.end_decision(review_id)
        log.info("review console: %s overturned %s", session.reviewer_id, review_id)
        return RedirectResponse(_item_url(review_id, None, None), status_code=303)

    async def audit_page(self, request: Request, session: Session) -> Response:
        rows = audit_rows(self.state)
        return self._render("audit.html", session, rows=rows[::-1][:AUDIT_PAGE_ROWS], total=len(rows),
                            lead=allows(session.role, Can.LEAD))  # fmt: skip

    async def audit_csv(self, request: Request, session: Session) -> Response:
        return self._audit_download("csv", "text/csv; charset=utf-8")

    async def audit_jsonl(self, request: Request, session: Session) -> Response:
        return self._audit_download("jsonl", "application/x-ndjson")

    def _audit_download(self, fmt: Literal["csv", "jsonl"], media_type: str) -> Response:
        body = b"".join(render(audit_rows(self.state), fmt))
        return Response(body, media_type=media_type,
                        headers={"content-disposition": f'attachment; filename="review-audit.{fmt}"'})  # fmt: skip

    async def dashboard_page(self, request: Request, session: Session) -> Response:
        health, unhealthy = [], None
        if self.settings.metrics_url:
            health, unhealthy = await run_in_threadpool(read_policy_health, self.settings.metrics_url)
        return self._render("dashboard.html", session, board=dashboard(self.state, self.policies()),
                            health=health, unhealthy=unhealthy, panel=self.settings.metrics_url is not None)  # fmt: skip

    async def _form(self, request: Request) -> dict[str, list[str]]:
        """An url-encoded form (the only kind the console's pages send); BodyRefused when it is not
        declared, too large or too slow."""
        body = await read_body(request, MAX_FORM_BYTES, self.settings.read_timeout_s)
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)

    # -- rendering -----------------------------------------------------------------------------

    def _render(self, template: str, session: Session | None, status: int = 200, **context: Any) -> HTMLResponse:
        page = self.templates.get_template(template).render(
            session=session, minutes=int((time.time() - session.started) // 60) if session else 0,
            mode=self.identity.mode, stale=self._stale(), reasons=REASONS,
            can=lambda what: session is not None and allows(session.role, Can(what)), **context,
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


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _same_origin(request: Request) -> bool:
    """No Origin (an older browser; the form token still holds), or this console's own host ("null",
    what a browser sends from another origin under the same-origin referrer policy, is not)."""
    origin = request.headers.get("origin")
    return origin is None or (origin != "null" and urlsplit(origin).netloc == request.headers.get("host"))


def _navigated(request: Request) -> bool:
    """The browser says a person opened this page in this console (or typed or bookmarked it):
    not an image, a frame or a page of another origin. Clients that send no Fetch Metadata pass."""
    site, dest = request.headers.get("sec-fetch-site"), request.headers.get("sec-fetch-dest")
    return site in (None, "same-origin", "none") and dest in (None, "document")


def _where(at: tuple[str, int, int]) -> str:
    """A decisions-topic record's coordinates as a form field: which answer a lead saw."""
    return f"{at[0]}:{at[1]}:{at[2]}"


def _item_url(review_id: str, policy_id: str | None, reason: str | None) -> str:
    return f"/item/{quote(review_id, safe='')}{_query(policy_id, reason, lead='?')}"


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
