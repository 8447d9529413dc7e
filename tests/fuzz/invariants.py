"""What must hold after any client byte stream went through the gateway (`check(run)` on a `MemoryGateway` run).

- Nothing escapes: no exception reaches the loop or a transport, nothing is logged at ERROR ("internal error",
  "background task failed").
- The upstream side is clean: h11, an independent parser, reads every byte the gateway wrote to an upstream, with
  nothing after a complete request before its response; each forwarded request carries one Host, one
  x-request-id, and never both Content-Length and Transfer-Encoding; a connection left open is idle.
- The client side is clean: what the client got parses (h11, as the client) as one response per request at most,
  each with one x-request-id, and nothing after the response that closes the connection.
- What reached the upstream is exactly what the gateway accepted: each upstream request was answered and that
  answer relayed to the client once, in order, as the response to the request the gateway's parser read, with the
  same method, target (origin form of an absolute-form target on the outbound listener), Host and body; every
  other response is the gateway's own one-line `meshgate: ` reply. So no request is forwarded twice, none is
  forwarded and then answered with an error, and no byte of one request reaches the upstream as part of another.
- Nothing leaks: the client connection is gone from the runtime, every service's and endpoint's in-flight counts
  are back to zero, every upstream connection is closed or idle in its pool, and once everything has been answered
  the gateway is not left with a client connection it keeps open without reading (that only a timer would end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from tests.gateway.inmemory import MAX_EVENT, MemoryGateway, ParsedRequest, Run, UpstreamRequest

# How each corpus input is run: the whole stream in one read on the inbound listener, and one byte per loop
# iteration on the outbound listener (absolute-form targets, trusted request IDs, heads split anywhere).
MODES = (("inbound", 0), ("outbound", 1))


@dataclass(frozen=True)
class Failure:
    """One broken invariant. `key` names the fault without the input's particulars, to group findings."""

    kind: str
    key: str
    detail: str = field(compare=False)

    @property
    def signature(self) -> str:
        return f"{self.kind}: {self.key}"

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


def replay(data: bytes, gateway: MemoryGateway | None = None) -> list[tuple[str, Failure]]:
    """Run `data` in every mode; the failures, each with the mode it showed in (`inbound/0`, `outbound/1`)."""
    gateway = gateway or MemoryGateway()
    found = []
    for listener, step in MODES:
        for failure in check(gateway.run(data, step, listener)):
            found.append((f"{listener}/{step}", failure))
    return found


def check(run: Run) -> list[Failure]:
    failures = [Failure("escaped", _generic(text), text) for text in run.escaped]
    failures += _upstream_side(run)
    responses, problem = parse_responses(run.client_output, [request.method for request in run.parsed])
    if problem:
        failures.append(Failure("client-bytes", _generic(problem), f"{problem}; client got {_show(run.client_output)}"))
    failures += _correspondence(run, responses)
    failures += _leaks(run)
    return failures


# The upstream side.


def _upstream_side(run: Run) -> list[Failure]:
    failures = []
    for upstream in run.upstreams:
        where = f"(upstream connection {upstream.index} got {_show(bytes(upstream.received))})"
        for error in upstream.errors:
            failures.append(Failure("upstream-bytes", _generic(error), f"{error} {where}"))
        for request in upstream.requests:
            failures += _framing(request, where)
        if upstream.failed:
            continue
        if not upstream.transport.closing:
            if not upstream.idle():
                failures.append(Failure("upstream-left", "an open upstream connection is mid-request", where))
            elif upstream.protocol not in upstream.protocol.pool.idle and upstream.protocol.tunnel is None:
                failures.append(
                    Failure("leak", "an open upstream connection is neither idle in its pool nor used", where)
                )
    return failures


def _framing(request: UpstreamRequest, where: str) -> list[Failure]:
    failures = []
    for name in (b"host", b"x-request-id"):
        count = len(request.values(name))
        if count != 1:
            failures.append(
                Failure("upstream-headers", f"{name.decode()} sent {'no' if not count else 'several'} times", where)
            )
    if request.values(b"content-length") and request.values(b"transfer-encoding"):
        failures.append(Failure("upstream-headers", "both Content-Length and Transfer-Encoding", where))
    return failures


