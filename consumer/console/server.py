"""`safeguard-consumer review console`: the review state, the decision writer and the web server
in one process."""

from __future__ import annotations

import logging
import time

from consumer.config import Settings
from consumer.console.app import ConsoleApp
from consumer.console.feed import ReviewFeed
from consumer.console.identity import Identity
from consumer.console.writer import DecisionWriter
from consumer.errors import Fatal
from consumer.kafka.client_logs import client_options
from consumer.policy import Policy, PolicyStore
from consumer.review.state import ReviewState
from consumer.review.web import WebServer

log = logging.getLogger(__name__)


class ConsoleError(Fatal):
    """The console cannot start with these settings."""


class ReviewConsole:
    """Reads the review topics into a `ReviewState` (a bounded read at start, then follows them),
    and serves the console on `review.console.host`:`port` until `stop()`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        console = settings.review.console
        self.identity = Identity(console)
        problem = self.identity.check()
        if problem:
            raise ConsoleError(problem)
        kafka = settings.kafka
        client = kafka.consumer_options | {"bootstrap.servers": kafka.bootstrap_servers, **client_options("console")}
        self.state = ReviewState(settings.review.max_items)
        self.feed = ReviewFeed(client, settings.review.topic, settings.review.decisions_topic, self.state,
                               console.replica, console.replicas)  # fmt: skip
        self.writer = DecisionWriter(kafka.producer_options | {"bootstrap.servers": kafka.bootstrap_servers,
                                                               **client_options("console")},
                                     settings.review.decisions_topic)  # fmt: skip
        try:
            self._store = PolicyStore(settings.policies.directory, settings.policies.max_tokens)
        except ValueError as exc:
            raise ConsoleError(str(exc)) from None
        self._reloaded = time.monotonic()
        self.app = ConsoleApp(console, self.state, self._policies, self.writer, identity=self.identity,
                              stale=lambda: self.feed.failed)  # fmt: skip
        self._server: WebServer | None = None

    def _policies(self) -> dict[str, Policy]:
        # Edited policies show without a restart (a stat of the directory at most every reload interval).
        if time.monotonic() - self._reloaded > self.settings.policies.reload_interval_s:
            self._reloaded = time.monotonic()
            self._store.reload()
        return self._store.get()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def start(self, timeout_s: float = 120.0) -> None:
        self.feed.start(timeout_s)
        console = self.settings.review.console
        try:
            self._server = WebServer(self.app.asgi, console.host, console.port, console.read_timeout_s, "console-http")
            self._server.start()
        except OSError as exc:
            raise ConsoleError(f"review.console.port: cannot serve on {console.host}:{console.port} "
                               f"({exc.strerror or exc}); choose another port, or 0 for any free one") from None  # fmt: skip
        log.info("review console on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self.feed.stop()
        self.writer.close()
