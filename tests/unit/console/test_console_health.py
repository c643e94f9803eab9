"""The dashboard's policy health panel over real HTTP: the consumer's drift series as its telemetry
exports them (the real Prometheus exposition), served by a real HTTP server, read by the console
when an analyst opens the dashboard."""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import generate_latest

from consumer import stages
from consumer.config.console import ConsoleSettings
from consumer.pipeline.telemetry import Telemetry
from consumer.pipeline.telemetry.metrics import prometheus_meter_provider
from tests.unit.console.test_console import item
from tests.unit.console.test_console_http import Served
from tests.unit.console.test_console_roles import TEAM


@pytest.fixture
def consumer_metrics():
    """A consumer's /metrics: its telemetry with counted results, on a real port."""
    provider, registry = prometheus_meter_provider()
    telemetry = Telemetry.create("group", provider, registry=registry)
    gaming = telemetry.communities.count("gaming", now=0)
    counts = {(True, stages.LEXICAL): 6, (False, stages.LEXICAL): 10, (True, stages.UNDECIDED): 4}
    for (violation, stage), n in counts.items():
        telemetry.verdicts[("chat-harassment", violation, "delete" if violation else "allow", "v1", stage, gaming)] += n
    telemetry.verdicts[("spam-scams", False, "allow", "v7", stages.CACHE, gaming)] += 5
    telemetry.dead_letters[("unparseable_output", "chat-harassment", "v1", gaming)] += 2
    telemetry.dead_letters[("invalid_json", "", "", gaming)] += 9  # reached no policy

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def dashboard(metrics_url: str | None) -> str:
    console = Served(ConsoleSettings(reviewers=TEAM, metrics_url=metrics_url), item(1))
    try:
        assert console.sign_in("ana", "t-ana") == 303
        status, _, page = console.request("GET", "/dashboard", jar="ana")
        assert status == 200
        return page
    finally:
        console.close()


def test_the_dashboard_shows_each_policy_versions_health_from_the_consumers_drift_metrics(consumer_metrics):
    page = dashboard(consumer_metrics)
    rows = {(m.group(1), m.group(2)): m.group(3) for m in
            re.finditer(r'<tr class="health" data-policy="([^"]+)" data-version="([^"]+)">(.*?)</tr>', page, re.S)}  # fmt: skip
    assert set(rows) == {("chat-harassment", "v1"), ("spam-scams", "v7")}
    harassment = rows[("chat-harassment", "v1")]

    def cell(row: str, name: str) -> str:
        return re.search(rf'class="num {name}">([^<]+)<', row).group(1)

    # 20 results: 6 found violations (an undecided guess is none), 4 undecided, 2 dead letters.
    assert (cell(harassment, "results"), cell(harassment, "violations"), cell(harassment, "undecided"),
            cell(harassment, "dead-letters")) == ("20", "30.0%", "20.0%", "2")  # fmt: skip
    assert "lexical 16" in harassment and "undecided 4" in harassment
    assert cell(rows[("spam-scams", "v7")], "dead-letters") == "0"


def test_a_consumer_that_does_not_answer_leaves_the_panel_saying_so_and_no_url_no_panel():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    page = dashboard(f"http://127.0.0.1:{port}/metrics")
    assert 'id="policy-health"' not in page and 'id="per-hour"' in page  # the rest of the dashboard is there
    assert re.search(r'id="health-problem">the consumer&#39;s metrics at http://127.0.0.1:\d+/metrics did not answer', page)
    assert "Policy health" not in dashboard(None)
    with pytest.raises(ValueError, match="is not an http"):
        ConsoleSettings(metrics_url="consumer:8080/metrics")
