"""Request bodies: the size limit (`BodyLimit`), each body's one typed definition, and reading one (`read_body`).

Each JSON body is a msgspec `Struct` (`WeightsBody`, `ServiceBody`, ...; the heartbeat's is in
`dashboard.api.heartbeats`): the same definition validates the request and is the OpenAPI schema
(`dashboard.api.openapi`). `read_body` answers 400 for what is not JSON and 422, one line naming the field, for
JSON that does not fit; a field's `Meta(extra={"expected": ...})` is what that line says it expected.

The limit holds whatever the client claims: a `Content-Length` over it is refused before the app runs, and a
chunked or under-declared body is counted as it arrives, so no handler ever holds more than `limit` bytes.

A refused body is then read and dropped (`drain`: up to `DRAIN_TIME` and `DRAIN_BYTES`) before the connection
closes, as the gateway's lingering close does (`gateway.proxy.DownstreamProtocol.linger`): a client that sends its
whole body before it reads would otherwise get a RST for the unread bytes, which destroys the 413 before it reads
it. uvicorn gives an app no way to close after the answer and go on reading, so the reading comes first; it also
works over TLS, where a half-close is not possible. A declared body too large to drain, or one behind
`Expect: 100-continue` (not sent until asked for), is answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, TypeVar

import msgspec
import msgspec.inspect
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboard.errors import ApiError, error_response
from dashboard.rollout.spec import DEFAULT_INTERVAL, DEFAULT_MAX_HOLD, MAX_DURATION, MAX_STEPS, MAX_URL, MIN_INTERVAL

MAX_OPERATOR_REASON = 500  # characters in an operator's reason for a change
MAX_CSR = 16 * 1024  # characters of a PEM certificate request sent to /join
DRAIN_TIME = 2.0  # seconds a refused body is read and dropped before the connection closes (the gateway's LINGER)
DRAIN_BYTES = 64 << 20  # bytes of it, at most; a larger declared body is answered at once
# Python's `$` also matches before a final newline: the lookahead refuses it (JSON Schema's regexes read it too).
ONE_LINE = r"^[^\x00-\x1f\x7f]*$(?!\n)"
SUBSET_SOURCES = ("endpoints", "dns", "srv", "etcd")  # a subset's endpoints: listed, or where to discover them
_AT = re.compile(r"(?P<message>.*?)(?: - at (?:`key` in )?`\$(?P<path>[^`]*)`)?", re.DOTALL)
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]*)`")
_Body = TypeVar("_Body", bound=msgspec.Struct)


class BodyTooLarge(ApiError):
    """A request body over the limit: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413 and are never read whole."""

    def __init__(self, app: ASGIApp, limit: int, paths: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = dict(paths or {})  # larger limits for some paths, such as span batches

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            if declared <= DRAIN_BYTES and not _expects_continue(scope):
                await drain(receive)
            await error_response(413, str(BodyTooLarge(limit)), {"connection": "close"})(scope, receive, send)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if message.get("more_body", False):
                        await drain(receive)
                    raise BodyTooLarge(limit)
            return message

        async def closing(message: Message) -> None:
            # After a refused chunked body, close: uvicorn would otherwise read the rest, however long, to keep alive.
            if refused and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, closing)


async def drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, for up to DRAIN_TIME seconds and DRAIN_BYTES bytes."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIME):
            while dropped <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 18 else None
    return None


def expected(description: str) -> dict[str, str]:
    """`Meta(extra=...)` for a field whose 422 should say what it expected rather than msgspec's type words."""
    return {"expected": description}


Reason = Annotated[
    str,
    msgspec.Meta(
        max_length=MAX_OPERATOR_REASON,
        pattern=ONE_LINE,
        description="why: recorded in the history and the audit log",
        extra=expected(f"one line of text of at most {MAX_OPERATOR_REASON} characters, without control characters"),
    ),
]
AnyObject = dict[str, Any]  # checked by the mesh model (`dashboard.mesh`), whose reasons name the exact part


class ReasonBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):  # kw_only: required fields may follow
    """Why a change is made; a DELETE may send it as a body (or as `?reason=`)."""

    reason: Reason = ""