# The client side.


def parse_responses(data: bytes, methods: list[bytes]) -> tuple[list[Response], str]:
    """The responses in what the client received (then the connection closed), read by h11 as the client of
    requests with these methods, in order; and what was wrong with the bytes, or ""."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_EVENT)
    conn.receive_data(data)
    conn.receive_data(b"")  # every run ends with the client connection closed
    responses: list[Response] = []
    while True:
        if not conn.trailing_data[0]:
            return responses, ""  # all read, and the connection closed cleanly between responses
        method = methods[len(responses)] if len(responses) < len(methods) else b"GET"
        conn.send(h11.Request(method=b"HEAD" if method == b"HEAD" else b"GET", target=b"/", headers=[(b"host", b"x")]))
        conn.send(h11.EndOfMessage())
        response: Response | None = None
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    response = Response(event.status_code, list(event.headers), b"")
                elif isinstance(event, h11.Data) and response is not None:
                    response.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA or event is h11.PAUSED:
                    # (NEED_DATA cannot follow EOF, nor PAUSED an ordinary client request)
                    return responses, f"response {len(responses)} is cut short"
        except h11.RemoteProtocolError as exc:
            at = len(data) - len(conn.trailing_data[0])
            return responses, f"response {len(responses)} does not parse ({exc}) at byte {at}"
        assert response is not None
        responses.append(response)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            continue
        break
    leftover = conn.trailing_data[0]
    if leftover:
        return responses, f"{len(leftover)} bytes after the response that closed the connection: {leftover[:60]!r}"
    return responses, ""


def _correspondence(run: Run, responses: list[Response]) -> list[Failure]:
    failures = []
    relayed: list[int] = []
    for index, response in enumerate(responses):
        request = run.parsed[index] if index < len(run.parsed) else None
        ids = response.values(b"x-request-id")
        if len(ids) != 1:
            failures.append(Failure("client-response", f"x-request-id sent {len(ids)} times", _show(run.client_output)))
        seq = response.values(b"x-upstream-seq")
        if not seq:
            if not _own_reply(response, request):
                detail = f"response {index} ({response.status}) came neither from the upstream nor from the gateway"
                failures.append(Failure("client-response", "neither upstream nor own reply", detail))
            continue
        number = int(seq[0])
        if number in relayed:
            failures.append(Failure("relay", "an upstream response relayed twice", f"upstream response {number}"))
            continue
        relayed.append(number)
        forwarded = run.upstream_requests[number]
        if request is None:
            detail = f"response {index} relays upstream request {number}, but the gateway parsed {len(run.parsed)}"
            failures.append(Failure("relay", "an upstream response relayed for no request", detail))
            continue
        for key, detail in _differences(request, forwarded, run.listener):
            failures.append(Failure("forwarded", key, f"request {index}: {detail}"))
    if relayed != sorted(relayed):
        failures.append(Failure("relay", "upstream responses relayed out of order", f"order {relayed}"))
    for forwarded in run.upstream_requests:
        if forwarded.seq not in relayed and not run.upstreams[forwarded.connection].failed:  # (else: no answer)
            source = _source_of(run.parsed, forwarded)
            detail = f"upstream request {forwarded.seq} ({forwarded.method!r} {forwarded.target!r}, from {source})"
            failures.append(Failure("unanswered", "a forwarded request's response never reached the client", detail))
    failures += _truncated(run)
    if len(responses) > len(run.parsed) + 1:
        detail = f"{len(responses)} responses to {len(run.parsed)} requests"
        failures.append(Failure("client-response", "more responses than requests", detail))
    return failures


def _truncated(run: Run) -> list[Failure]:
    """A request the gateway read whole must reach the upstream whole: it is all forwarded as it is read."""
    failures = []
    by_id: dict[bytes, list[ParsedRequest]] = {}
    for request in run.parsed:
        by_id.setdefault(request.request_id, []).append(request)
    for upstream in run.upstreams:
        if upstream.failed:
            continue
        for forwarded in upstream.requests:
            ids = forwarded.values(b"x-request-id")
            sources = by_id.get(ids[0], []) if len(ids) == 1 else []
            if not forwarded.complete and len(sources) == 1 and sources[0].complete:
                got, read = len(forwarded.body), len(sources[0].body)
                detail = f"{forwarded.method!r} {forwarded.target!r}: the upstream got {got} body bytes (the gateway"
                detail += f" read {read}) and never the end of the request ({_show(bytes(upstream.received))})"
                failures.append(Failure("forwarded", "the gateway read a whole request, the upstream got part", detail))
    return failures


def _own_reply(response: Response, request: ParsedRequest | None) -> bool:
    if request is not None and request.method == b"HEAD":
        return True  # (no body to tell)
    body = response.body
    return body.startswith(b"meshgate: ") and body.endswith(b"\n") and body.count(b"\n") == 1


def _differences(request: ParsedRequest, forwarded: UpstreamRequest, listener: str) -> list[tuple[str, str]]:
    found = []
    if not request.complete:
        found.append(
            ("forwarded complete, read incomplete", "the upstream read a complete request the gateway had not")
        )
    if forwarded.method != request.method:
        found.append(("method differs", f"method {request.method!r} forwarded as {forwarded.method!r}"))
    absolute = listener == "outbound" and request.url.startswith(b"http://")
    target = _origin_form(request.url) if absolute else request.url
    if forwarded.target != target:
        found.append(("target differs", f"target {request.url!r} forwarded as {forwarded.target!r}"))
    if bytes(forwarded.body) != bytes(request.body):
        read, sent = _show(bytes(request.body)), _show(bytes(forwarded.body))
        detail = f"body of {len(request.body)} bytes {read} forwarded as {sent}"
        found.append(("body differs", detail))
    hosts = [value for name, value in request.headers if name.lower() == b"host"]
    if not absolute and hosts and forwarded.values(b"host") != hosts[:1]:
        found.append(("host differs", f"Host {hosts[0]!r} forwarded as {forwarded.values(b'host')}"))
    return found


def _origin_form(url: bytes) -> bytes:
    parts = urlsplit(url)
    return (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")


def _source_of(parsed: list[ParsedRequest], forwarded: UpstreamRequest) -> str:
    ids = forwarded.values(b"x-request-id")
    for index, request in enumerate(parsed):
        if ids and request.request_id == ids[0]:
            return f"client request {index}, complete={request.complete}"
    return "no request the gateway parsed"


# Leaks.


def _leaks(run: Run) -> list[Failure]:
    failures = []
    runtime = run.runtime
    if runtime.connections:
        failures.append(Failure("leak", "a closed client connection is still in runtime.connections", ""))
    for name, load in runtime.loads.items():
        if load.active or load.pending:
            detail = f"service {name}: active={load.active} pending={load.pending}"
            failures.append(Failure("leak", "in-flight counts not back to zero", detail))
    for (service, address), endpoint in runtime.endpoints.items():
        if endpoint.active:
            detail = f"{service} {address}: active={endpoint.active}"
            failures.append(Failure("leak", "endpoint in-flight count not back to zero", detail))
    if run.stuck is not None:
        detail = f"the client connection is open and not read ({run.stuck} bytes unread): only a timer can end it"
        failures.append(Failure("stuck", "stopped reading a client it kept open", detail))
    return failures


def _generic(text: str) -> str:
    """A message without its particulars (numbers, quoted bytes): findings with the same cause group together."""
    text = re.sub(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"", "…", text)
    text = re.sub(r"0x[0-9a-f]+|\d+", "N", text)
    return text[:160]


def _show(data: bytes, limit: int = 300) -> str:
    return repr(data[:limit]) + (f"… ({len(data)} bytes)" if len(data) > limit else "")
