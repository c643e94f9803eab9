"""`RemoteClassifier`: gpt-oss-safeguard on a served fleet of OpenAI-compatible endpoints.

One request's path: the shape (consumer.classify.engine.remote.shapes) prepares the body;
the fleet (consumer.classify.engine.remote.fleet) lends the endpoint with the fewest of our
requests outstanding and room under its learned limit; the body is POSTed with the
endpoint's key; the reply is read into harmony channels and the final answer parsed, as in
process.

Failures end in `ClassificationFailed` (this record's dead letter) or `Unavailable` (an outage):
- an endpoint failure (refused or reset connection, attempt timeout, 408/409/429, 5xx, a
  rejected key or path) pauses that endpoint and the attempt is made again elsewhere (tenacity,
  `max_attempts` in all, the request's deadline included); when they are spent and the last
  attempt on every endpoint failed, the fleet is down: `Unavailable("reasoner")`, and the pipeline keeps the
  record until `probe` finds an endpoint answering /models again; when some endpoint still answers,
  the request goes round again on those only (a partial outage is not the record's fault either);
  only the request's deadline passing ends it as `classifier_error`;
- a request the server refuses as such (400, 413, 422) is not retried: `classifier_error`,
  or `payload_too_large` when the prompt does not fit the server's context;
- a completion without a parseable answer is asked again `max_unparseable_retries` times,
  then `unparseable_output` carrying the raw completion.
On `close()` waiting requests stop waiting, in-flight HTTP requests are cancelled (the
server sees the connection close and aborts them) and the client is closed.
Keys come from the environment and are sent only as headers; neither keys, content nor model
output are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_none

from consumer.classify import Capacity, Classification, ClassificationFailed, ClassifyRequest
from consumer.classify.engine.answer import UnparseableAnswer, classification, parse_answer
from consumer.classify.engine.remote.fleet import Endpoint, Fleet, NoEndpoint, ServerLoad
from consumer.classify.engine.remote.settings import RemoteSettings
from consumer.classify.engine.remote.shapes import BadReply, ChatShape, Prepared, PromptTooLong, Reply, TokenIdShape
from consumer.errors import Unavailable
from consumer.events import ErrorType

log = logging.getLogger(__name__)

# Statuses that say something about the endpoint (overloaded, misrouted, down, not ours),
# not about the request: try another endpoint.
_ENDPOINT_STATUSES = frozenset({401, 403, 404, 408, 409, 425, 429})


class EndpointFailed(Exception):
    """One attempt failed because of the endpoint; the request may succeed elsewhere."""


class RemoteClassifier:
    """Classifies with gpt-oss-safeguard served by one or more OpenAI-compatible endpoints.

    Guarantees: every `classify` call returns a Classification or raises ClassificationFailed
    (this request) or Unavailable (the last attempt on every endpoint failed: an outage);
    requests wait in this process, not in a server's queue, when every endpoint is at its
    learned limit (fleet.py); an attempt never outlives the request's deadline or
    `request_timeout_s`; an attempt that fails on an endpoint for the endpoint's sake is made
    again on another; `capacity()` is the most requests ever outstanding at once.
    """

    name = "remote"

    def __init__(self, settings: RemoteSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.fleet = Fleet(settings)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._headers: dict[str, dict[str, str]] = {}
        self._token_ids: TokenIdShape | None = None
        self._chat: ChatShape | None = None
        self._poller: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[httpx.Response]] = set()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the keys, prepare the shapes, ask each endpoint what it serves, start watching its load."""
        for endpoint in self.fleet.endpoints:
            self._headers[endpoint.name] = self._auth_header(endpoint)
        apis = {e.settings.api for e in self.fleet.endpoints}
        if "completions" in apis:
            self._token_ids = TokenIdShape(self.settings)
        if "chat" in apis:
            self._chat = ChatShape(self.settings)
        connections = sum(e.ceiling for e in self.fleet.endpoints) + 2 * len(self.fleet.endpoints)
        self._client = httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(self.settings.request_timeout_s, connect=self.settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )
        await asyncio.gather(*(self._describe(e) for e in self.fleet.endpoints))
        if any(e.settings.resolved_metrics_url for e in self.fleet.endpoints):
            self._poller = asyncio.create_task(self._watch_load(), name="remote-endpoint-load")
        log.info(
            "remote reasoner: %d endpoint(s) %s, priority %s, capacity %d",
            len(self.fleet.endpoints),
            ", ".join(f"{e.name}({e.settings.api})" for e in self.fleet.endpoints),
            self.settings.priority,
            self.fleet.capacity(),
        )

    def capacity(self) -> Capacity:
        return Capacity(max_sequences=self.fleet.capacity())

    @property
    def renderer(self) -> Any:
        """The harmony renderer of the token-id shape (the in-process engine's own)."""
        if self._token_ids is None:
            raise RuntimeError("no endpoint takes token ids, or the classifier is not started")
        return self._token_ids.renderer

    async def close(self) -> None:
        """Stop: waiting requests fail at once, in-flight ones are cancelled (the server aborts them)."""
        self._closing = True
        self.fleet.close()
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=5)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- one request -----------------------------------------------------------------------

    async def classify(self, request: ClassifyRequest) -> Classification:
        attempts = 0
        problem = None
        reply: Reply | None = None
        for _ in range(self.settings.max_unparseable_retries + 1):
            reply, used = await self.complete(request, first_attempt=attempts + 1)
            attempts += used
            problem = reply.channels.problem
            if problem is None and reply.channels.final is not None:
                try:
                    return self._classification(reply)
                except UnparseableAnswer as exc:
                    problem = str(exc)
            log.info("request %s: no parseable answer after attempt %d", request.request_id, attempts)
        assert reply is not None
        raise ClassificationFailed(
            ErrorType.UNPARSEABLE_OUTPUT,
            f"no parseable final answer after {attempts} attempt(s): {problem}",
            raw_output=reply.raw_output,
            attempts=attempts,
        )

    async def complete(self, request: ClassifyRequest, first_attempt: int = 1) -> tuple[Reply, int]:
        """One completion for `request` from some endpoint, and the endpoint attempts it took."""
        if self._client is None:
            raise ClassificationFailed(ErrorType.CLASSIFIER_ERROR, "the remote classifier is not started")
        tried: set[str] = set()
        failing: frozenset[str] = frozenset()  # after a round spent on failing endpoints: only the others
        used = 0

        def deadline_passed(_: RetryCallState | None = None) -> bool:
            return request.deadline is not None and time.monotonic() >= request.deadline

        while True:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(EndpointFailed),
                stop=stop_after_attempt(self.settings.max_attempts) | deadline_passed,
                wait=wait_none(),  # the failed endpoint is paused instead; the next attempt goes elsewhere
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        used += 1
                        attempt_id = f"{request.request_id}#{first_attempt + used - 1}"
                        reply = await self._attempt(request, tried, attempt_id, failing)
                return reply, used
            except ClassificationFailed as exc:
                exc.attempts = first_attempt - 1 + used
                raise
            except (EndpointFailed, NoEndpoint) as exc:
                paused_s = None if self._closing else self.fleet.down_for(time.monotonic())
                if paused_s is not None:
                    raise Unavailable(
                        "reasoner",
                        f"no endpoint of the remote fleet answers (last: {exc}; endpoints tried: "
                        f"{', '.join(sorted(tried)) or 'none'})",
                        retry_after_s=paused_s,
                    ) from None
                if self._closing or deadline_passed():
                    raise ClassificationFailed(
                        ErrorType.CLASSIFIER_ERROR,
                        f"remote reasoner: {exc} (endpoints tried: {', '.join(sorted(tried)) or 'none'})",
                        attempts=first_attempt - 1 + used,
                    ) from None
                # Some endpoint still answers; this request met only failing ones (those that answer
                # were full, as in a rolling restart's backlog). Not the record's fault: another round,
                # on the endpoints that answer, within the request's deadline.
                failing = frozenset(e.name for e in self.fleet.endpoints if e.failures_in_a_row > 0)
            except Exception as exc:  # any other failure still ends as a dead letter, never a crash
                raise ClassificationFailed(
                    ErrorType.CLASSIFIER_ERROR,
                    f"remote request failed: {type(exc).__name__}: {exc}",
                    attempts=first_attempt - 1 + used,
                ) from exc

    async def _attempt(
        self, request: ClassifyRequest, tried: set[str], attempt_id: str, failing: frozenset[str] = frozenset()
    ) -> Reply:
        endpoint = await self.fleet.acquire(tried, request.deadline, failing)
        tried.add(endpoint.name)
        started = time.monotonic()
        try:
            prepared = self._prepare(request, endpoint, attempt_id)
            reply = await self._send(endpoint, prepared, attempt_id, request.deadline)
        finally:
            self.fleet.release(endpoint)
        endpoint.succeeded(time.monotonic() - started)
        return reply

    def _prepare(self, request: ClassifyRequest, endpoint: Endpoint, attempt_id: str) -> Prepared:
        shape = self._shape(endpoint)
        try:
            prepared = shape.prepare(request, endpoint.settings.model or self.settings.model, endpoint.max_model_len)
        except PromptTooLong as exc:
            raise ClassificationFailed(ErrorType.PAYLOAD_TOO_LARGE, str(exc)) from None
        except ValueError as exc:  # PromptError: a rendering that would break the harmony framing
            raise ClassificationFailed(ErrorType.CLASSIFIER_ERROR, str(exc)) from exc
        if endpoint.sends_priority and self.settings.priority == "low":
            prepared.body["priority"] = self.settings.low_priority_value
        if isinstance(shape, TokenIdShape):
            prepared.body["request_id"] = unique_request_id(attempt_id)
        return prepared

    async def _send(self, endpoint: Endpoint, prepared: Prepared, attempt_id: str, deadline: float | None) -> Reply:
        assert self._client is not None
        limit = self.settings.request_timeout_s
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        if limit <= 0:
            raise EndpointFailed(f"deadline passed before attempt {attempt_id} started")
        url = endpoint.settings.url + prepared.path
        # The POST runs as a task of ours so that close() can cancel it; the caller's own
        # cancellation still cancels it too (shield-free await).
        post = asyncio.ensure_future(self._client.post(url, json=prepared.body, headers=self._headers[endpoint.name]))
        self._in_flight.add(post)
        post.add_done_callback(self._in_flight.discard)
        try:
            async with asyncio.timeout(limit):
                response = await post
        except asyncio.CancelledError:
            post.cancel()
            current = asyncio.current_task()
            if self._closing and current is not None and not current.cancelling():
                raise NoEndpoint("the remote classifier closed during the request") from None
            raise
        except TimeoutError:
            # Leaving the request closes its connection, which vLLM takes as an abort.
            self._endpoint_failed(endpoint, f"attempt ran past its {limit:.3f} s limit")
            raise EndpointFailed(f"attempt {attempt_id} on {endpoint.name} ran past its {limit:.3f} s limit") from None
        except httpx.TransportError as exc:
            if self._closing:
                raise NoEndpoint("the remote classifier closed during the request") from None
            self._endpoint_failed(endpoint, type(exc).__name__)
            raise EndpointFailed(f"{endpoint.name}: {type(exc).__name__}") from None
        status = response.status_code
        if status == 200:
            try:
                return self._shape(endpoint).read(response.json(), prepared)
            except (BadReply, ValueError) as exc:
                self._endpoint_failed(endpoint, "reply not in the documented shape")
                raise EndpointFailed(f"{endpoint.name}: {exc}") from None
        detail = _error_message(response)
        if status == 400 and "priority" in prepared.body and "priority" in detail.lower():
            # An older vLLM without priority scheduling refuses the field: stop sending it; low
            # traffic now takes a share of this endpoint instead.
            log.warning("endpoint %s refuses request priorities; low traffic takes a share there", endpoint.name)
            endpoint.sends_priority = False
            raise EndpointFailed(f"{endpoint.name} refused the priority field")
        if status in _ENDPOINT_STATUSES or status >= 500:
            self._endpoint_failed(endpoint, f"HTTP {status}")
            raise EndpointFailed(f"{endpoint.name}: HTTP {status}")
        error_type = ErrorType.PAYLOAD_TOO_LARGE if _context_overflow(status, detail) else ErrorType.CLASSIFIER_ERROR
        # The server's message may quote the request, which can echo content: kept out of logs,
        # and only its first part goes into the dead letter.
        raise ClassificationFailed(error_type, f"{endpoint.name} refused the request: HTTP {status}: {detail[:300]}")

    def _endpoint_failed(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.fail(time.monotonic(), reason)
        self.fleet.changed()

    def _shape(self, endpoint: Endpoint) -> TokenIdShape | ChatShape:
        shape = self._token_ids if endpoint.settings.api == "completions" else self._chat
        assert shape is not None, "shapes are prepared in start()"
        return shape

    def _auth_header(self, endpoint: Endpoint) -> dict[str, str]:
        variable = endpoint.settings.api_key_env
        if variable is None:
            return {}
        key = os.environ.get(variable)
        if not key:
            raise ValueError(f"endpoint {endpoint.name}: the environment variable {variable} (its API key) is not set")
        return {"Authorization": f"Bearer {key}"}

    async def probe(self, dependency: str) -> bool | None:
        """While the fleet is down: ask each endpoint's /models; True (and those endpoints up
        again) once one answers 200."""
        if dependency != "reasoner" or self._client is None:
            return None
        answered = await asyncio.gather(*(self._answers(e) for e in self.fleet.endpoints))
        if any(answered):
            self.fleet.changed()
        return any(answered)

    async def _answers(self, endpoint: Endpoint) -> bool:
        assert self._client is not None
        try:
            response = await self._client.get(
                endpoint.settings.url + "/models", headers=self._headers[endpoint.name],
                timeout=self.settings.connect_timeout_s,
            )  # fmt: skip
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        endpoint.answered()
        return True

    async def _describe(self, endpoint: Endpoint) -> None:
        """Learn the served context length (vLLM's /models lists max_model_len); best effort."""
        assert self._client is not None
        try:
            response = await self._client.get(
                endpoint.settings.url + "/models", headers=self._headers[endpoint.name], timeout=5.0
            )
            if response.status_code != 200:
                return
            model = endpoint.settings.model or self.settings.model
            for card in response.json().get("data", []):
                if card.get("id") == model and isinstance(card.get("max_model_len"), int):
                    endpoint.max_model_len = card["max_model_len"]
        except (httpx.HTTPError, ValueError, AttributeError):
            log.info("endpoint %s: /models not readable at start; the server will judge prompt lengths", endpoint.name)

    async def _watch_load(self) -> None:
        """Read each endpoint's /metrics every `metrics_interval_s` and steer its limit."""
        watched = [e for e in self.fleet.endpoints if e.settings.resolved_metrics_url]
        while True:
            await asyncio.gather(*(self._read_load(e) for e in watched))
            self.fleet.changed()
            await asyncio.sleep(self.settings.metrics_interval_s)

    async def _read_load(self, endpoint: Endpoint) -> None:
        assert self._client is not None
        url = endpoint.settings.resolved_metrics_url
        assert url is not None
        try:
            response = await self._client.get(url, headers=self._headers[endpoint.name], timeout=2.0)
        except httpx.HTTPError:
            endpoint.load = None  # unknown now: its latency (or ceiling) rules until it answers again
            return
        if response.status_code != 200:
            endpoint.load = None
            return
        load = parse_server_load(response.text)
        if load is None:
            endpoint.load = None
            return
        endpoint.observe(load)

    def _classification(self, reply: Reply) -> Classification:
        assert reply.channels.final is not None
        return classification(
            parse_answer(reply.channels.final), reply, self.settings.model_name, self.settings.keep_reasoning
        )


_LOAD_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:prefix_cache_queries": "prefix_cache_queries",
    "vllm:prefix_cache_hits": "prefix_cache_hits",
}


