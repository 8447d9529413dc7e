"""What a gateway's heartbeat (`POST /api/v1/heartbeat`) may carry, and what the dashboard keeps of it.

`Heartbeat` is the body's one definition (a msgspec Struct: it validates, and it is the OpenAPI schema): every
field the dashboard knows (what `gateway.control.ControlClient.heartbeat_body` sends), each within its limit;
`Heartbeat.record(now)` is the `GatewayRecord` to store. Fields it does not know are dropped, not refused (a newer
gateway may send more); a known field that is malformed or over its limit is 422 with one line naming it
(`dashboard.api.bodies.convert_body`). The whole body is at most `MAX_HEARTBEAT` bytes (413,
`dashboard.api.bodies.BodyLimit`).

| field | limit |
|---|---|
| `instance` (required) | a UUID |
| `group` (required) | the token's group (checked by the caller) |
| `meshgate_version`, `etag` | `MAX_TEXT` characters |
| `config_version` | an integer >= 0 |
| `started`, `cert_not_after` | seconds since the epoch, or null |
| `advertise` | a `host:port` peers can reach, or null |
| `listeners` | at most `MAX_LISTENERS` of `kind: host:port` |
| `stats` | `series`, `counters` and `gauges`: lists of at most `MAX_STATS_ENTRIES`; `loop_lag`, `cpu`, `rss`: numbers |

A `series` item (`{labels, codes, buckets, grpc?, first?, first_grpc?}`, `grpc` being a gRPC series' calls by status
code, and `first`/`first_grpc` the same requests by their first attempt's HTTP status/gRPC code, sent only when a
retry changed them) is kept as sent and checked when the history samples it
(`dashboard.signals.history.parse_heartbeat`): a malformed item is left out.

>>> body = {"instance": "5f0e8b7e-2c1a-4d3b-9f6e-0a1b2c3d4e5f", "group": "shop", "advertise": "10.0.0.5:15006"}
>>> convert_body(body, Heartbeat).record(time.time()).key
'shop/5f0e8b7e-2c1a-4d3b-9f6e-0a1b2c3d4e5f'
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec

from dashboard.api.bodies import expected
from dashboard.settings import MAX_BODY
from dashboard.signals.history import MAX_SERIES
from dashboard.store.model import GatewayRecord
from gateway.units import is_wildcard, parse_address

MAX_HEARTBEAT = MAX_BODY  # bytes of a heartbeat body: room for about MAX_SERIES series of golden signals
MAX_TEXT = 64  # characters of `meshgate_version` and `etag`
MAX_LISTENERS = 16  # entries in `listeners`
MAX_ADDRESS = 300  # characters of an address: a 253-character host name, brackets, a colon and a port
MAX_STATS_ENTRIES = MAX_SERIES  # entries in each of the `stats` lists
KIND = r"^[a-z][a-z0-9_-]{0,31}$(?!\n)"  # a listener's kind: inbound, outbound, metrics, admin...


Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT, extra=expected(f"a string of at most {MAX_TEXT} characters"))]
Count = Annotated[int, msgspec.Meta(ge=0, extra=expected("an integer >= 0"))]
Address = Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS)]
Number = int | float  # kept as sent: an integer stays one
Time = Annotated[
    Number | None,
    msgspec.Meta(description="seconds since the epoch", extra=expected("a time in seconds since the epoch")),
]
StatsList = Annotated[
    list[Any],
    msgspec.Meta(max_length=MAX_STATS_ENTRIES, extra=expected(f"a list of at most {MAX_STATS_ENTRIES}")),
]


class Stats(msgspec.Struct):
    """A gateway's golden-signal series and its saturation: what the embedded history samples."""

    series: StatsList = []
    counters: StatsList = []
    gauges: StatsList = []
    loop_lag: Annotated[Number, msgspec.Meta(extra=expected("a number"))] = 0
    cpu: Annotated[Number, msgspec.Meta(extra=expected("a number"))] = 0
    rss: Annotated[Number, msgspec.Meta(extra=expected("a number"))] = 0


class Heartbeat(msgspec.Struct):
    """A gateway's heartbeat. Other fields are dropped (newer gateways send more)."""

    instance: Annotated[uuid.UUID, msgspec.Meta(extra=expected("a UUID"))]
    group: Annotated[str, msgspec.Meta(description="the token's group")]
    meshgate_version: Text = ""
    config_version: Count = 0
    etag: Text = ""
    started: Time = None
    advertise: Annotated[
        Address | None,
        msgspec.Meta(description="a host:port peers can reach", extra=expected("a host:port peers can reach")),
    ] = None
    listeners: Annotated[
        dict[Annotated[str, msgspec.Meta(pattern=KIND)], Address],
        msgspec.Meta(
            max_length=MAX_LISTENERS,
            description="listener kind: host:port",
            extra=expected(f"at most {MAX_LISTENERS} of listener kind: host:port"),
        ),
    ] = {}
    cert_not_after: Time = None
    stats: Stats | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.advertise is not None and not _reachable(self.advertise):
            raise ValueError("advertise: expected a host:port peers can reach")

    def record(self, now: float) -> GatewayRecord:
        """The record to store: the known fields, as checked."""
        data: dict[str, Any] = {
            "meshgate_version": self.meshgate_version,
            "config_version": self.config_version,
            "etag": self.etag,
            "started": self.started,
            "cert_not_after": self.cert_not_after,
            "advertise": self.advertise,
            "listeners": self.listeners,
        }
        if self.stats is not msgspec.UNSET:
            data["stats"] = msgspec.structs.asdict(self.stats)
        return GatewayRecord(str(self.instance), self.group, data, now)


def _reachable(advertise: str) -> bool:
    try:
        address = parse_address(advertise)
    except ValueError:
        return False
    return address.port != 0 and not is_wildcard(address.host)