class WeightsBody(ReasonBody, forbid_unknown_fields=True):
    """The split of a service's catch-all route."""

    weights: Annotated[
        AnyObject,
        msgspec.Meta(
            extra_json_schema={"additionalProperties": {"type": "integer", "minimum": 0}, "example": {"v1": 90}},
            extra=expected('an object such as {"v1": 90, "v2": 10}'),
        ),
    ]


class ServiceBody(ReasonBody, forbid_unknown_fields=True):
    """A service's spec, as in gateway YAML, and the group that owns it."""

    group: Annotated[str, msgspec.Meta(extra=expected("a group name"))]
    spec: AnyObject


class RoutesBody(ReasonBody, forbid_unknown_fields=True):
    """A service's routes: first match wins, the last one is the catch-all."""

    routes: list[AnyObject]


class SubsetBody(ReasonBody, forbid_unknown_fields=True):
    """A subset's endpoints: one of `endpoints`, `dns`, `srv` or `etcd` (an empty subset is `"endpoints": []`)."""

    endpoints: list[str] | msgspec.UnsetType = msgspec.UNSET
    dns: Annotated[str, msgspec.Meta(description="host:port; its A and AAAA records")] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    srv: Annotated[str, msgspec.Meta(description="a name whose SRV records give hosts and ports")] | (
        msgspec.UnsetType
    ) = msgspec.UNSET
    etcd: Annotated[str, msgspec.Meta(description="a key prefix; its keys are named host:port")] | (
        msgspec.UnsetType
    ) = msgspec.UNSET

    def __post_init__(self) -> None:
        if not self.spec():  # the mesh model refuses more than one
            raise ValueError(f"expected one of: {', '.join(SUBSET_SOURCES)}")

    def spec(self) -> dict[str, object]:
        return {key: value for key in SUBSET_SOURCES if (value := getattr(self, key)) is not msgspec.UNSET}


class EndpointBody(ReasonBody, forbid_unknown_fields=True):
    """One endpoint to add to a subset."""

    address: Annotated[str, msgspec.Meta(extra=expected("a host:port string"))]


class ConfigBody(ReasonBody, forbid_unknown_fields=True):
    """The whole mesh document (what `meshgate apply` sends)."""

    mesh: AnyObject


class RevertBody(ReasonBody, forbid_unknown_fields=True):
    """The older version whose mesh becomes the new one."""

    version: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1, extra=expected("a config version (an integer >= 1)"))]


class JoinBody(msgspec.Struct, forbid_unknown_fields=True):
    """A gateway's CSR, for its group's X.509-SVID."""

    group: str
    csr: Annotated[
        str,
        msgspec.Meta(max_length=MAX_CSR, extra=expected(f"a PEM certificate request of at most {MAX_CSR} characters")),
    ]


Seconds = Annotated[
    float,
    msgspec.Meta(
        ge=MIN_INTERVAL, le=MAX_DURATION, extra=expected(f"seconds from {MIN_INTERVAL:g} to {MAX_DURATION:g}")
    ),
]
Percent = Annotated[int, msgspec.Meta(ge=1, le=99, extra=expected("a whole percent from 1 to 99"))]
Url = Annotated[str, msgspec.Meta(max_length=MAX_URL, pattern=ONE_LINE, extra=expected("an http(s) URL"))]


class JudgesBody(msgspec.Struct, forbid_unknown_fields=True):
    """What the canary is judged on: each comparison with the primary, and optional absolute limits."""

    errors: bool = True
    first_attempts: bool = True
    latency: bool = True
    max_error_rate: Annotated[float, msgspec.Meta(gt=0, lt=1, extra=expected("a share between 0 and 1"))] | None = None
    max_p99_ms: Annotated[float, msgspec.Meta(gt=0, le=10_000, extra=expected("milliseconds up to 10000"))] | None = (
        None
    )


class RolloutBody(ReasonBody, forbid_unknown_fields=True):
    """An automated canary rollout. `steps` (the canary's weights, rising; promotion to 100 follows), or
    `step_weight` and `max_weight` as Flagger has them; neither: 5, 10, 25, 50. `primary` defaults to the subset
    with the most weight now."""

    canary: Annotated[str, msgspec.Meta(max_length=63, extra=expected("a subset name"))]
    primary: Annotated[str, msgspec.Meta(max_length=63, extra=expected("a subset name"))] | None = None
    steps: Annotated[list[Percent], msgspec.Meta(min_length=1, max_length=MAX_STEPS)] | None = None
    step_weight: Percent | None = None
    max_weight: Percent | None = None
    interval: Seconds = DEFAULT_INTERVAL
    max_hold: Seconds = DEFAULT_MAX_HOLD
    judges: JudgesBody = msgspec.field(default_factory=JudgesBody)
    approval: bool = False
    gate: Url | None = None
    events: Url | None = None


