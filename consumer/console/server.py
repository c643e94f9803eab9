"""`safeguard-consumer review console`: the review state, the decision writer and the web server
in one process."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from consumer.config import Settings
from consumer.console.app import ConsoleApp
from consumer.console.feed import ReviewFeed
from consumer.console.identity import Identity
from consumer.console.writer import DecisionWriter
from consumer.kafka.client_logs import client_options
from consumer.policy import Policy, PolicyStore
from consumer.review.state import ReviewState

log = logging.getLogger(__name__)


class ConsoleError(Exception):
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
        self.feed = ReviewFeed(client, settings.review.topic, settings.review.decisions_topic, self.state)
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
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def _policies(self) -> dict[str, Policy]:
        # Edited policies show without a restart (a stat of the directory at most every reload interval).
        if time.monotonic() - self._reloaded > self.settings.policies.reload_interval_s:
            self._reloaded = time.monotonic()
            self._store.reload()
        return self._store.get()

    @property
    def port(self) -> int:
        assert self._socket is not None
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.settings.review.console.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def start(self, timeout_s: float = 120.0) -> None:
        self.feed.start(timeout_s)
        console = self.settings.review.console
        family = socket.AF_INET6 if ":" in console.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((console.host, console.port))
        except OSError as exc:
            raise ConsoleError(f"review.console.port: cannot serve on {console.host}:{console.port} "
                               f"({exc.strerror}); choose another port, or 0 for any free one") from None  # fmt: skip
        config = uvicorn.Config(self.app.asgi, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=5)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="console-http", daemon=True)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConsoleError(f"the console's web server did not start on {console.host}:{console.port}")
            time.sleep(0.05)
        log.info("review console on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self._socket is not None:
            self._socket.close()
        self.feed.stop()
        self.writer.close()
