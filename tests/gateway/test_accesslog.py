from __future__ import annotations

import json
from datetime import datetime

from gateway.accesslog import line_of
from gateway.hops import hop_to_dict

START = 1795677880.4304104
HOP = (
    START,
    b"036c0a6d-fa35-4ffe-9882-9cdfbc312e99",
    b"0af7651916cd43dd8448eb211c80319c",
    b"71810d3c29036354",
    b"",
    False,
    "destination",
    "unknown",
    "hello",
    "v1",
    "default",
    "127.0.0.1:9000",  # hop records carry the endpoint as its name
    b"POST",
    b'/a"b\\c\x01\xe9?q=<script>',  # client data: quotes, backslash, a control byte, latin-1
    b"hello:8080",
    503,
    1.25,
    0.5,
    3,
    12,
    52,
    "connect_failure",
    b"127.0.0.1",
    14,  # a gRPC call that ended UNAVAILABLE
)


def test_line_is_one_json_object_with_every_field_of_the_hop() -> None:
    line = line_of(HOP)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    expected = hop_to_dict(HOP)
    del expected["start"], expected["sampled"]
    expected["time"] = "2026-11-26T07:24:40.430+00:00"
    expected["retries"] = 2
    assert record == expected
    assert record["target"] == '/a"b\\c\x01\xe9?q=<script>'
    assert record["flags"] == "UF,URX"
    assert datetime.fromisoformat(record["time"]).timestamp() == int(START * 1000) / 1000


def test_missing_endpoint_is_null() -> None:
    record = json.loads(line_of((*HOP[:11], None, *HOP[12:])))
    assert record["endpoint"] is None
