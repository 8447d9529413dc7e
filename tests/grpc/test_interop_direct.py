"""The interop harness proven without a gateway: every case straight from a grpcio client to TestServiceServer,
the compressed flags checked on the wire, the health service, and the server as a subprocess."""

from __future__ import annotations

import gzip
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc  # type: ignore[import-untyped]
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from tests.grpc.interop import CALL_TIMEOUT, CASES, Modules, TestServiceServer, compile_protos, wire_call

ROOT = Path(__file__).resolve().parents[2]

# What each case's call ends with; a gateway test compares its recorded grpc_status with the same codes.
EXPECTED = {name: grpc.StatusCode.OK for name in CASES} | {
    "status_code_and_message": grpc.StatusCode.UNKNOWN,
    "special_status_message": grpc.StatusCode.UNKNOWN,
    "unimplemented_method": grpc.StatusCode.UNIMPLEMENTED,
    "unimplemented_service": grpc.StatusCode.UNIMPLEMENTED,
    "cancel_after_begin": grpc.StatusCode.CANCELLED,
    "cancel_after_first_response": grpc.StatusCode.CANCELLED,
    "timeout_on_sleeping_server": grpc.StatusCode.DEADLINE_EXCEEDED,
}


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Modules:
    return compile_protos(tmp_path_factory.mktemp("interop-protos"))


@pytest.fixture(scope="module")
def server(pb: Modules) -> Iterator[TestServiceServer]:
    with TestServiceServer(pb) as running:
        yield running


@pytest.fixture
def channel(server: TestServiceServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


def test_the_cases_are_the_specs_in_its_order() -> None:
    assert list(CASES)[:2] == ["empty_unary", "large_unary"]
    assert list(CASES)[-3:] == ["cancel_after_begin", "cancel_after_first_response", "timeout_on_sleeping_server"]
    assert len(CASES) == 18


@pytest.mark.parametrize("name", list(CASES))
def test_case_directly(name: str, channel: grpc.Channel, pb: Modules) -> None:
    assert CASES[name](channel, pb) is EXPECTED[name]


def test_server_compresses_the_messages_asked_for_on_the_wire(server: TestServiceServer, pb: Modules) -> None:
    for compressed in (True, False):
        request = pb.messages.SimpleRequest(
            response_size=314159, response_compressed=pb.messages.BoolValue(value=compressed)
        )
        reply = wire_call(server.port, "/grpc.testing.TestService/UnaryCall", [(False, request.SerializeToString())])
        assert reply.trailers[b"grpc-status"] == b"0"
        [(flag, data)] = reply.messages
        assert flag is compressed
        response = pb.messages.SimpleResponse.FromString(gzip.decompress(data) if flag else data)
        assert response.payload.body == bytes(314159)

    parameters = [
        pb.messages.ResponseParameters(size=31415, compressed=pb.messages.BoolValue(value=True)),
        pb.messages.ResponseParameters(size=92653, compressed=pb.messages.BoolValue(value=False)),
    ]
    request = pb.messages.StreamingOutputCallRequest(response_parameters=parameters)
    path = "/grpc.testing.TestService/StreamingOutputCall"
    reply = wire_call(server.port, path, [(False, request.SerializeToString())])
    assert [flag for flag, _ in reply.messages] == [True, False]
    assert reply.headers[b"grpc-encoding"] == b"gzip"


def test_server_accepts_messages_compressed_one_by_one(server: TestServiceServer, pb: Modules) -> None:
    # The spec's client_compressed_streaming: one compressed message, then one not, in the same call.
    first, second = (
        pb.messages.StreamingInputCallRequest(payload=pb.messages.Payload(body=bytes(n))) for n in (27182, 45904)
    )
    messages = [(True, first.SerializeToString()), (False, second.SerializeToString())]
    reply = wire_call(server.port, "/grpc.testing.TestService/StreamingInputCall", messages)
    assert reply.trailers[b"grpc-status"] == b"0"
    [(flag, data)] = reply.messages
    assert flag is False  # nothing asked for a compressed answer
    assert pb.messages.StreamingInputCallResponse.FromString(data).aggregated_payload_size == 73086


def test_wire_call_sees_a_trailers_only_answer(server: TestServiceServer, pb: Modules) -> None:
    reply = wire_call(server.port, "/grpc.testing.UnimplementedService/UnimplementedCall", [(False, b"")])
    assert reply.headers[b"grpc-status"] == b"12"
    assert reply.messages == [] and reply.trailers == {}


def test_server_waits_interval_us_before_each_response(channel: grpc.Channel, pb: Modules) -> None:
    parameters = [pb.messages.ResponseParameters(size=1, interval_us=100_000) for _ in range(2)]
    request = pb.messages.StreamingOutputCallRequest(response_parameters=parameters)
    started = time.monotonic()
    arrivals = [
        time.monotonic() - started
        for _ in pb.test_grpc.TestServiceStub(channel).StreamingOutputCall(request, timeout=CALL_TIMEOUT)
    ]
    assert len(arrivals) == 2
    assert arrivals[0] >= 0.1 and arrivals[1] >= 0.2  # the delays accumulate, one before each response


def test_health_answers_serving_until_flipped(server: TestServiceServer, channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = health_pb2.HealthCheckResponse

    def statuses() -> list[int]:
        services = ("", "grpc.testing.TestService")
        return [stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=CALL_TIMEOUT).status for s in services]

    assert statuses() == [response.SERVING, response.SERVING]
    server.set_serving(False)
    try:
        assert statuses() == [response.NOT_SERVING, response.NOT_SERVING]
    finally:
        server.set_serving(True)
    assert statuses() == [response.SERVING, response.SERVING]
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(health_pb2.HealthCheckRequest(service="grpc.testing.Nothing"), timeout=CALL_TIMEOUT)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def _ready_port(process: subprocess.Popen[str], timeout: float = 20.0) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"the server exited with {process.wait(CALL_TIMEOUT)} before it was ready")
            if line.startswith("ready "):
                return int(line.split()[1])
    raise AssertionError(f"no 'ready <port>' line within {timeout} s")


def test_serve_as_a_subprocess(pb: Modules) -> None:
    command = [sys.executable, "-m", "tests.grpc.interop", "serve", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            port = _ready_port(process)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert CASES["empty_unary"](channel, pb) is grpc.StatusCode.OK
            process.send_signal(signal.SIGTERM)
            assert process.wait(CALL_TIMEOUT) == 0
        finally:
            if process.poll() is None:
                process.kill()
