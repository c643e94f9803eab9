"""The web servers the review side runs (the console, the Coop bridge's webhook): uvicorn with h11
in a thread of the calling process, and the limits every request meets.

`WebServer` owns "no request holds the server forever": a request's headers must arrive within
`read_timeout_s` of the connection opening (or of the previous response), else the connection is
closed; header blocks are bounded by h11 (`MAX_HEADER_BYTES`); the body is read with `read_body`,
which refuses a missing, malformed, negative or oversized `Content-Length` before reading a byte
and gives up on a body that has not arrived within the same timeout. The server is asyncio: a
stalled client costs a socket and a timer, not a thread. An aborted request is one log line at
most (uvicorn's access and error logs stay off; the app logs what it refuses).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from consumer.errors import ConsumerError

MAX_HEADER_BYTES = 16 * 1024


class BodyRefused(ConsumerError):
    """A request body not read: `status` is the HTTP answer (400, 408, 411, 413). The request is
    refused whole and answered; nothing of it is kept (neither a record nor a fault)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, or BodyRefused: its length must be declared (411), a non-negative integer
    (400) at most `limit` (413), and it must arrive within `timeout_s` (408) and whole (400)."""
    declared = request.headers.getlist("content-length")
    if not declared:
        raise BodyRefused(411, "Content-Length is required")
    if len(declared) > 1 or not declared[0].strip().isdigit():
        raise BodyRefused(400, "Content-Length is not a non-negative integer")
    length = int(declared[0])
    if length > limit:
        raise BodyRefused(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefused(408, f"the body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:  # an aborted request: one line from the caller, no traceback
        raise BodyRefused(400, "the client closed the connection before the whole body arrived") from None
    return b"".join(chunks)


def _deadline_protocol(read_timeout_s: float) -> type[H11Protocol]:
    class HeaderDeadline(H11Protocol):
        """uvicorn times out idle keep-alive connections but not a request whose headers stall
        half-sent: this closes a connection whose next request's headers have not all arrived
        within `read_timeout_s`."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_deadline()

        def _arm_deadline(self) -> None:
            waiting_after = self.cycle  # a new cycle starts once the next request's headers are in
            self.loop.call_later(read_timeout_s, self._deadline_passed, waiting_after)

        def _deadline_passed(self, waiting_after: Any) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


class WebServer:
    """`app` served on `host`:`port` (0: any free port) until `stop()`."""

    def __init__(self, app: ASGIApp, host: str, port: int, read_timeout_s: float, name: str):
        self.host = host
        self._name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        config = uvicorn.Config(
            app, http=_deadline_protocol(read_timeout_s), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            log_config=None, access_log=False, lifespan="off", server_header=False, timeout_graceful_shutdown=5,
            proxy_headers=False,  # the client address is the peer's: the identity check trusts proxies by it
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name=name,
                                        daemon=True)  # fmt: skip

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}/"

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the {self._name} web server did not start on {self.host}:{self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(15)
        self._socket.close()
