"""What a gateway's heartbeat (`POST /api/v1/heartbeat`) may carry, and what the dashboard keeps of it.

`heartbeat_record(body, now)` checks every field the dashboard knows (what `gateway.control.ControlClient.
heartbeat_body` sends), each within its limit, and returns the `GatewayRecord` to store. Fields it does not know
are dropped, not refused (a newer gateway may send more); a known field that is malformed or over its limit is
422 with one line naming it. The whole body is at most `MAX_HEARTBEAT` bytes (413, `dashboard.api.bodies.BodyLimit`).

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

>>> body = {"instance": "5f0e8b7e-2c1a-4d3b-9f6e-0a1b2c3d4e5f", "group": "shop", "advertise": "10.0.0.5:15006"}
>>> heartbeat_record(body, time.time()).key
'shop/5f0e8b7e-2c1a-4d3b-9f6e-0a1b2c3d4e5f'
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from dashboard.errors import ApiError
from dashboard.settings import MAX_BODY
from dashboard.signals.history import MAX_SERIES
from dashboard.store.model import GatewayRecord
from gateway.units import is_wildcard, parse_address

MAX_HEARTBEAT = MAX_BODY  # bytes of a heartbeat body: room for about MAX_SERIES series of golden signals
MAX_TEXT = 64  # characters of `meshgate_version` and `etag`
MAX_LISTENERS = 16  # entries in `listeners`
MAX_ADDRESS = 300  # characters of an address: a 253-character host name, brackets, a colon and a port
MAX_STATS_ENTRIES = MAX_SERIES  # entries in each of the `stats` lists
STATS_LISTS = ("series", "counters", "gauges")
STATS_NUMBERS = ("loop_lag", "cpu", "rss")
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def heartbeat_record(body: dict[str, object], now: float) -> GatewayRecord:
    """The record to store for a heartbeat `body` (a JSON object with `instance` and `group`), or ApiError(422)."""
    data: dict[str, Any] = {
        "meshgate_version": _text(body, "meshgate_version"),
        "config_version": _count(body, "config_version"),
        "etag": _text(body, "etag"),
        "started": _time(body, "started"),
        "cert_not_after": _time(body, "cert_not_after"),
        "advertise": _advertise(body.get("advertise")),
        "listeners": _listeners(body.get("listeners", {})),
    }
    if "stats" in body:
        data["stats"] = _stats(body["stats"])
    return GatewayRecord(_instance(body["instance"]), str(body["group"]), data, now)


def _instance(value: object) -> str:
    try:
        if isinstance(value, str) and len(value) <= MAX_TEXT:
            return str(uuid.UUID(value))
    except ValueError:
        pass
    raise ApiError(422, f"instance: expected a UUID, got {_short(value)}")


def _text(body: dict[str, object], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ApiError(422, f"{key}: expected a string of at most {MAX_TEXT} characters, got {_short(value)}")
    return value


def _count(body: dict[str, object], key: str) -> int:
    value = body.get(key, 0)
    if type(value) is not int or value < 0:
        raise ApiError(422, f"{key}: expected an integer >= 0, got {_short(value)}")
    return value


def _time(body: dict[str, object], key: str) -> float | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ApiError(422, f"{key}: expected a time in seconds since the epoch, got {_short(value)}")
    return value


def _advertise(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_ADDRESS:
        try:
            address = parse_address(value)
        except ValueError:
            pass
        else:
            if address.port != 0 and not is_wildcard(address.host):
                return value
    raise ApiError(422, f"advertise: expected a host:port peers can reach, got {_short(value)}")


def _listeners(value: object) -> dict[str, str]:
    if (
        not isinstance(value, dict)
        or len(value) > MAX_LISTENERS
        or not all(_KIND.fullmatch(kind) for kind in value)
        or not all(isinstance(address, str) and len(address) <= MAX_ADDRESS for address in value.values())
    ):
        raise ApiError(
            422, f"listeners: expected at most {MAX_LISTENERS} of listener kind: host:port, got {_short(value)}"
        )
    return value


def _stats(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ApiError(422, f"stats: expected an object, got {_short(value)}")
    kept: dict[str, object] = {}
    for key in STATS_LISTS:
        entries = value.get(key, [])
        if not isinstance(entries, list) or len(entries) > MAX_STATS_ENTRIES:
            raise ApiError(422, f"stats.{key}: expected a list of at most {MAX_STATS_ENTRIES}, got {_short(entries)}")
        kept[key] = entries
    for key in STATS_NUMBERS:
        number = value.get(key, 0)
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ApiError(422, f"stats.{key}: expected a number, got {_short(number)}")
        kept[key] = number
    return kept


def _short(value: object) -> str:
    """A value for an error line, which must never echo a whole body: a long one by its type and length."""
    if isinstance(value, str | list | dict) and len(value) > 40:
        return f"a {type(value).__name__} of length {len(value)}"
    return repr(value)
