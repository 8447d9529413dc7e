"""The access log end to end: a real gateway process writing JSON lines to a file or to its stdout.

One JSON object per request, written by a buffer off the hot path (within ~200 ms), with the request's identity
(time, request and trace IDs), routing (source, destination, subset, endpoint), the request (method, target), the
outcome (status, bytes in and out, duration, upstream duration, retries) and Envoy-style response flags
(UF connect failure, URX retries exhausted, NR no route, ...). Files are polled with a deadline, never slept on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Gateway, StartGateway, StartUpstream, gateway_config, service, wait_for
from tests.e2e.servers import refusing_address

FIELDS = {
    "time",
    "request_id",
    "trace_id",
    "source",
    "destination",
    "subset",
    "endpoint",
    "method",
    "target",
    "status",
    "bytes_in",
    "bytes_out",
    "duration",
    "upstream_duration",
    "retries",
    "flags",
}


def client(gw: Gateway, kind: str = "inbound") -> httpx.Client:
    return httpx.Client(base_url=gw.url(kind), trust_env=False, timeout=10.0)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among `text`'s lines (a process's output also has its log lines)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)  # a line that starts like JSON must be one whole object
            assert isinstance(record, dict), line
            found.append(record)
    return found


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
    records = [json.loads(line) for line in complete.splitlines()]
    assert all(isinstance(record, dict) for record in records)
    return records


@pytest.fixture
def refused_address() -> Iterator[str]:
    with refusing_address() as address:
        yield address


def test_file_gets_one_line_per_request_with_the_right_values(
    start_gateway: StartGateway, start_upstream: StartUpstream, refused_address: str, tmp_path: Path
) -> None:
    upstream = start_upstream("v1")
    log_path = tmp_path / "access.log"
    services = {
        "hello": service(upstream.address),
        "down": service(refused_address),
        "impatient": service(upstream.address, timeouts={"per_try": "100ms"}),
    }
    gw = start_gateway(gateway_config(services, telemetry={"access_log": str(log_path)}))
    began = datetime.now(UTC)
    sent: list[tuple[str, httpx.Response]] = []  # (what, response), in order
    with client(gw) as c:

        def send(what: str, method: str = "GET", path: str = "/echo", host: str = "hello", body: bytes = b"") -> None:
            sent.append((what, c.request(method, path, headers={"host": host}, content=body or None)))

        send("echo", path="/echo?a=1")
        send("upload", "POST", "/count", body=b"u" * 1000)
        send("bytes", path="/bytes/777")
        send("chunked", path="/chunked/3")
        send("retried", path="/fail-first/1")  # a 503, retried (gateway-error), then 200
        send("exhausted", path="/status/503")  # 503 on every try: retries exhausted
        send("no-route", host="nowhere.example")
        send("connect-failure", host="down")
        send("slow", path="/delay/150")
        send("per-try-timeout", path="/delay/1000", host="impatient")
    with client(gw, "outbound") as c:
        sent.append(("outbound", c.get("/bytes/5", headers={"host": "hello"})))
    ended = datetime.now(UTC)
    responses = dict(sent)
    assert [r.status_code for _, r in sent] == [200, 200, 200, 200, 200, 503, 404, 503, 200, 504, 200], [
        (what, r.status_code, r.text[:80]) for what, r in sent
    ]

    def all_written() -> list[dict[str, Any]] | None:
        records = read_log(log_path)
        return records if len(records) >= len(sent) else None

    records = wait_for(all_written, timeout=2.0, what=f"{len(sent)} access log lines")
    assert len(records) == len(sent), records
    # Sequential requests: one line each, in the order they were answered.
    assert [r["request_id"] for r in records] == [resp.headers["x-request-id"] for _, resp in sent]
    line = {what: records[i] for i, (what, _) in enumerate(sent)}

    for (what, response), record in zip(sent, records, strict=True):
        assert set(record) >= FIELDS, (what, FIELDS - set(record))
        when = datetime.fromisoformat(record["time"])
        assert when.tzinfo is not None and began - timedelta(seconds=1) <= when <= ended + timedelta(seconds=1)
        assert re.fullmatch(r"[0-9a-f]{32}", record["trace_id"]), record
        assert record["status"] == response.status_code, what
        assert record["bytes_out"] == len(response.content), (what, record["bytes_out"], len(response.content))
        assert isinstance(record["duration"], float) and 0 <= record["duration"] < 5, what
        assert isinstance(record["upstream_duration"], float) and 0 <= record["upstream_duration"] <= 5, what
        assert record["method"] == response.request.method, what
    times = [datetime.fromisoformat(r["time"]) for r in records]
    assert times == sorted(times)
    assert len({r["trace_id"] for r in records}) == len(records), "each request starts its own trace"

    assert line["echo"]["target"] == "/echo?a=1"
    for what in ("echo", "upload", "bytes", "chunked", "retried", "exhausted", "slow"):
        record = line[what]
        assert (record["source"], record["destination"], record["subset"]) == ("unknown", "hello", "v1"), what
        assert record["endpoint"] == upstream.address, what
    assert line["upload"]["method"] == "POST" and line["upload"]["bytes_in"] == 1000
    assert line["echo"]["bytes_in"] == 0
    assert line["bytes"]["bytes_out"] == 777
    assert line["chunked"]["bytes_out"] == len(b"chunk-0\nchunk-1\nchunk-2\n")
    for what in ("echo", "upload", "bytes", "chunked", "slow", "outbound"):
        assert (line[what]["retries"], line[what]["flags"]) == (0, "-"), what

    assert line["retried"]["retries"] == 1 and line["retried"]["flags"] == "-"  # retried, then succeeded
    assert line["exhausted"]["retries"] == 2  # the default: two retries after the first try
    assert line["exhausted"]["flags"] == "URX"

    assert line["no-route"]["destination"] == "unknown" and line["no-route"]["endpoint"] is None
    assert line["no-route"]["flags"] == "NR" and line["no-route"]["retries"] == 0

    failed = line["connect-failure"]
    assert failed["destination"] == "down" and failed["endpoint"] == refused_address
    assert "UF" in failed["flags"].split(","), failed["flags"]
    assert failed["retries"] == 2 and "URX" in failed["flags"].split(",")  # connect failures are retried

    timed_out = line["per-try-timeout"]
    assert timed_out["destination"] == "impatient" and timed_out["retries"] == 2, timed_out
    assert set(timed_out["flags"].split(",")) == {"UT", "URX"}, timed_out["flags"]

    slow = line["slow"]
    assert slow["upstream_duration"] >= 0.15 and slow["duration"] >= slow["upstream_duration"], slow
    assert slow["duration"] < 5, "durations are in seconds"
    for what in ("echo", "bytes"):
        assert line[what]["duration"] >= line[what]["upstream_duration"], line[what]

    outbound = line["outbound"]
    assert outbound["source"] == "test" and outbound["destination"] == "hello", outbound  # the gateway's group
    assert outbound["bytes_out"] == 5
    assert responses["outbound"].content == b"xxxxx"


def test_stdout_gets_json_lines(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config({"hello": service(upstream.address)}, telemetry={"access_log": "stdout"}))
    with client(gw) as c:
        ids = [c.get(f"/bytes/{n}", headers={"host": "hello"}).headers["x-request-id"] for n in range(1, 4)]

    def logged() -> list[dict[str, Any]] | None:
        records = [r for r in json_lines(gw.output()) if r.get("request_id") in ids]
        return records if len(records) == len(ids) else None

    records = wait_for(logged, timeout=2.0, what="access log lines on stdout")
    assert [r["request_id"] for r in records] == ids
    assert [r["target"] for r in records] == ["/bytes/1", "/bytes/2", "/bytes/3"]
    assert [r["bytes_out"] for r in records] == [1, 2, 3]
    assert all(set(r) >= FIELDS and r["status"] == 200 for r in records)


def test_off_writes_nothing(start_gateway: StartGateway, start_upstream: StartUpstream, tmp_path: Path) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config({"hello": service(upstream.address)}, telemetry={"access_log": "off"}))
    with client(gw) as c:
        for _ in range(5):
            assert c.get("/echo", headers={"host": "hello"}).status_code == 200
        assert c.get("/echo", headers={"host": "nowhere.example"}).status_code == 404
    # Stopping the gateway flushes whatever a log would have buffered: after it, nothing can still be pending.
    assert gw.stop() == 0
    assert "stopped" in gw.output()
    assert json_lines(gw.output()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway-0.yaml"], "no log file appeared"


def test_lines_buffered_at_shutdown_are_written(
    start_gateway: StartGateway, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    upstream = start_upstream("v1")
    log_path = tmp_path / "access.log"
    gw = start_gateway(gateway_config({"hello": service(upstream.address)}, telemetry={"access_log": str(log_path)}))
    with client(gw) as c:
        ids = [c.get("/echo", headers={"host": "hello"}).headers["x-request-id"] for _ in range(30)]
    assert gw.stop() == 0  # right away, within the 200 ms flush interval
    assert [r["request_id"] for r in read_log(log_path)] == ids


def test_reload_turns_the_access_log_on(
    start_gateway: StartGateway, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    upstream = start_upstream("v1")
    log_path = tmp_path / "access.log"
    config = gateway_config({"hello": service(upstream.address)}, telemetry={"access_log": "off"})
    gw = start_gateway(config)
    with client(gw) as c:
        before = c.get("/echo", headers={"host": "hello"}).headers["x-request-id"]
        config["gateway"]["telemetry"]["access_log"] = str(log_path)
        gw.config_path.write_text(yaml.safe_dump(config))
        gw.signal(signal.SIGHUP)
        gw.wait_log("config version 2 applied")
        after = c.get("/echo", headers={"host": "hello"}).headers["x-request-id"]
    records = wait_for(lambda: read_log(log_path), timeout=2.0, what="a line in the new access log")
    assert [r["request_id"] for r in records] == [after], (before, records)


def test_an_output_nobody_reads_drops_lines_and_never_slows_requests(
    start_gateway: StartGateway, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """A named pipe that is open but never read: the writer thread blocks once the pipe's buffer is full; requests
    keep their pace and the lines that cannot be written are dropped and counted."""
    upstream = start_upstream("v1")
    fifo = tmp_path / "access.pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read
    try:
        gw = start_gateway(gateway_config({"hello": service(upstream.address)}, telemetry={"access_log": str(fifo)}))
        slowest = 0.0
        with client(gw) as c:

            def dropped() -> float:
                metrics = httpx.get(gw.url("admin") + "/metrics", trust_env=False).text
                found = re.search(r'^meshgate_access_log_dropped_total\{destination="hello"\} (\S+)$', metrics, re.M)
                return float(found.group(1)) if found else 0.0

            def burst() -> float:
                nonlocal slowest
                for _ in range(200):
                    started = time.monotonic()
                    assert c.get("/echo", headers={"host": "hello"}).status_code == 200
                    slowest = max(slowest, time.monotonic() - started)
                return dropped()

            wait_for(burst, timeout=60.0, interval=0.0, what="access-log lines to be dropped")
        assert slowest < 0.5, f"a request took {slowest:.3f}s while the access log was blocked"
    finally:
        os.close(reader)