def parse_server_load(text: str) -> ServerLoad | None:
    """vLLM's load figures from a /metrics page, summed over engines; None when it has none."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    kv: list[float] = []
    try:
        for family in text_string_to_metric_families(text):
            field = _LOAD_METRICS.get(family.name.removesuffix("_total"))
            if field is None:
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                if field == "kv_cache_usage":
                    kv.append(sample.value)
                else:
                    found[field] = found.get(field, 0.0) + sample.value
    except ValueError:
        return None
    if "running" not in found or "waiting" not in found:
        return None
    return ServerLoad(
        running=found["running"],
        waiting=found["waiting"],
        kv_cache_usage=max(kv, default=0.0),  # the fullest engine decides whether there is room
        prefix_cache_queries=found.get("prefix_cache_queries"),
        prefix_cache_hits=found.get("prefix_cache_hits"),
    )


def unique_request_id(attempt_id: str) -> str:
    """vLLM's id for the request (its logs and aborts): ours plus a random suffix, since a replay and
    the live consumer may send the same event at once, and ids must be unique while in flight."""
    return f"{attempt_id}-{os.urandom(4).hex()}"


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            return str(error.get("message") or error.get("type") or "")
        if isinstance(data, dict) and "detail" in data:
            return str(data["detail"])
    except ValueError:
        pass
    return response.text[:300]


def _context_overflow(status: int, detail: str) -> bool:
    text = detail.lower()
    return status == 413 or "context length" in text or "max_model_len" in text or "too long" in text
