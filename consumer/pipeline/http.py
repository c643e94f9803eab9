"""The HTTP side door: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.

- `/healthz`: 200 while the process is alive and its event loop responsive (the pipeline's
  heartbeat is recent); 503 otherwise, so a wedged consumer is restarted.
- `/readyz`: 200 once the consumer has joined its group with partitions assigned and the
  classifier is started; 503 with the reason before that.
- `/metrics`: the OpenTelemetry metrics in the Prometheus text format.

Served from a daemon thread with the standard library's threading HTTP server: a scrape or
a probe never waits for the event loop.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from consumer.errors import Fatal

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class PortInUse(Fatal):
    """`telemetry.http_port` is taken (another consumer on this host?): a configuration error."""


class HttpServer:
    def __init__(self, host: str, port: int, registry: Any, alive: Check, ready: Check):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _status(alive()),
            "/readyz": lambda: _status(ready()),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                route = routes.get(self.path.split("?", 1)[0])
                code, content_type, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes are not news
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"telemetry.http_port: port {port} on {host} is already in use (another consumer on this "
                "host?); choose another port, 0 for any free one, or null to serve no metrics",
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on port %d", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _status(check: tuple[bool, str]) -> tuple[int, str, bytes]:
    ok, reason = check
    return (200 if ok else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