class RolloutActionBody(ReasonBody, forbid_unknown_fields=True):
    """Why an operator pauses, resumes, promotes, aborts or approves a rollout."""


OPERATOR_BODIES = (
    WeightsBody,
    ServiceBody,
    RoutesBody,
    SubsetBody,
    EndpointBody,
    ConfigBody,
    RevertBody,
    JoinBody,
    RolloutBody,
    RolloutActionBody,
)


async def read_json(request: Request) -> object:
    """The body as JSON (any value), or 400."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "expected a JSON object body")
    try:
        return msgspec.json.decode(raw)  # refuses NaN and Infinity, which are not JSON
    except (msgspec.DecodeError, msgspec.ValidationError) as err:  # also bad UTF-8, and numbers out of range
        raise ApiError(400, f"invalid JSON body: {err}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply") from None


async def read_body(request: Request, model: type[_Body]) -> _Body:
    """The body as a `model`, or 400 (not JSON) or 422 (one line naming the field)."""
    return convert_body(await read_json(request), model)


def convert_body(data: object, model: type[_Body]) -> _Body:
    """Decoded JSON as a `model`, or 422 with one line naming the field."""
    if not isinstance(data, dict):
        raise ApiError(422, f"expected a JSON object body, got {type(data).__name__}")
    try:
        return msgspec.convert(data, model)
    except msgspec.ValidationError as err:
        raise ApiError(422, field_reason(str(err), model)) from None


def field_reason(error: str, model: type[msgspec.Struct]) -> str:
    """msgspec's `Expected ... - at `$.stats.series`` as `stats.series: expected ...`, with the field's own words."""
    match = _AT.fullmatch(error)
    assert match is not None  # the pattern matches any text
    message, path = match["message"], match["path"] or ""
    field = path.lstrip(".").split("[", 1)[0]  # items and keys of a field are reported as the field
    if missing := _MISSING.fullmatch(message):
        return f"{_joined(field, missing['name'])}: required key is missing"
    if unknown := _UNKNOWN.fullmatch(message):
        allowed = ", ".join(f.encode_name for f in msgspec.structs.fields(model))
        return f"{_joined(field, unknown['name'])}: unknown key (expected one of: {allowed})"
    if description := _expectations(model).get(field):
        return f"{field}: expected {description}"
    message = message[:1].lower() + message[1:]
    return f"{field}: {message}" if field else message


def _joined(field: str, name: str) -> str:
    return f"{field}.{name}" if field else name


@functools.cache
def _expectations(model: type[msgspec.Struct]) -> dict[str, str]:
    """Each field's `extra["expected"]`, by dotted path (`stats.series`), nested structs included."""
    found: dict[str, str] = {}

    def walk(struct: msgspec.inspect.StructType, prefix: str) -> None:
        for field in struct.fields:
            path = prefix + field.encode_name
            for part in _parts(field.type):
                if isinstance(part, msgspec.inspect.Metadata) and part.extra and "expected" in part.extra:
                    found[path] = part.extra["expected"]
                elif isinstance(part, msgspec.inspect.StructType):
                    walk(part, path + ".")

    info = msgspec.inspect.type_info(model)
    assert isinstance(info, msgspec.inspect.StructType)
    walk(info, "")
    return found


def _parts(info: msgspec.inspect.Type) -> Iterator[msgspec.inspect.Type]:
    yield info
    if isinstance(info, msgspec.inspect.Metadata):
        yield from _parts(info.type)
    elif isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            yield from _parts(member)


def operator_reason(text: str) -> str:
    """An operator's reason given as text (`?reason=`, a form field), checked as the bodies' `reason` is."""
    return convert_body({"reason": text}, ReasonBody).reason


async def optional_reason(request: Request) -> str:
    """A DELETE's reason: `{"reason": ...}` in the body, else `?reason=`."""
    if (await request.body()).strip():
        body = await read_body(request, ReasonBody)
        if body.reason or "reason" not in request.query_params:
            return body.reason
    return operator_reason(request.query_params.get("reason", ""))
