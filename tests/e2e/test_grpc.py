"""gRPC through the mesh: a grpcio client calls grpc's interop TestService through its group's gateway, which
carries the call over mTLS HTTP/2 to the owning group's gateway, which calls the app over h2c.

Every interop case ends with the status the spec asks for, and each gateway counts each call once with its true
`grpc_status`. Failures the gateway makes itself (a dead app, a deadline) reach the client as gRPC codes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import httpx
import pytest
import yaml

from tests.conftest import ROOT, Gateway, gateway_config, hop_records, metric, service, wait_for
from tests.e2e.mesh import Dashboard, caller_and_owner
from tests.grpc.interop import CASES, Modules, TestServiceServer, compile_protos, wire_call

SERVICE = "interop"


@dataclass
class GrpcMesh:
    pb: Modules
    caller: Gateway
    owner: Gateway
    server: TestServiceServer
    dashboard: Dashboard

    def channel(self) -> grpc.Channel:
        host, port = self.caller.addresses["outbound"]
        return grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", SERVICE)])


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Modules:
    return compile_protos(tmp_path_factory.mktemp("protos"))


@pytest.fixture(scope="module")
def grpc_mesh(tmp_path_factory: pytest.TempPathFactory, pb: Modules) -> Iterator[GrpcMesh]:
    with TestServiceServer(pb) as server:
        services = {SERVICE: service(f"127.0.0.1:{server.port}", protocol="grpc")}
        with caller_and_owner(tmp_path_factory.mktemp("mesh"), services) as (dashboard, caller, owner):
            found = GrpcMesh(pb, caller, owner, server, dashboard)
            with found.channel() as channel:
                wait_for(lambda: _reaches(channel, pb), 15, what="shop reaches the interop service")
            yield found


def _reaches(channel: grpc.Channel, pb: Modules) -> bool:
    try:
        return CASES["empty_unary"](channel, pb) is grpc.StatusCode.OK
    except (grpc.RpcError, AssertionError):
        return False


def grpc_counts(gateway: Gateway) -> collections.Counter[tuple[str, str]]:
    """meshgate_requests_total for the interop service by (code, grpc_status), from /metrics."""
    text = httpx.get(gateway.url("admin") + "/metrics", timeout=5).text
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("meshgate_requests_total{") and f'destination="{SERVICE}"' in line:
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            counts[(labels["code"].strip('"'), labels["grpc_status"].strip('"'))] += int(float(line.rsplit(" ", 1)[1]))
    return counts


@pytest.mark.parametrize("case", list(CASES))
def test_every_interop_case_crosses_the_mesh_and_is_counted_once_per_side_with_its_status(
    grpc_mesh: GrpcMesh, case: str
) -> None:
    before = {side: grpc_counts(gateway) for side, gateway in sides(grpc_mesh)}
    with grpc_mesh.channel() as channel:
        code = CASES[case](channel, grpc_mesh.pb)
    if case == "timeout_on_sleeping_server":
        # A 1 ms deadline: grpcio may give up before a byte is sent, so there may be nothing to count. The
        # gateway's own deadline is tested with a client that does not enforce one itself (below).
        return
    if code is grpc.StatusCode.CANCELLED:
        # The client reset the stream, possibly before a byte left it (then no gateway saw the call); what a
        # gateway saw it records as CANCELLED, under 499 when no answer had begun, and never as anything else.
        cancelled = {("200", "1"), ("499", "1")}
        settle = time.monotonic() + 2
        while time.monotonic() < settle:
            caller, owner = (grpc_counts(gateway) - before[side] for side, gateway in sides(grpc_mesh))
            assert set(caller) <= cancelled and set(owner) <= cancelled, (case, caller, owner)
            time.sleep(0.1)
        assert sum(owner.values()) <= sum(caller.values()) <= 1, (caller, owner)
        return
    grpc_status = str(code.value[0])
    # A case may make several calls (the compression cases probe first); each is one count on each side.
    caller = wait_for_counts(grpc_mesh.caller, before["caller"])
    assert any(found == grpc_status for _, found in caller), (case, caller)
    wait_for(lambda: grpc_counts(grpc_mesh.owner) - before["owner"] == caller, 5, what=f"{case} at the owner")
    assert sum(caller.values()) == sum((grpc_counts(grpc_mesh.owner) - before["owner"]).values())


def sides(mesh: GrpcMesh) -> tuple[tuple[str, Gateway], tuple[str, Gateway]]:
    return ("caller", mesh.caller), ("owner", mesh.owner)


def wait_for_counts(
    gateway: Gateway, before: collections.Counter[tuple[str, str]]
) -> collections.Counter[tuple[str, str]]:
    """The calls recorded since `before`, once the count has stopped growing (records land when calls end)."""
    seen: list[collections.Counter[tuple[str, str]]] = [collections.Counter()]

    def settled() -> bool:
        grown = grpc_counts(gateway) - before
        done = bool(grown) and grown == seen[-1]
        seen.append(grown)
        return done

    wait_for(settled, 5, what="calls recorded")
    return seen[-1]


def test_a_call_to_a_dead_app_fails_unavailable_not_internal(tmp_path: Path, pb: Modules) -> None:
    """A standalone gateway (h2c prior knowledge on outbound) in front of an interop server process: SIGKILL mid
    server-streaming call gives the client UNAVAILABLE from the gateway, not INTERNAL, and so does the next call."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.grpc.interop", "serve", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready", ready
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(gateway_config({SERVICE: service(f"127.0.0.1:{ready[1]}", protocol="grpc")})))
        gateway = Gateway(path, [])
        try:
            host, port = gateway.addresses["outbound"]
            options = [("grpc.default_authority", SERVICE)]
            with grpc.insecure_channel(f"{host}:{port}", options=options) as channel:
                stub = pb.test_grpc.TestServiceStub(channel)
                request = pb.messages.StreamingOutputCallRequest(
                    response_parameters=[pb.messages.ResponseParameters(size=10, interval_us=200_000)] * 50
                )
                call = stub.StreamingOutputCall(request, timeout=10)
                first = next(call)
                assert len(first.payload.body) == 10
                os.kill(proc.pid, signal.SIGKILL)
                with pytest.raises(grpc.RpcError) as killed:
                    list(call)
                assert killed.value.code() is grpc.StatusCode.UNAVAILABLE, killed.value
                assert "meshgate" in (killed.value.details() or "")
                # A new call to the dead app: UNAVAILABLE from the gateway, Trailers-Only.
                with pytest.raises(grpc.RpcError) as refused:
                    stub.EmptyCall(pb.empty.Empty(), timeout=5)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "meshgate" in (refused.value.details() or "")
            wait_for(lambda: metric(gateway, "meshgate_requests_total", code="200", grpc_status="14") == 2, 5)
        finally:
            gateway.stop()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """An upstream that accepts connections and reads, and never answers: only the gateway can end a call."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                conns.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
        listener.close()


def test_a_100ms_grpc_timeout_fails_at_the_gateway_with_deadline_exceeded_within_150ms(
    tmp_path: Path, pb: Modules
) -> None:
    """The gateway enforces grpc-timeout itself, on its timer wheel: against an app that never answers, a client
    that does not enforce its own deadline gets DEADLINE_EXCEEDED, Trailers-Only, from the gateway."""
    with silent_server() as port:
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(gateway_config({SERVICE: service(f"127.0.0.1:{port}", protocol="grpc")})))
        gateway = Gateway(path, [])
        try:
            request = pb.messages.SimpleRequest(response_size=10)
            started = time.monotonic()
            reply = wire_call(
                gateway.addresses["outbound"][1],
                "/grpc.testing.TestService/UnaryCall",
                [(False, request.SerializeToString())],
                authority=SERVICE,
                headers=[("grpc-timeout", "100m")],
            )
            elapsed = time.monotonic() - started
            assert reply.headers[b":status"] == b"200" and reply.headers[b"grpc-status"] == b"4", reply
            assert b"meshgate" in reply.headers[b"grpc-message"] and not reply.messages and not reply.trailers
            assert 0.1 <= elapsed < 1.0, elapsed  # the client's view, however busy this machine is
            # The gateway's own record: it ended the call between 100 and 150 ms after it began.
            (hop,) = hop_records(gateway, reply.headers[b"x-request-id"].decode())
            assert hop["grpc_status"] == 4 and 0.1 <= hop["duration"] < 0.15, hop
        finally:
            gateway.stop()


def standalone(tmp_path: Path, *servers: TestServiceServer, **policy: object) -> Gateway:
    endpoints = [f"127.0.0.1:{server.port}" for server in servers]
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(gateway_config({SERVICE: service(*endpoints, protocol="grpc", **policy)})))
    return Gateway(path, [])


def empty_calls(gateway: Gateway, pb: Modules, count: int) -> None:
    host, port = gateway.addresses["outbound"]
    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", SERVICE)]) as channel:
        stub = pb.test_grpc.TestServiceStub(channel)
        for start in range(0, count, 100):  # 100 at a time: what the upstream servers' thread pools take at once
            futures = [stub.EmptyCall.future(pb.empty.Empty(), timeout=30) for _ in range(min(100, count - start))]
            for future in futures:
                future.result()


@pytest.mark.parametrize("lb", ["round_robin", "ewma"])
def test_calls_on_one_client_connection_spread_over_every_endpoint(tmp_path: Path, pb: Modules, lb: str) -> None:
    """Balancing is per call, not per connection: one grpcio channel (one HTTP/2 connection) reaches all four."""
    servers = [TestServiceServer(pb, max_workers=100).__enter__() for _ in range(4)]
    try:
        gateway = standalone(tmp_path, *servers, lb=lb)
        try:
            calls = 10_000 if lb == "round_robin" else 2_000
            empty_calls(gateway, pb, calls)
            shares = [server.service.empty_calls / calls for server in servers]
            assert sum(server.service.empty_calls for server in servers) == calls
            if lb == "round_robin":
                assert all(0.22 <= share <= 0.28 for share in shares), shares
            else:
                assert all(share > 0 for share in shares), shares
        finally:
            gateway.stop()
    finally:
        for server in servers:
            server.stop()


def test_grpc_health_checks_take_a_not_serving_endpoint_out_and_back(tmp_path: Path, pb: Modules) -> None:
    """`protocol: grpc` endpoints are checked with grpc.health.v1: NOT_SERVING takes one out of the balancer."""
    with TestServiceServer(pb) as sick, TestServiceServer(pb) as well:
        health = {"interval": "100ms", "timeout": "1s", "healthy": 1, "unhealthy": 1}
        gateway = standalone(tmp_path, sick, well, health=health, lb="round_robin")
        try:
            sick.set_serving(False)
            wait_for(lambda: metric(gateway, "meshgate_endpoints_unhealthy", destination=SERVICE) == 1, 10)
            empty_calls(gateway, pb, 50)
            assert (sick.service.empty_calls, well.service.empty_calls) == (0, 50)
            sick.set_serving(True)
            wait_for(lambda: metric(gateway, "meshgate_endpoints_unhealthy", destination=SERVICE) == 0, 10)
            empty_calls(gateway, pb, 50)
            assert sick.service.empty_calls > 0
        finally:
            gateway.stop()


def stream_sizes(pb: Modules, gateway: Gateway, intervals_ms: list[int]) -> tuple[list[int], grpc.RpcError | None]:
    """A server-streaming call of 10-byte responses, each `interval` after the one before: the sizes received, and
    how it failed (None when it ended OK)."""
    host, port = gateway.addresses["outbound"]
    request = pb.messages.StreamingOutputCallRequest(
        response_parameters=[pb.messages.ResponseParameters(size=10, interval_us=ms * 1000) for ms in intervals_ms]
    )
    sizes: list[int] = []
    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", SERVICE)]) as channel:
        try:
            for response in pb.test_grpc.TestServiceStub(channel).StreamingOutputCall(request, timeout=30):
                sizes.append(len(response.payload.body))
        except grpc.RpcError as exc:
            return sizes, exc
    return sizes, None


def test_a_stream_outlives_the_request_timeout_and_ends_when_idle_or_past_its_duration(
    tmp_path: Path, pb: Modules
) -> None:
    """`timeouts.request` bounds HTTP/1.1 requests, not HTTP/2 streams: a 2.4 s stream passes a 1 s request timeout.
    `stream_idle` ends one that goes quiet, and `max_stream_duration` one that goes on too long, both with
    DEADLINE_EXCEEDED from the gateway."""
    with TestServiceServer(pb) as server:
        timeouts = {"request": "1s", "per_try": "5s", "stream_idle": "1s"}
        gateway = standalone(tmp_path, server, timeouts=timeouts)
        try:
            sizes, error = stream_sizes(pb, gateway, [0] + [600] * 4)
            assert (sizes, error) == ([10] * 5, None)
            started = time.monotonic()
            sizes, error = stream_sizes(pb, gateway, [0, 4000])
            assert sizes == [10] and error is not None and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "meshgate" in (error.details() or "") and time.monotonic() - started < 3.5  # 1 s idle + a sweep
        finally:
            gateway.stop()
        path = tmp_path / "gw.yaml"
        config = gateway_config(
            {SERVICE: service(f"127.0.0.1:{server.port}", protocol="grpc", timeouts={"max_stream_duration": "1s"})}
        )
        path.write_text(yaml.safe_dump(config))
        gateway = Gateway(path, [])
        try:
            sizes, error = stream_sizes(pb, gateway, [0] + [400] * 5)
            assert error is not None and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert 2 <= len(sizes) <= 3, sizes  # responses at 0, 0.4 and 0.8 s arrived; the one at 1.2 s did not
        finally:
            gateway.stop()


@pytest.mark.parametrize("on", [["unavailable"], ["reset"]])
def test_a_trailers_only_unavailable_is_retried_only_when_retries_on_names_it(
    tmp_path: Path, pb: Modules, on: list[str]
) -> None:
    """gRPC calls are POSTs, yet `retries.on: [unavailable]` retries one answered Trailers-Only UNAVAILABLE (its
    body is held for replay), within `attempts` and the budget; without the condition it is not retried."""
    with TestServiceServer(pb) as server:
        retries = {"attempts": 2, "on": on, "budget": "100%"}
        gateway = standalone(tmp_path, server, retries=retries)
        try:
            host, port = gateway.addresses["outbound"]
            request = pb.messages.SimpleRequest(response_status=pb.messages.EchoStatus(code=14, message="down"))
            options = [("grpc.default_authority", SERVICE)]
            with (
                grpc.insecure_channel(f"{host}:{port}", options=options) as channel,
                pytest.raises(grpc.RpcError) as failed,
            ):
                pb.test_grpc.TestServiceStub(channel).UnaryCall(request, timeout=10)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE and failed.value.details() == "down"
            retried = on == ["unavailable"]
            assert server.service.unary_calls == (3 if retried else 1)
            assert metric(gateway, "meshgate_retries_total", destination=SERVICE) == (2 if retried else 0)
            assert metric(gateway, "meshgate_requests_total", grpc_status="14") == 1  # one call, however many tries
        finally:
            gateway.stop()


def test_shutdown_says_goaway_and_lets_a_stream_in_flight_finish(tmp_path: Path, pb: Modules) -> None:
    """SIGTERM during a server-streaming call: the gateway says GOAWAY (no new streams on the connection), the call
    in flight gets all its responses and ends OK, and the gateway exits 0 once it has."""
    with TestServiceServer(pb) as server:
        gateway = standalone(tmp_path, server)
        host, port = gateway.addresses["outbound"]
        request = pb.messages.StreamingOutputCallRequest(
            response_parameters=[pb.messages.ResponseParameters(size=10, interval_us=300_000)] * 5
        )
        with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", SERVICE)]) as channel:
            call = pb.test_grpc.TestServiceStub(channel).StreamingOutputCall(request, timeout=30)
            sizes = [len(next(call).payload.body)]
            gateway.signal(signal.SIGTERM)
            gateway.wait_log("draining 1 connections")
            sizes += [len(response.payload.body) for response in call]
            assert sizes == [10] * 5 and call.code() is grpc.StatusCode.OK
        assert gateway.proc.wait(20) == 0
        gateway.stop()


def test_a_failed_call_is_found_by_request_id_with_its_grpc_status_and_rpc_span_attributes(
    grpc_mesh: GrpcMesh,
) -> None:
    """Request lookup works for gRPC as for HTTP/1.1: the x-request-id in the response's initial metadata finds
    both hops in the dashboard's span store, each with OpenTelemetry's RPC attributes and the error status."""
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)  # sampled: both hops export
    pb = grpc_mesh.pb
    request = pb.messages.SimpleRequest(response_status=pb.messages.EchoStatus(code=13, message="broken"))
    with grpc_mesh.channel() as channel:
        call = pb.test_grpc.TestServiceStub(channel).UnaryCall.future(request, metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError):
            call.result()
        headers = dict(call.initial_metadata() or ()) | dict(call.trailing_metadata() or ())
    request_id = headers["x-request-id"]
    with grpc_mesh.dashboard.api() as api:

        def stored() -> list[dict[str, Any]] | None:
            found = api.get("/traces", params={"request_id": request_id})
            spans = found.json().get("spans", []) if found.status_code == 200 else []
            in_store = [span for span in spans if "store" in span["found_in"]]
            return in_store if len(in_store) == 2 else None

        spans = wait_for(stored, 10, what="both hops' spans in the dashboard's span store")
    for span in spans:
        assert span["trace_id"] == trace_id
        attributes = span["attributes"]
        assert attributes["rpc.system"] == "grpc" and attributes["rpc.service"] == "grpc.testing.TestService"
        assert attributes["rpc.method"] == "UnaryCall" and attributes["rpc.grpc.status_code"] == 13
        assert attributes["error.type"] == "INTERNAL"


def test_the_http2_codec_is_loaded_only_when_a_connection_needs_it(edge_gateway: Gateway) -> None:
    """An HTTP/1.1-only gateway pays no memory for HTTP/2: libnghttp2 (ngh2's extension) is mapped into the process
    only once a client speaks HTTP/2 to it."""
    maps = Path(f"/proc/{edge_gateway.proc.pid}/maps")
    host, port = edge_gateway.addresses["edge"]
    assert httpx.get(f"http://{host}:{port}/echo", headers={"host": "hello"}, trust_env=False).status_code == 200
    assert "ngh2" not in maps.read_text()
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--http2-prior-knowledge"]
        + ["-H", "host: hello", f"http://{host}:{port}/echo"],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    )
    assert done.stdout == "2 200"
    assert "ngh2" in maps.read_text()


@pytest.mark.parametrize(("failure_codes", "failed"), [(None, False), (["NOT_FOUND"], True)])
def test_a_code_is_a_failure_by_the_services_own_failure_codes(
    tmp_path: Path, pb: Modules, failure_codes: list[str] | None, failed: bool
) -> None:
    """NOT_FOUND is no failure by default (Linkerd's set); a service that lists it has its calls recorded as failed:
    the hop's error, which is the span's error.type and status, and what the access log says."""
    with TestServiceServer(pb) as server:
        policy = {"grpc": {"failure_codes": failure_codes}} if failure_codes else {}
        gateway = standalone(tmp_path, server, **policy)
        try:
            host, port = gateway.addresses["outbound"]
            request = pb.messages.SimpleRequest(response_status=pb.messages.EchoStatus(code=5, message="no such"))
            with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", SERVICE)]) as channel:
                call = pb.test_grpc.TestServiceStub(channel).UnaryCall.future(request, timeout=10)
                with pytest.raises(grpc.RpcError):
                    call.result()
                request_id = dict(call.initial_metadata() or ()) | dict(call.trailing_metadata() or ())
            (hop,) = hop_records(gateway, request_id["x-request-id"])
            assert hop["grpc_status"] == 5 and hop["error"] == ("NOT_FOUND" if failed else ""), hop
        finally:
            gateway.stop()
